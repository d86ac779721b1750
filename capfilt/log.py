"""capfilt's own messages that are neither progress nor errors: which model is loading on which device, a
fast path switched off and why. They go to the `capfilt` logger; the CLI prints each record as one line on
stderr (a library user configures logging as they like)."""

from __future__ import annotations

import logging

logger = logging.getLogger("capfilt")
