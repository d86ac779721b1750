"""What every dataset format provides: list its shards, read one shard, write one shard atomically.

A format module (webdataset, parquet, files) keeps its reader and writer side by side. Shards are the unit
of work: one input shard gives one output shard of the same name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import pyarrow as pa
from fsspec import AbstractFileSystem

from capfilt.sample import Reject, Sample


@dataclass(frozen=True)
class Shard:
    """One input shard: its path on `fs` and the name its outputs take (`00000` for `00000.tar`)."""

    path: str
    name: str


@dataclass(frozen=True)
class TableLayout:
    """A Parquet input shard's Arrow schema and the role of its columns.

    A Parquet output given the layout of its input keeps every input column with its exact type (and the
    schema's metadata, e.g. Hugging Face features), writing the image and caption back into the same columns.
    `json_column` and `extra_members_column` are set only for Parquet that capfilt wrote from another format.
    """

    schema: pa.Schema
    image_column: str
    caption_column: str | None
    key_column: str | None
    json_column: str | None = None
    extra_members_column: str | None = None


_Writer = TypeVar("_Writer", bound="ShardWriter")


class ShardWriter(ABC):
    """Writes one output shard under a temporary name; `commit` moves it into place, `abort` removes it.

    Used as a context manager it commits when the block ends normally, and aborts when the block or the
    commit raises.
    """

    @abstractmethod
    def write(self, sample: Sample) -> None: ...

    @abstractmethod
    def commit(self) -> None: ...

    @abstractmethod
    def abort(self) -> None: ...

    def __enter__(self: _Writer) -> _Writer:  # noqa: PYI019  # typing.Self needs Python 3.11
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise


class Format(ABC):
    name: str
    # File name endings of this format's shards, longest first; empty for a format whose shards are folders.
    suffixes: tuple[str, ...] = ()

    @abstractmethod
    def detect(self, fs: AbstractFileSystem, directory: str) -> bool:
        """Whether `directory` holds a dataset in this format."""

    @abstractmethod
    def list_shards(self, fs: AbstractFileSystem, directory: str) -> list[Shard]:
        """The shards of a dataset directory, sorted by name."""

    @abstractmethod
    def shard_from_path(self, path: str) -> Shard:
        """A shard named by a path that a glob or brace pattern matched."""

    @abstractmethod
    def read_shard(
        self,
        fs: AbstractFileSystem,
        shard: Shard,
        caption_column: str | None,
        image_column: str | None = None,
    ) -> Iterator[Sample | Reject]:
        """Every sample of the shard, in order; what cannot become a sample is yielded as a `Reject`.

        `caption_column` / `image_column` override where the caption / image is found (a member extension
        for webdataset and files, a column for Parquet). A shard that cannot be read to its end raises
        `ShardReadError` after yielding what it could read.
        """

    def table_layout(
        self,
        fs: AbstractFileSystem,
        shard: Shard,
        caption_column: str | None = None,
        image_column: str | None = None,
    ) -> TableLayout | None:
        """The shard's Parquet layout, to give `open_writer` of a Parquet output; None for other formats."""
        return None

    @abstractmethod
    def open_writer(
        self, fs: AbstractFileSystem, output_dir: str, shard_name: str, layout: TableLayout | None = None
    ) -> ShardWriter:
        """A writer for the output shard `shard_name` in `output_dir`.

        `layout` is the input shard's `table_layout` (None when the input is not Parquet); only a Parquet
        writer uses it, to keep the input's columns.
        """

    @abstractmethod
    def output_paths(self, output_dir: str, shard_name: str) -> list[str]:
        """The paths a committed output shard occupies (to check completeness and clean up)."""
