"""The one Python entry point: `capfilt.run(input, output, command=..., **options)` runs a job the way the CLI
does (the CLI calls it), with the options of `capfilt.options` by their Python names, as img2dataset's
`download(**params)` does. `build_config` turns options into a `RunConfig` without importing torch.

    import capfilt
    summary = capfilt.run("shards/", "out/", command="bootstrap", preset="demo", keep=["itm>=0.6"])
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from capfilt.config import Command, DecodingSettings, FilterModel, RunConfig
from capfilt.errors import ConfigError
from capfilt.options import BY_NAME
from capfilt.presets import load_preset

if TYPE_CHECKING:
    from capfilt.observer import Observer
    from capfilt.stats import RunSummary


def run(input: str, output: str, command: str | Command = Command.bootstrap, observer: Observer | None = None,
        **options: Any) -> RunSummary:
    """Run a capfilt job: `command` is caption, filter, bootstrap (both) or select; `options` are the CLI's
    flags by their Python names (`num_captions=5`, `filter=["clip=openai/clip-vit-base-patch32"]`); `observer`
    receives the run's events (the CLI's progress bar is one)."""
    config = build_config(command, input, output, **options)
    from capfilt.pipeline import Pipeline  # the settings are checked: only now wait for torch

    return Pipeline(config, observer).run()


def build_config(command: str | Command, input: str, output: str, **options: Any) -> RunConfig:
    """The `RunConfig` of a job: defaults from the option table and the preset, then `options`."""
    try:
        command = Command(command)
    except ValueError:
        raise ConfigError(f"unknown command {command!r}; choose one of: {', '.join(c.value for c in Command)}") from None
    for name in options:
        option = BY_NAME.get(name)
        if option is None:
            raise ConfigError(f"unknown option {name!r}; options: {', '.join(BY_NAME)}")
        if command not in option.commands:
            raise ConfigError(f"{option.flag} is not an option of '{command.value}'")
    o = {name: option.default for name, option in BY_NAME.items() if command in option.commands} | options
    preset = load_preset(o["preset"]) if "preset" in o else None
    settings: dict[str, Any] = {}
    if command in (Command.caption, Command.bootstrap):
        captioner = o["captioner"] or preset.captioner
        if not captioner:
            raise ConfigError(f"the preset {preset.name} names no captioner; pass --captioner")
        settings["captioner"] = captioner
        settings["decoding"] = DecodingSettings(
            num_beams=_or(o["num_beams"], preset.num_beams),
            num_captions=_or(o["num_captions"], preset.num_captions),
            top_p=_or(o["top_p"], preset.top_p),
            max_length=_or(o["max_length"], preset.max_length),
            min_length=_or(o["min_length"], preset.min_length),
            repetition_penalty=o["repetition_penalty"],
            prompt=_or(o["prompt"], preset.prompt),
            seed=o["seed"],
        )
    keep = _listed(o.get("keep"))
    keep_best = o.get("keep_best")
    if command in (Command.filter, Command.bootstrap):
        given = _listed(o["filter"])
        filters = tuple(FilterModel.parse(text) for text in (given or preset.filters))
        if not filters:
            raise ConfigError(f"the preset {preset.name} names no filter; pass --filter")
        keep += [f"{score}>={value!r}" for score, value in (("itm", o["threshold"]), ("itc", o["itc_threshold"]))
                 if value is not None]
        if not keep and not given:  # the preset's recipe, for the preset's filters
            if preset.keep:
                keep, keep_best = list(preset.keep), _or(keep_best, preset.keep_best)
            settings["keep_top"] = preset.keep_top
        settings["filters"] = filters
        settings["extra_scores"] = tuple(name.strip() for name in (o["scores"] or "").split(",") if name.strip())
    if command in (Command.filter, Command.bootstrap, Command.select):
        settings.update(keep=tuple(keep) if keep else None, keep_best=keep_best, mode=o["mode"],
                        keep_dropped=o["keep_dropped"])
    if command is Command.select:
        settings["keep_top"] = tuple(_listed(o["keep_top"]))
    listed = listed_devices(o.get("devices"))
    device = o.get("device", "cpu")
    index, count = share_of_job(o["shard_index"], o["num_shards"])
    return RunConfig(
        command=command, input=input, output=output, **settings,
        input_format=o["input_format"], output_format=o["output_format"], caption_column=o["caption_column"],
        image_column=o["image_column"], device=listed[0] if listed else device, dtype=o.get("dtype", "float32"),
        batch_size=o["batch_size"], threads=o.get("threads"), sdpa=not o.get("eager_attention", False),
        overwrite=o["overwrite"], report=o["report"], storage_options=parse_storage_options(o["storage_options"]), devices=listed,
        ray_address=o["ray"], ray_workers=o["ray_workers"], shard_index=index, num_shards=count,
    )


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _listed(value: str | Sequence[str] | None) -> list[str]:
    """A repeatable option's values: a list, or one value given as a plain string."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def listed_devices(devices: str | Sequence[str] | None) -> tuple[str, ...]:
    """The devices `--devices` names: `all` is every visible GPU, digits are CUDA devices."""
    if devices == "all":
        import torch

        listed = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count()))
        if not listed:
            raise ConfigError("--devices all: no CUDA device is visible")
        return listed
    names = devices.split(",") if isinstance(devices, str) else list(devices or ())
    return tuple(f"cuda:{d}" if d.isdigit() else d for d in (d.strip() for d in names) if d)


def share_of_job(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    """This process's share of a split job: the flags, else a SLURM job array's variables, else all of it."""
    if num_shards is None and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        num_shards = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        minimum = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        shard_index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - minimum if shard_index is None else shard_index
    return shard_index or 0, num_shards or 1


def parse_storage_options(text: str | dict | None) -> dict:
    if isinstance(text, dict):
        return text
    try:
        options = json.loads(text) if text else {}
    except json.JSONDecodeError as error:
        raise ConfigError(f"--storage-options is not valid JSON: {error}") from error
    if not isinstance(options, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return options
