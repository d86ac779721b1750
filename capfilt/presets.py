"""Named model presets: a captioner, a filter and their defaults, one TOML file each in `models/`.

`models/` is installed as the package `capfilt.presets_data` (see pyproject.toml), so that an installed wheel
has the presets and the demo models they name. `--preset blip-large` reads its `blip-large.toml`;
`--preset path/to/file.toml` reads that file. Model paths inside a preset that name an existing directory
relative to the file are resolved against it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from capfilt import presets_data
from capfilt.errors import ConfigError
from capfilt.keep import KeepTop

DEFAULT_PRESET = "blip-large"


def presets_dir() -> Path:
    """$CAPFILT_PRESETS_DIR, else the installed presets. A folder on disk, not a Traversable: the demo models in
    it are loaded by path."""
    override = os.environ.get("CAPFILT_PRESETS_DIR")
    return Path(override) if override else Path(presets_data.__file__).parent


@dataclass(frozen=True)
class Preset:
    """A recipe: the captioner and its decoding defaults, the filters (`MODEL` or `NAME=MODEL`) and the keep
    rules a run takes when the command line does not say otherwise, or instead the top fractions
    (`NAME:FRACTION`) its output is scored for, which `capfilt select` keeps over the whole output. Any part may
    be absent (a filtering recipe names no captioner)."""

    name: str
    description: str
    captioner: str | None
    filters: tuple[str, ...]
    keep: tuple[str, ...]
    keep_best: int | None
    keep_top: tuple[str, ...]
    prompt: str
    max_length: int
    min_length: int
    top_p: float
    num_captions: int
    num_beams: int


def available_presets() -> list[str]:
    return sorted(path.stem for path in presets_dir().glob("*.toml"))


def load_preset(name: str) -> Preset:
    path = Path(name) if name.endswith(".toml") else presets_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(available_presets())}")
    try:
        data = tomllib.loads(path.read_text())
        caption = data.get("captioning", {})
        return Preset(
            name=path.stem,
            description=data.get("description", ""),
            captioner=_resolve_model(data["captioner"], path.parent) if "captioner" in data else None,
            filters=tuple(_resolve_filter(entry, path.parent) for entry in data.get("filters", [])),
            keep=tuple(str(rule) for rule in data.get("keep", [])),
            keep_best=int(data["keep_best"]) if "keep_best" in data else None,
            keep_top=tuple(str(KeepTop.parse(str(top))) for top in data.get("keep_top", [])),
            prompt=str(caption.get("prompt", "a picture of ")),
            max_length=int(caption.get("max_length", 30)),
            min_length=int(caption.get("min_length", 10)),
            top_p=float(caption.get("top_p", 0.9)),
            num_captions=int(caption.get("num_captions", 1)),
            num_beams=int(caption.get("num_beams", 1)),
        )
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError, ConfigError) as error:
        raise ConfigError(f"preset file {path} is invalid: {error}") from error


def _resolve_filter(entry: str, base: Path) -> str:
    name, separator, model = str(entry).rpartition("=")
    return f"{name}={_resolve_model(model, base)}" if separator else _resolve_model(model, base)


def _resolve_model(model: str, base: Path) -> str:
    local = base / model
    return str(local) if local.is_dir() else model
