"""Every option of the run commands, once: its name, type, default, help and the commands that take it.

The CLI builds each command's flags from this table (`capfilt.cli`), and `capfilt.run(input, output, **options)`
takes the same names (`capfilt.api`): adding an option is one entry here and its use in `api.build_config`.
Defaults that come from the preset are None here and say so in the help. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from capfilt.config import Command, FilterMode
from capfilt.presets import DEFAULT_PRESET, load_preset

CAPTION = frozenset({Command.caption, Command.bootstrap})
FILTER = frozenset({Command.filter, Command.bootstrap})
KEEP = frozenset({Command.filter, Command.bootstrap, Command.select})
MODELS = frozenset({Command.caption, Command.filter, Command.bootstrap})
ALL = frozenset(Command)

# The default preset's values, read from its file, for the help text.
_DEFAULT = load_preset(DEFAULT_PRESET)


@dataclass(frozen=True)
class Option:
    name: str
    type: Any
    default: Any
    help: str
    commands: frozenset[Command]
    # click's `show_default`: True, or where a default that is not a plain value comes from.
    show_default: bool | str = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: list[Option] = [
    Option("preset", str, DEFAULT_PRESET, "Recipe: blip-large, blip-base, laion-clip, laion-coco, demo, or a .toml.",
           MODELS),
    Option("captioner", str | None, None, "Captioner: HF model id or local dir.", CAPTION, "preset's"),
    Option("filter", list[str] | None, None,
           "Filter model (HF id or local dir); repeatable. NAME=MODEL renames its scores.", FILTER, "preset's"),
    Option("num_captions", int | None, None, "Synthetic captions per image.", CAPTION,
           f"preset: {_DEFAULT.num_captions}"),
    Option("num_beams", int | None, None, "1: nucleus sampling; >1: beam search.", CAPTION,
           f"preset: {_DEFAULT.num_beams}"),
    Option("top_p", float | None, None, "Nucleus sampling top-p.", CAPTION, f"preset: {_DEFAULT.top_p}"),
    Option("max_length", int | None, None, "Max tokens, prompt included.", CAPTION, f"preset: {_DEFAULT.max_length}"),
    Option("min_length", int | None, None, "Min tokens, prompt included.", CAPTION, f"preset: {_DEFAULT.min_length}"),
    Option("repetition_penalty", float | None, None, "Repetition penalty.", CAPTION, "BLIP's: 1.1 nucleus, 1.0 beam"),
    Option("prompt", str | None, None, "Decoder prompt, stripped from captions.", CAPTION,
           f"preset: {_DEFAULT.prompt!r}"),
    Option("seed", int, 0, "Seed of nucleus sampling.", CAPTION),
    Option("keep", list[str] | None, None,
           "Keep rule SCORE>=VALUE (or >, <=, <); repeatable: a caption is kept when all hold.", KEEP,
           f"preset's: {', '.join(_DEFAULT.keep)}"),
    Option("keep_best", int | None, None, "Keep at most the K best captions per image, by the first rule's score.",
           KEEP, "all that pass"),
    Option("keep_top", list[str] | None, None,
           "SCORE:FRACTION: keep captions in the top FRACTION of SCORE over the whole input; repeatable.",
           frozenset({Command.select}), "the rules, else the top fractions, the input's run recorded"),
    Option("threshold", float | None, None, "Shorthand for --keep 'itm>=VALUE' (BLIP's ITM probability).", FILTER,
           "preset's rules"),
    Option("itc_threshold", float | None, None, "Shorthand for --keep 'itc>=VALUE' (BLIP's ITC cosine).", FILTER,
           "preset's rules"),
    Option("scores", str | None, None, "Scores to compute besides the rules' (e.g. itm,itc).", FILTER,
           "the rules' and each model's default"),
    Option("mode", FilterMode, FilterMode.drop, "drop: remove images with no kept caption; annotate: keep all.", KEEP),
    Option("keep_dropped", bool, False,
           "Also write the dropped samples, images and scores included, as shards in OUT/.dropped/.", KEEP),
    Option("report", bool, False, "At the end, write OUT/report.html (as capfilt report OUT).", ALL),
    Option("input_format", str | None, None, "webdataset, parquet or files.", ALL, "detected"),
    Option("output_format", str | None, None, "webdataset, parquet or files.", ALL, "input's"),
    Option("caption_column", str | None, None, "Caption column or extension.", ALL, "caption, text or txt"),
    Option("image_column", str | None, None, "Parquet image column.", ALL, "detected"),
    Option("device", str, "auto", "auto (GPU if visible), cpu, cuda, cuda:1 ...", MODELS),
    Option("dtype", str, "auto", "auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16.", MODELS),
    Option("batch_size", int, 32, "Images per model batch.", ALL),
    Option("threads", int | None, None, "torch CPU threads of each model stage.", MODELS,
           "on CPU the cores split between the model stages"),
    Option("eager_attention", bool, False, "transformers' own BLIP attention instead of fused SDPA.", MODELS),
    Option("storage_options", str | None, None, "fsspec options as JSON.", ALL, "none"),
    Option("overwrite", bool, False, "Redo every shard instead of resuming.", ALL),
    Option("devices", str | None, None, "One worker process per device: all (every GPU), 0,1 or cuda:0,cuda:1.",
           MODELS, "--device only"),
    Option("ray", str | None, None, "Run on a Ray cluster: its address, or auto.", ALL, "no Ray"),
    Option("ray_workers", int | None, None, "Ray actors.", ALL, "one per cluster GPU, or CPU core on CPU"),
    Option("shard_index", int | None, None, "This process's share of a split job.", ALL,
           "$SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, else 0"),
    Option("num_shards", int | None, None, "Shares of a split job.", ALL, "$SLURM_ARRAY_TASK_COUNT, else 1"),
]

BY_NAME = {option.name: option for option in OPTIONS}
