"""A wheel, installed as users install it from an index, runs the demo: the presets and the demo models are
package data, not paths into a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json")
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "out", "*.egg-info", "__pycache__", ".pytest_cache")


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    site_packages: Path
    workdir: Path  # outside the checkout

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAPFILT_PRESETS_DIR")}
        return subprocess.run(list(args), cwd=self.workdir, env=environment, capture_output=True, text=True,
                              timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    """The wheel built from a copy of the checkout, installed without its dependencies into a fresh venv that
    sees this venv's packages (torch, transformers...) but not its editable install of capfilt."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    str(source), "-w", str(tmp / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("capfilt-*.whl")

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        check=True, capture_output=True, text=True).stdout.strip())
    # A plain path line: the dependencies become importable, and this venv's .pth files (among them the editable
    # install's import hook that maps capfilt to the checkout) are not run.
    (site_packages / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True)
    workdir = tmp / "work"
    workdir.mkdir()
    return Installed(wheel, venv, site_packages, workdir)


def test_the_wheel_holds_every_module_the_presets_and_the_demo_models(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "capfilt").rglob("*.py")}
    assert modules <= names, f"not in the wheel (add their package to pyproject.toml): {sorted(modules - names)}"
    presets = {f"capfilt/presets_data/{path.name}" for path in (ROOT / "models").glob("*.toml")}
    assert {"capfilt/presets_data/demo.toml", "capfilt/presets_data/blip-large.toml"} <= presets <= names
    demo = {f"capfilt/presets_data/demo/{model}/{name}" for model in ("captioner", "filter") for name in DEMO_FILES}
    assert demo <= names


def test_the_installed_package_lists_its_presets(installed):
    imported = installed.run(str(installed.venv / "bin" / "python"), "-c", "import capfilt; print(capfilt.__file__)")
    assert Path(imported.stdout.strip()).is_relative_to(installed.site_packages), "imported the checkout"
    listed = installed.run(str(installed.venv / "bin" / "capfilt"), "presets")
    assert listed.returncode == 0, listed.stderr
    for name in ("blip-base", "blip-large", "demo"):
        assert name in listed.stdout
    assert str(installed.site_packages / "capfilt" / "presets_data" / "demo" / "captioner") in listed.stdout
    assert str(ROOT) not in listed.stdout


def test_the_installed_package_runs_the_demo(installed):
    example = installed.workdir / "shapes"
    shutil.copytree(ROOT / "examples" / "shapes", example)
    result = installed.run(str(installed.venv / "bin" / "capfilt"), "bootstrap", str(example), "out",
                           "--preset", "demo", "--num-beams", "3", "--quiet")
    assert result.returncode == 0, result.stderr
    out = installed.workdir / "out"
    for shard in ("00000", "00001"):
        assert (out / f"{shard}.tar").stat().st_size > 0
        assert (out / f"{shard}_stats.json").is_file()
    shown = installed.run(str(installed.venv / "bin" / "capfilt"), "show", "out")
    assert shown.returncode == 0 and shown.stdout.strip(), shown.stderr
