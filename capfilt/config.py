"""One object with every setting of a run; the CLI builds it, the pipeline reads it.

Nothing here imports torch (only resolving `--device auto` does), so that the command line checks its
arguments in a blink, before any model library loads.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from capfilt.errors import ConfigError
from capfilt.keep import KeepRules, KeepTop
from capfilt.scores import check_score_name

if TYPE_CHECKING:
    import torch


class Command(str, Enum):
    """Which parts of a preset a run takes: the captioner, the filters, or both; `select` takes neither and
    re-applies keep rules to scores an earlier run wrote. The stages follow from the parts, not the command."""

    caption = "caption"
    filter = "filter"
    bootstrap = "bootstrap"
    select = "select"


class FilterMode(str, Enum):
    drop = "drop"
    annotate = "annotate"


@dataclass(frozen=True)
class DecodingSettings:
    """How the captioner decodes. Lengths count tokens the way Hugging Face does: prompt included.

    `repetition_penalty=None` means BLIP's own choice: 1.1 for nucleus sampling, 1.0 for beam search.
    """

    num_beams: int = 1
    num_captions: int = 1
    top_p: float = 0.9
    max_length: int = 30
    min_length: int = 10
    repetition_penalty: float | None = None
    prompt: str = "a picture of "
    seed: int = 0

    @property
    def method(self) -> str:
        return "beam" if self.num_beams > 1 else "nucleus"

    @property
    def effective_repetition_penalty(self) -> float:
        if self.repetition_penalty is not None:
            return self.repetition_penalty
        return 1.0 if self.method == "beam" else 1.1

    def record(self) -> dict:
        """The settings written beside each synthetic caption."""
        record = asdict(self)
        record["method"] = self.method
        record["repetition_penalty"] = self.effective_repetition_penalty
        if self.method == "beam":
            record.pop("top_p")
            record.pop("seed")
        else:
            record.pop("num_beams")
        return record


@dataclass(frozen=True)
class FilterModel:
    """One filter of a run: a model (HF id or local directory) and the name its scores take in this run.

    `--filter NAME=MODEL` renames the model's scores (see `capfilt.scores.run_scores`); `computes` lists the
    family's scores this run computes, filled in when the run is planned (`capfilt.plan`)."""

    model: str
    name: str | None = None
    computes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FilterModel:
        name, separator, model = text.partition("=")
        if not separator:
            return cls(text)
        if not model:
            raise ConfigError(f"--filter {text!r} names no model: write MODEL or NAME=MODEL")
        return cls(model, check_score_name(name.strip(), "--filter name"))


# --dtype names and the torch dtype each one names.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16"}
# The device types `torch.device` knows (its own error lists them), checked here without importing torch.
DEVICE_PATTERN = re.compile(
    r"(cpu|cuda|ipu|xpu|mkldnn|opengl|opencl|ideep|hip|ve|fpga|maia|xla|lazy|vulkan|mps|meta|hpu|mtia|privateuseone)"
    r"(:\d+)?"
)


