"""The interface every runner implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

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
