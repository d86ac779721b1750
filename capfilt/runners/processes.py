"""One worker process per device (`--devices all`, `--devices 0,1`), each holding its own model replica.

Shards go to whichever process is free, so a slow shard does not hold the others back. Processes are
spawned (CUDA cannot be used in a forked child); each loads the models once and keeps them for every shard
it runs. Each shard's output is what a single-device run writes for it.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed

from capfilt.config import RunConfig
from capfilt.formats.base import Shard
from capfilt.runners.base import Runner
from capfilt.stats import ShardStats
from capfilt.worker import Locations, ShardWorker

_worker: ShardWorker | None = None  # the worker of this process (in a device process)


def _start(config: RunConfig, locations: Locations, devices: multiprocessing.Queue) -> None:
    global _worker
    device = devices.get()
    _worker = ShardWorker(dataclasses.replace(config, device=device, devices=(device,)), locations)


def _run_shard(shard: Shard) -> ShardStats:
    return _worker.run_shard(shard)


class DeviceRunner(Runner):
    def __init__(self, config: RunConfig, locations: Locations) -> None:
        context = multiprocessing.get_context("spawn")
        devices = context.Queue()
        for device in config.devices:
            devices.put(device)
        self.pool = ProcessPoolExecutor(
            max_workers=len(config.devices), mp_context=context, initializer=_start,
            initargs=(config, locations, devices),
        )

    def run(self, shards: list[Shard]) -> Iterator[ShardStats]:
        futures = [self.pool.submit(_run_shard, shard) for shard in shards]
        for future in as_completed(futures):
            yield future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