def __getattr__(name: str) -> Any:
    """`DTYPES`, the torch dtype of each --dtype name, imports torch only when it is used."""
    if name == "DTYPES":
        import torch

        return {alias: getattr(torch, dtype) for alias, dtype in DTYPE_NAMES.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_device() -> str:
    """What `--device auto` runs on: the GPU when one is visible."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class RunConfig:
    command: Command
    input: str
    output: str
    captioner: str | None = None
    decoding: DecodingSettings | None = None
    filters: tuple[FilterModel, ...] = ()
    # Scores to compute besides those the keep rules use (`--scores`, names as this run calls them).
    extra_scores: tuple[str, ...] = ()
    # Keep rules (`itm>=0.5`); None: the defaults of the filters' families, set when the run is planned.
    keep: tuple[str, ...] | None = None
    keep_best: int | None = None
    # NAME:FRACTION. `select` turns each into a `NAME>=value` rule over the whole input when planned. A scoring
    # run (a preset's recipe) judges nothing and records them, for `select` to apply over its whole output.
    keep_top: tuple[str, ...] = ()
    mode: FilterMode = FilterMode.drop
    # Write the dropped samples as shards of their own, in OUT/.dropped/ (hidden: loaders reading OUT skip it).
    keep_dropped: bool = False
    # Write OUT/report.html at the end of the run.
    report: bool = False
    input_format: str | None = None
    output_format: str | None = None
    caption_column: str | None = None
    image_column: str | None = None
    # `auto` for either is resolved when the config is made: a GPU when one is visible, else the CPU; fp32 on
    # the CPU, bf16 elsewhere.
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 32
    decode_workers: int = 2
    # torch CPU threads of each model stage; None: on CPU the cores split between the stages (capfilt.threads).
    threads: int | None = None
    # Scaled-dot-product attention instead of transformers' matmul-softmax BLIP attention (same outputs).
    sdpa: bool = True
    overwrite: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    # Where shards run: more than one device gives one worker process per device; a Ray address, Ray actors.
    devices: tuple[str, ...] = ()
    ray_address: str | None = None
    ray_workers: int | None = None
    # This process's share of a job split over independent processes: every num_shards-th shard from shard_index.
    shard_index: int = 0
    num_shards: int = 1

    def __post_init__(self) -> None:
        try:  # frozen: normalised once, here (the Python entry point takes plain strings)
            object.__setattr__(self, "command", Command(self.command))
            object.__setattr__(self, "mode", FilterMode(self.mode))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.command in (Command.caption, Command.bootstrap) and (not self.captioner or not self.decoding):
            raise ConfigError(f"'{self.command.value}' needs a captioner")
        if self.command in (Command.filter, Command.bootstrap) and not self.filters:
            raise ConfigError(f"'{self.command.value}' needs a filter")
        if self.keep_top and (self.command is Command.caption or
                              (self.command is not Command.select and self.keep is not None)):
            raise ConfigError("--keep-top needs the whole input's scores first: use it with 'capfilt select' (a "
                              "scoring run may only record it, judging nothing)")
        KeepRules.parse(self.keep or (), self.keep_best if self.keep is not None else None)  # malformed: fail now
        for top in self.keep_top:
            KeepTop.parse(top)
        for name in self.extra_scores:
            check_score_name(name, "--scores name")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"--shard-index must be in 0..{self.num_shards - 1} (of --num-shards {self.num_shards})")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise ConfigError("--ray-workers must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be at least 1")
        named_devices = self.devices if self.device == "auto" else (self.device, *self.devices)
        for device in named_devices:
            if not DEVICE_PATTERN.fullmatch(device):
                raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:1 ... (or a list for --devices)")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"unknown --dtype {self.dtype}; choose one of auto, {', '.join(DTYPE_NAMES)}")
        if self.decoding:
            _check_decoding(self.decoding)
        # Last, since `auto` may import torch: every mistake above is reported without waiting for it.
        device = default_device() if self.device == "auto" else self.device
        dtype = ("float32" if device == "cpu" else "bfloat16") if self.dtype == "auto" else self.dtype
        object.__setattr__(self, "device", device)  # frozen: set once, here
        object.__setattr__(self, "dtype", dtype)
        if self.device == "cpu" and DTYPE_NAMES[self.dtype] == "float16":
            raise ConfigError("--dtype fp16 is not supported on CPU; use fp32 or bf16")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, DTYPE_NAMES[self.dtype])

    def record(self) -> dict[str, Any]:
        """The settings written to `capfilt_run.json` in the output directory."""
        record = asdict(self)
        record["command"] = self.command.value
        record["mode"] = self.mode.value
        if self.decoding:
            record["decoding"] = self.decoding.record()
        record.pop("storage_options")
        return record


def _check_decoding(d: DecodingSettings) -> None:
    if d.num_beams < 1 or d.num_captions < 1:
        raise ConfigError("--num-beams and --num-captions must be at least 1")
    if d.num_beams > 1 and d.num_captions > d.num_beams:
        raise ConfigError(f"beam search returns at most --num-beams captions ({d.num_beams}), not {d.num_captions}")
    if not 0.0 < d.top_p <= 1.0:
        raise ConfigError(f"--top-p must be in (0, 1], got {d.top_p}")
    if d.min_length > d.max_length:
        raise ConfigError(f"--min-length {d.min_length} is above --max-length {d.max_length}")
    if d.repetition_penalty is not None and d.repetition_penalty <= 0:
        raise ConfigError("--repetition-penalty must be positive")
