"""One object with every setting of a run; the CLI builds it, the pipeline reads it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import torch

from capfilt.errors import ConfigError
from capfilt.models.base import DecodingSettings


class Command(str, Enum):
    caption = "caption"
    filter = "filter"
    bootstrap = "bootstrap"


class FilterMode(str, Enum):
    drop = "drop"
    annotate = "annotate"


@dataclass(frozen=True)
class FilterSettings:
    """Which scores to compute and what passes: a caption is kept when every computed score passes."""

    itm: bool = True
    itc: bool = False
    itm_threshold: float = 0.5
    itc_threshold: float = 0.3
    mode: FilterMode = FilterMode.drop
    text_max_tokens: int = 35

    def passes(self, itm_score: float | None, itc_score: float | None) -> bool:
        if itm_score is not None and itm_score < self.itm_threshold:
            return False
        if itc_score is not None and itc_score < self.itc_threshold:
            return False
        return True


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunConfig:
    command: Command
    input: str
    output: str
    captioner: str | None = None
    filter: str | None = None
    decoding: DecodingSettings | None = None
    filtering: FilterSettings | None = None
    input_format: str | None = None
    output_format: str | None = None
    caption_column: str | None = None
    image_column: str | None = None
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
        if self.command in (Command.caption, Command.bootstrap) and (not self.captioner or not self.decoding):
            raise ConfigError(f"'{self.command.value}' needs a captioner")
        if self.command in (Command.filter, Command.bootstrap) and (not self.filter or not self.filtering):
            raise ConfigError(f"'{self.command.value}' needs a filter")
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"--shard-index must be in 0..{self.num_shards - 1} (of --num-shards {self.num_shards})")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise ConfigError("--ray-workers must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be at least 1")
        for device in (self.device, *self.devices):
            try:
                torch.device(device)
            except RuntimeError:
                raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:1 ... (or a list for --devices)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown --dtype {self.dtype}; choose one of {', '.join(DTYPES)}")
        if self.device == "cpu" and DTYPES[self.dtype] == torch.float16:
            raise ConfigError("--dtype fp16 is not supported on CPU; use fp32 or bf16")
        if self.decoding:
            _check_decoding(self.decoding)
        if self.filtering:
            _check_filtering(self.filtering)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def record(self) -> dict[str, Any]:
        """The settings written to `capfilt_run.json` in the output directory."""
        record = asdict(self)
        record["command"] = self.command.value
        if self.filtering:
            record["filtering"]["mode"] = self.filtering.mode.value
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


def _check_filtering(f: FilterSettings) -> None:
    if not (f.itm or f.itc):
        raise ConfigError("the filter needs at least one score: itm or itc")
    if not 0.0 <= f.itm_threshold <= 1.0:
        raise ConfigError(f"--threshold (ITM probability) must be in [0, 1], got {f.itm_threshold}")
    if not -1.0 <= f.itc_threshold <= 1.0:
        raise ConfigError(f"--itc-threshold (cosine) must be in [-1, 1], got {f.itc_threshold}")
