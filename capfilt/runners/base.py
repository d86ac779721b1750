"""The interface every runner implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from capfilt.errors import ConfigError
from capfilt.formats.base import Shard
from capfilt.stats import ShardStats


class Runner(ABC):
    """Runs shards through `ShardWorker`s, wherever those live."""

    # Whether progress arrives sample by sample (an in-process worker); otherwise shard by shard.
    reports_samples = False

    @abstractmethod
    def run(self, shards: list[Shard]) -> Iterator[ShardStats]:
        """Process every shard, yielding each one's stats as it finishes (in any order)."""

    def close(self) -> None:
        """Release workers; the runner is not used again."""


def check_visible(devices: tuple[str, ...]) -> None:
    """Fail in one line, before any model loads, when a device to run on here does not exist."""
    for name in devices:
        device = torch.device(name)
        if device.type != "cuda":
            continue
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name}: no CUDA device is visible here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible here")
