"""What the pipeline reports while it runs. The pipeline never prints; an observer shows progress."""

from __future__ import annotations

from typing import TYPE_CHECKING

from capfilt.stats import ShardStats

if TYPE_CHECKING:
    from capfilt.formats.base import Shard
    from capfilt.worker import Locations


class Observer:
    """Receives the pipeline's events; the base class ignores them all."""

    def run_started(self, total_shards: int) -> None: ...

    def run_planned(self, complete: int, pending: list[Shard], locations: Locations) -> None:
        """Of the run's shards, `complete` are finished in the output already (a resumed run skips them) and
        `pending` are to do, read from `locations`."""

    def shard_started(self, shard_name: str) -> None: ...

    def samples_done(self, count: int) -> None: ...

    def shard_finished(self, stats: ShardStats) -> None: ...

    def batch_split(self, stage: str, batch_size: int) -> None:
        """A stage ran out of device memory and goes on with batches of `batch_size` samples."""
