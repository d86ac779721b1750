"""Start-up checks of capfilt's fast paths against the library's own calls.

capfilt's fast paths (its own BLIP decoding loop, fused SDPA attention, the filter's shared image keys, the
table-driven image preprocessing) lean on details of transformers that a release may change. Each is checked
when a model loads, on a small probe (one picture, a few tokens, two captions), against what the library's
own call gives. A fast path that raises or differs is switched off for that model with one warning line that
names it and says why, and the run goes on through the library's path: a new release can cost speed, never
a run or a caption that differs from `generate()`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from capfilt.errors import one_line
from capfilt.log import logger


class FastPathMismatch(Exception):
    """A fast path gave something other than the library's call on the probe."""


def probe_picture() -> Image.Image:
    """A small fixed RGB picture (noise over a gradient): odd sizes, every channel value, no flat areas."""
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 53, dtype=np.float64)[None, :, None].repeat(37, axis=0).repeat(3, axis=2)
    noise = rng.integers(-60, 61, (37, 53, 3))
    return Image.fromarray(np.clip(gradient + noise, 0, 255).astype(np.uint8))


def failure(check: Callable[[], None]) -> str | None:
    """Why `check` failed, in a few words; None when it passed."""
    try:
        check()
    except Exception as error:  # noqa: BLE001  (whatever broke, the library's path still serves the run)
        return str(error) if isinstance(error, FastPathMismatch) else one_line(error)
    return None


def checked(fast_path: str, role: str, model_id: str, check: Callable[[], None]) -> bool:
    """Run `check`, which raises when `fast_path` is wrong for this model; on any failure, say so in one line
    and return False so that the caller uses the library's path."""
    reason = failure(check)
    if reason is not None:
        logger.warning("%s is off for the %s %s (%s); using the library's path", fast_path, role, model_id, reason)
    return reason is None


def same_tokens(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if actual.shape != expected.shape or not torch.equal(actual.cpu(), expected.cpu()):
        raise FastPathMismatch("its captions differ from generate() on a probe picture")


def tolerance(dtype: torch.dtype) -> float:
    """How far a fast path's floats may drift from the library's, relative to their size: float rounding in
    the precision the model runs in (fused kernels sum in another order)."""
    return 1e-4 if dtype == torch.float32 else 3e-2


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    actual, expected = actual.float().cpu(), expected.float().cpu()
    if actual.shape != expected.shape:
        raise FastPathMismatch(f"its {what} have shape {tuple(actual.shape)}, the library's {tuple(expected.shape)}")
    difference = (actual - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if not difference <= tolerance(dtype) * scale:  # also catches NaN
        raise FastPathMismatch(f"its {what} differ from the library's by {difference:.2g} on a probe")
