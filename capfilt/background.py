"""Run the steps of a shard's pipeline side by side: each step in its own thread, a few batches ahead.

Reading and decoding the next batch, captioning the one before it and filtering the one before that then
overlap: the model steps release the GIL in their tensor operations, so on a machine with spare cores (or
a GPU kept busy from two threads) the slowest step alone sets the pace. Order is kept, and an exception
raised in a step reaches the consumer at its place in the sequence.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_END = object()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def in_background(items: Iterable[T], name: str, ahead: int = 2) -> Iterator[T]:
    """`items`, produced in a background thread up to `ahead` items before the consumer asks for them.
    When the consumer stops early, the producer stops too (and closes `items`)."""
    handoff: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if stop.is_set():
                    return
                handoff.put(item)
            handoff.put(_END)
        except BaseException as error:  # handed to the consumer, which decides what it means
            handoff.put(_Raised(error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while (item := handoff.get()) is not _END:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                handoff.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
