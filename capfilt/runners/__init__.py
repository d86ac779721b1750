"""Where shards run: in this process, in one process per device, or on a Ray cluster."""

from __future__ import annotations

from capfilt.config import RunConfig
from capfilt.observer import Observer
from capfilt.runners.base import Runner
from capfilt.runners.local import LocalRunner
from capfilt.runners.processes import DeviceRunner
from capfilt.worker import Locations

__all__ = ["DeviceRunner", "LocalRunner", "Runner", "make_runner"]


def make_runner(config: RunConfig, locations: Locations, observer: Observer) -> Runner:
    if config.ray_address:
        from capfilt.runners.ray import RayRunner  # Ray is an optional extra: capfilt[ray]

        return RayRunner(config, locations)
    if len(config.devices) > 1:
        return DeviceRunner(config, locations)
    return LocalRunner(config, locations, observer)
