"""One worker process per device (`--devices all`, `--devices 0,1`), each holding its own model replica.

Shards go to whichever process is free, so a slow shard does not hold the others back. Processes are
spawned (CUDA cannot be used in a forked child); each loads the models once and keeps them for every shard
it runs. Each shard's output is what a single-device run writes for it.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from capfilt.config import RunConfig
from capfilt.errors import RunError
from capfilt.formats.base import Shard
from capfilt.log import logger
from capfilt.models import captioner_family
from capfilt.runners.base import Runner, check_visible
from capfilt.stats import ShardStats
from capfilt.worker import Locations, ShardWorker

_worker: ShardWorker | None = None  # the worker of this process (in a device process)


def _start(config: RunConfig, locations: Locations, devices: multiprocessing.Queue, log_level: int) -> None:
    global _worker
    # A spawned process starts with logging unconfigured: print capfilt's lines (the model loading on this
    # device, a fast path switched off) as the main process does, one line each on stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("capfilt: %(message)s"))
    logger.handlers, logger.propagate = [handler], False
    logger.setLevel(log_level)
    device = devices.get()
    _worker = ShardWorker(dataclasses.replace(config, device=device, devices=(device,)), locations)


def _run_shard(shard: Shard) -> ShardStats:
    return _worker.run_shard(shard)


class DeviceRunner(Runner):
    def __init__(self, config: RunConfig, locations: Locations) -> None:
        check_visible(config.devices)
        if config.captioner:  # in one line here, not in a worker's traceback (filters are checked when planned)
            captioner_family(config.captioner)
        context = multiprocessing.get_context("spawn")
        devices = context.Queue()
        for device in config.devices:
            devices.put(device)
        self.pool = ProcessPoolExecutor(
            max_workers=len(config.devices), mp_context=context, initializer=_start,
            initargs=(config, locations, devices, logger.getEffectiveLevel()),
        )

    def run(self, shards: list[Shard]) -> Iterator[ShardStats]:
        futures = [self.pool.submit(_run_shard, shard) for shard in shards]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BrokenProcessPool:  # its own traceback went to stderr already; finished shards are kept
            raise RunError("a device process died (it could not load the models, or crashed); "
                           "rerun to resume, or with one --device to see the error in full") from None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
