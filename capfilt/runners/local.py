"""Shards run one after another in this process, on one device, with progress reported sample by sample."""

from __future__ import annotations

from collections.abc import Iterator

from capfilt.config import RunConfig
from capfilt.formats.base import Shard
from capfilt.observer import Observer
from capfilt.runners.base import Runner, check_visible
from capfilt.stats import ShardStats
from capfilt.worker import Locations, ShardWorker


class LocalRunner(Runner):
    reports_samples = True

    def __init__(self, config: RunConfig, locations: Locations, observer: Observer) -> None:
        check_visible((config.device,))
        self.observer = observer
        self.worker = ShardWorker(config, locations, observer)  # models load now: errors before any shard

    def run(self, shards: list[Shard]) -> Iterator[ShardStats]:
        for shard in shards:
            self.observer.shard_started(shard.name)
            yield self.worker.run_shard(shard)

    def close(self) -> None:
        self.worker.close()
