"""Shards run on actors of a Ray cluster (`--ray ADDRESS|auto`), each actor holding its own model replica.

The driver (this process) keeps the output's lock, settings and summary; actors only run shards, each one
through the same `ShardWorker` as a local run, so the output is the same. An actor loads the models once and
runs shard after shard. Shards go to whichever actor has room, at most `SHARDS_PER_ACTOR` at a time, so a
slow shard or node does not hold the others back. When an actor's process or node dies, Ray restarts the
actor (its models load again) and reruns its in-flight shards: the lost node costs only those. A rerun
shard rewrites its temporaries from the start, so what it leaves is what an uninterrupted run writes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from collections.abc import Iterator
from typing import Any

from capfilt.config import RunConfig
from capfilt.errors import CapfiltError, ConfigError
from capfilt.formats.base import Shard
from capfilt.runners.base import Runner
from capfilt.stats import ShardStats
from capfilt.worker import Locations, ShardWorker

try:
    import ray
except ImportError:  # an optional extra
    ray = None

# One shard running and one waiting: an actor starts its next shard without a round trip to the driver, and
# at most one queued shard per actor waits behind a slow one.
SHARDS_PER_ACTOR = 2
# Each shard gets this many more attempts when its actor's process dies (crash, OOM kill, lost node), so a
# shard that kills every process it runs in fails the run instead of looping. Actors themselves restart
# without limit: a long run may lose many nodes.
SHARD_RETRIES = 3


class ShardActor:
    """A `ShardWorker` in a Ray actor: models loaded by `start`, or by the first shard after a restart."""

    def __init__(self, config: RunConfig, locations: Locations) -> None:
        self.config, self.locations = config, locations
        self.worker: ShardWorker | None = None

    def start(self) -> None:
        if self.worker is None:
            self.worker = ShardWorker(self.config, self.locations)

    def run_shard(self, shard: Shard) -> ShardStats:
        self.start()
        return self.worker.run_shard(shard)


class RayRunner(Runner):
    def __init__(self, config: RunConfig, locations: Locations) -> None:
        if ray is None:
            raise ConfigError("--ray needs Ray: pip install 'capfilt[ray]'")
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            try:  # Ray's own INFO lines would interleave with the progress bar
                ray.init(address=config.ray_address, logging_level=logging.WARNING)
            except ConnectionError as error:
                # Ray (2.59 on) gives local clusters token authentication; a driver finds their token itself
                # with `auto`, but given an address it uses one only when told to
                told = "RAY_AUTH_MODE" in os.environ or config.ray_address == "auto"
                hint = "" if told else (
                    " (a cluster with token authentication needs RAY_AUTH_MODE=token here, and RAY_AUTH_TOKEN"
                    " unless ~/.ray/auth_token holds its token)"
                )
                raise ConfigError(f"cannot connect to the Ray cluster at {config.ray_address}: {error}{hint}") from None
        self.actors: list[Any] = []
        try:
            self.actors = self._create_actors(config, locations)
            _get([actor.start.remote() for actor in self.actors])  # a model that cannot load fails before any shard
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _create_actors(config: RunConfig, locations: Locations) -> list[Any]:
        on_gpu = config.device.startswith("cuda")
        resource = "GPU" if on_gpu else "CPU"
        available = int(ray.cluster_resources().get(resource, 0))
        # By default one actor per GPU, or per CPU core: Ray runs each CPU actor's torch on the one core it
        # reserves, and separate processes scale where one process's threads do not (on 2 cores, 2 actors ran
        # the shards 2.3x faster than one local process on 2 threads). Each actor holds a model replica:
        # --ray-workers caps them where memory per core is short.
        count = config.ray_workers or available
        if not 0 < count <= available:  # actors beyond the cluster's resources would wait, and the run with them
            raise ConfigError(f"the Ray cluster has {available} {resource}(s); {max(count, 1)} Ray worker(s) on "
                              f"{resource} need one each")
        if on_gpu:  # Ray gives each actor one GPU, visible to it as its only CUDA device
            config = dataclasses.replace(config, device="cuda", devices=("cuda",))
        actor_class = ray.remote(ShardActor).options(
            **({"num_gpus": 1} if on_gpu else {"num_cpus": 1}), max_restarts=-1, max_task_retries=SHARD_RETRIES
        )
        return [actor_class.remote(config, locations) for _ in range(count)]

    def run(self, shards: list[Shard]) -> Iterator[ShardStats]:
        waiting = deque(shards)
        running: dict[Any, Any] = {}  # shard result -> the actor running it

        def hand_out(actor: Any) -> None:
            if waiting:
                running[actor.run_shard.remote(waiting.popleft())] = actor

        for actor in self.actors:
            for _ in range(SHARDS_PER_ACTOR):
                hand_out(actor)
        while running:
            [finished], _ = ray.wait(list(running), num_returns=1)
            hand_out(running.pop(finished))  # before yielding: the actor goes on while the driver records
            yield _get(finished)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)  # a shard in progress is abandoned; the rerun of the run redoes it
        self.actors = []
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False


def _get(refs: Any) -> Any:
    """`ray.get`, with a user's error from an actor (bad model, unreadable input) raised as itself: the CLI
    prints it in one line, not inside Ray's remote traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, (CapfiltError, OSError)):
            raise error.cause from None
        raise

