"""Errors a user can act on. The CLI prints a `CapfiltError` as its one-line message, without a traceback."""

from __future__ import annotations


def one_line(error: BaseException) -> str:
    """An exception told in one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class CapfiltError(Exception):
    """A failure caused by the input, the output or the settings, told in one line."""


class InputError(CapfiltError):
    """The input cannot be used at all: missing path, empty pattern, unknown or undetectable format."""


class OutputError(CapfiltError):
    """The output location cannot be written (e.g. it is an existing file, not a directory)."""


class ShardReadError(CapfiltError):
    """A shard could not be read to its end (corrupt, truncated, or lacking a required column)."""


class DecodeError(Exception):
    """One image could not be decoded; the sample becomes `Reject(key, reason, detail)`.

    `reason` is a short snake_case code (`empty_image`, `undecodable_image`, `image_too_large`) that reports
    can count; `detail` is the human-readable specifics.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ModelLoadError(CapfiltError):
    """A model or processor cannot be loaded (unknown id, no network, bad directory)."""


class ConfigError(CapfiltError):
    """Settings that contradict each other or are out of range."""


class RunError(CapfiltError):
    """A run stopped by a failure beyond any one shard: a worker process died, or shards failed one after
    another with the same error."""
