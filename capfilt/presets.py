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

DEFAULT_PRESET = "blip-large"


def presets_dir() -> Path:
    """$CAPFILT_PRESETS_DIR, else the installed presets. A folder on disk, not a Traversable: the demo models in
    it are loaded by path."""
    override = os.environ.get("CAPFILT_PRESETS_DIR")
    return Path(override) if override else Path(presets_data.__file__).parent


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    captioner: str
    filter: str
    prompt: str
    max_length: int
    min_length: int
    top_p: float
    itm_threshold: float
    itc_threshold: float
    text_max_tokens: int


def available_presets() -> list[str]:
    return sorted(path.stem for path in presets_dir().glob("*.toml"))


def load_preset(name: str) -> Preset:
    path = Path(name) if name.endswith(".toml") else presets_dir() / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(available_presets())}")
    try:
        data = tomllib.loads(path.read_text())
        caption, filter_ = data["captioning"], data["filtering"]
        return Preset(
            name=path.stem,
            description=data.get("description", ""),
            captioner=_resolve_model(data["captioner"], path.parent),
            filter=_resolve_model(data["filter"], path.parent),
            prompt=caption["prompt"],
            max_length=int(caption["max_length"]),
            min_length=int(caption["min_length"]),
            top_p=float(caption["top_p"]),
            itm_threshold=float(filter_["itm_threshold"]),
            itc_threshold=float(filter_["itc_threshold"]),
            text_max_tokens=int(filter_["text_max_tokens"]),
        )
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"preset file {path} is invalid: {error!r}") from error


def _resolve_model(model: str, base: Path) -> str:
    local = base / model
    return str(local) if local.is_dir() else model
