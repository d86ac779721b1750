"""capfilt: BLIP's CapFilt (caption and filter) over web-scale image-text datasets.

`capfilt.run(input, output, command=..., **options)` is the entry point the CLI, the tests and the benchmarks
call (see `capfilt.api`); importing capfilt loads neither torch nor transformers.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def run(input: str, output: str, command: str = "bootstrap", **options: Any) -> Any:
    """See `capfilt.api.run`."""
    from capfilt.api import run as run_job

    return run_job(input, output, command, **options)
