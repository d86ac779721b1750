"""What every dataset format provides: list its shards, read one shard, write one shard atomically.

A format module (webdataset, parquet, files) keeps its reader and writer side by side. Shards are the unit
of work: one input shard gives one output shard of the same name.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import pyarrow as pa
from fsspec import AbstractFileSystem

from capfilt.sample import Reject, Sample
from capfilt.schema import restore_capfilt_fields


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


def temporary_path(path: str) -> str:
    """Where to write `path` before moving it into place: unique to this writer, so that two attempts at one
    shard (a retry beside a lost node that still runs, two runs by mistake) never write the same file."""
    return f"{path}.{uuid.uuid4().hex[:12]}.tmp"


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


def restore_fields(sample: Sample) -> str | None:
    """Restore the capfilt fields an earlier run recorded in the sample's metadata (`restore_capfilt_fields`);
    what is wrong with them when they are malformed or not of the documented types (the sample is then a
    `bad_json` reject, since a caption that is not text would break the models), else None."""
    try:
        restore_capfilt_fields(sample)
    except (AttributeError, KeyError, TypeError, ValueError, RecursionError) as error:
        return f"malformed capfilt fields: {error!r}"
    if not isinstance(sample.web_caption, (str, type(None))):
        return f"web_caption is of type {type(sample.web_caption).__name__}, not text"
    scores = [(sample.web_scores, sample.web_kept, "web")]
    for caption in sample.synthetic_captions:
        if not isinstance(caption.text, str):
            return f"a synthetic caption's text is of type {type(caption.text).__name__}, not text"
        if not isinstance(caption.captioner, (str, type(None))) or not isinstance(caption.decoding, (dict, type(None))):
            return f"synthetic caption {caption.text!r} has a malformed captioner or decoding"
        if not isinstance(caption.count, int) or isinstance(caption.count, bool) or caption.count < 1:
            return f"synthetic caption {caption.text!r} has a count that is not a positive integer"
        scores.append((caption.scores, caption.kept, repr(caption.text)))
    for values, kept, name in scores:
        if not all(_is_score(score) for score in values.values()) or not isinstance(kept, (bool, type(None))):
            return f"caption {name} has scores or a decision of the wrong type"
    return None


def samples_in_stats(fs: AbstractFileSystem, path: str) -> int | None:
    """The sample count in a shard's stats file: img2dataset's `successes` (the samples its shard holds), or
    `written` by a capfilt run that finished the shard; None when the file is missing or says neither."""
    try:
        stats = json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None
    if not isinstance(stats, dict):
        return None
    count = stats.get("successes", None if stats.get("error") else stats.get("written"))
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


def _is_score(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


# Longest part of a key between slashes, in UTF-8 bytes: `KEY.ext` must fit a 255-byte file name.
MAX_KEY_PART_BYTES = 200


def checked_keys(items: Iterable[Sample | Reject]) -> Iterator[Sample | Reject]:
    """A shard's items as a reader yields them, with the samples no output can hold turned into rejects.

    A sample whose names cannot be written safely is a `bad_name` reject (see `name_problem`). A sample whose
    key an earlier sample of the shard already has is a `duplicate_key` reject: the first occurrence is the one
    processed, so an output shard never holds a key twice. A reader's own reject keeps its reason, its key and
    detail escaped where they are not UTF-8 text.
    """
    seen: set[str] = set()
    for item in items:
        if isinstance(item, Reject):
            yield Reject(writable_text(item.key), item.reason, writable_text(item.detail))
            continue
        problem = name_problem(item)
        if problem:
            yield Reject(writable_text(item.key), "bad_name", problem)
        elif item.key in seen:
            yield Reject(item.key, "duplicate_key", "an earlier sample of this shard has the same key")
        else:
            seen.add(item.key)
            yield item


def name_problem(sample: Sample) -> str | None:
    """Why the sample's key or member names cannot name files in every output format, else None.

    Keys become file names (`KEY.jpg` in a tar or a folder), and keys and extensions are written as UTF-8 text
    (rejects, Parquet), so: UTF-8 text without NUL; a relative path that stays inside the shard (not absolute,
    no `..` part) whose last part names visible files (not empty, no leading dot); each part short enough for
    a file name.
    """
    key = sample.key
    if not all(_is_text(name) for name in (key, *sample.extra_members)):
        return "the key or a member name is not UTF-8 text"
    if "\0" in key:
        return "the key holds a NUL character"
    parts = key.split("/")
    if key.startswith("/") or ".." in parts:
        return "the key leads out of the shard's folder (an absolute path or a '..' part)"
    if not parts[-1] or parts[-1].startswith("."):
        return "the key names no file or a hidden one (it is empty, ends with '/' or its last part starts with '.')"
    if any(len(part.encode("utf-8")) > MAX_KEY_PART_BYTES for part in parts):
        return f"a part of the key is longer than {MAX_KEY_PART_BYTES} bytes, too long for a file name"
    return None


def writable_text(text: str) -> str:
    """`text`, with the undecodable bytes a reader kept as surrogates written as `\\udcXX` escapes."""
    return text if _is_text(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_text(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def list_named(fs: AbstractFileSystem, directory: str, suffixes: tuple[str, ...]) -> list[str]:
    """Paths of the non-hidden entries directly in `directory` whose names end with one of `suffixes`: files,
    and anything else so named (a folder, a broken link), which then fails as a shard instead of vanishing."""
    paths = [entry["name"] for entry in fs.ls(directory, detail=True)]
    return [path for path in paths if (name := posixpath.basename(path.rstrip("/"))).endswith(suffixes)
            and not name.startswith(".")]


class Format(ABC):
    """A dataset format. Its shards are files named with one of `suffixes` (webdataset, Parquet), unless the
    format lists them its own way (image folders)."""

    name: str
    # File name endings of this format's shards, longest first; empty for a format whose shards are folders.
    suffixes: tuple[str, ...] = ()

    def detect(self, fs: AbstractFileSystem, directory: str) -> bool:
        """Whether `directory` holds a dataset in this format."""
        return bool(self.list_shards(fs, directory))

    def list_shards(self, fs: AbstractFileSystem, directory: str) -> list[Shard]:
        """The shards of a dataset directory, sorted by name."""
        paths = list_named(fs, directory, self.suffixes)
        return sorted((self.shard_from_path(path) for path in paths), key=lambda shard: shard.name)

    @abstractmethod
    def shard_from_path(self, path: str) -> Shard:
        """A shard named by a path that a glob or brace pattern matched."""

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
        `ShardReadError` after yielding what it could read. A sample whose key an earlier sample of the shard
        already has is a `duplicate_key` reject, one whose names no output could hold a `bad_name` reject
        (see `checked_keys`): every format gets these checks here, around its own `read_samples`.
        """
        return checked_keys(self.read_samples(fs, shard, caption_column, image_column))

    @abstractmethod
    def read_samples(
        self, fs: AbstractFileSystem, shard: Shard, caption_column: str | None, image_column: str | None
    ) -> Iterator[Sample | Reject]:
        """The format's own reading of a shard, before the key checks of `read_shard`."""

    def table_layout(
        self,
        fs: AbstractFileSystem,
        shard: Shard,
        caption_column: str | None = None,
        image_column: str | None = None,
    ) -> TableLayout | None:
        """The shard's Parquet layout, to give `open_writer` of a Parquet output; None for other formats."""
        return None

    def metadata_schema(self, fs: AbstractFileSystem, shard: Shard) -> pa.Schema | None:
        """The Arrow schema of the metadata Parquet beside the shard (img2dataset's), for an output's metadata
        columns to keep its types; None when there is none."""
        from capfilt.formats.metadata import read_metadata_schema

        folder = posixpath.dirname(shard.path.rstrip("/"))
        return read_metadata_schema(fs, posixpath.join(folder, f"{shard.name}.parquet"))

    def expected_samples(self, fs: AbstractFileSystem, shard: Shard) -> int | None:
        """How many samples the shard holds, when that is known without reading it (for a progress bar's
        total), else None: here from the `NAME_stats.json` beside it, as img2dataset and capfilt write it."""
        folder = posixpath.dirname(shard.path.rstrip("/"))
        return samples_in_stats(fs, posixpath.join(folder, f"{shard.name}_stats.json"))

    @abstractmethod
    def open_writer(
        self, fs: AbstractFileSystem, output_dir: str, shard_name: str, layout: TableLayout | None = None,
        metadata_schema: pa.Schema | None = None,
    ) -> ShardWriter:
        """A writer for the output shard `shard_name` in `output_dir`.

        `layout` is the input shard's `table_layout` (None when the input is not Parquet); only a Parquet
        writer uses it, to keep the input's columns. `metadata_schema` is the input's `metadata_schema`, whose
        types the metadata Parquet beside a tar or folder shard keeps.
        """

    @abstractmethod
    def output_paths(self, output_dir: str, shard_name: str) -> list[str]:
        """The paths a committed output shard occupies (to check completeness and clean up)."""
