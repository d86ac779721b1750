"""WebDataset shards: tar files whose members `KEY.ext` are grouped into samples by key.

This is img2dataset's default output (`KEY.jpg`, `KEY.txt`, `KEY.json`, with a metadata `.parquet` and
`_stats.json` beside each tar). The key is the member path up to the first dot of its basename, as in the
webdataset library. The member helpers here are shared with the `files` format, whose samples are the same
members stored as separate files.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from fsspec import AbstractFileSystem

from capfilt.errors import ShardReadError
from capfilt.formats.base import Format, Shard, ShardWriter, TableLayout, restore_fields, temporary_path
from capfilt.formats.metadata import MetadataShardWriter, metadata_path
from capfilt.formats.tar_io import TarMemberWriter, iter_members
from capfilt.sample import Reject, Sample
from capfilt.schema import capfilt_fields, kept_captions, primary_caption

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff", "tif")

_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
# JSON whose text holds neither a \uDxxx escape nor UTF-8-encoded surrogates (which json.loads lets through)
# decodes to text without lone surrogates: only other JSON pays for the check that it can be written back.
_MAY_HOLD_SURROGATES = re.compile(rb"\\[uU][dD]|\xed[\xa0-\xbf]")


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member name by the webdataset convention; None for a name with no dot."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2)) if match else None


def sample_from_members(
    key: str, members: dict[str, bytes], caption_column: str | None = None, image_column: str | None = None
) -> Sample | Reject:
    """Build a sample from its members (extension -> bytes, in stored order).

    The image is the `image_column` member if given, else the first member with an image extension; the
    caption is the `caption_column` member if given, else `.txt`; `.json` becomes the metadata. Every other
    member is kept in `extra_members`, a `caption_column` member too; `.txt` never is, since a writer
    replaces it with the primary caption. Extensions compare case-insensitively but are kept as stored.
    """
    by_lower: dict[str, str] = {}
    for ext in members:
        by_lower.setdefault(ext.lower(), ext)
    if image_column is not None:
        image_ext = by_lower.get(image_column.lower())
    else:
        image_ext = next((ext for ext in members if ext.lower() in IMAGE_EXTS), None)
    if image_ext is None:
        return Reject(key, "missing_image", f"no image member among: {', '.join(members) or 'none'}")
    caption = None
    caption_ext = by_lower.get((caption_column or "txt").lower())
    if caption_ext is not None:
        try:
            caption = members[caption_ext].decode("utf-8")
        except UnicodeDecodeError as error:
            return Reject(key, "bad_caption", f".{caption_ext} is not UTF-8 text: {error}")
    metadata: Any = {}
    json_ext = by_lower.get("json")
    if json_ext is not None:
        try:
            metadata = json.loads(members[json_ext])
            if _MAY_HOLD_SURROGATES.search(members[json_ext]):  # a lone surrogate cannot be written back
                json.dumps(metadata, ensure_ascii=False).encode("utf-8")
        except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than Python's stack
            return Reject(key, "bad_json", f".{json_ext}: {error}")
        if not isinstance(metadata, dict):
            return Reject(key, "bad_json", f".{json_ext} holds a {type(metadata).__name__}, not an object")
    consumed = {image_ext, json_ext, by_lower.get("txt")}
    extra = {ext: data for ext, data in members.items() if ext not in consumed}
    sample = Sample(key, members[image_ext], image_ext, caption, metadata, extra)
    problem = restore_fields(sample)
    if problem:
        return Reject(key, "bad_json", f".{json_ext}: {problem}")
    return sample


def sample_members(sample: Sample) -> list[tuple[str, bytes]]:
    """The members a sample is written as: image bytes unchanged, `.txt` = primary caption (when there is
    one), `.json` = metadata then capfilt's fields, then the extra members unchanged."""
    if sample.image_bytes is None or not sample.image_ext:
        raise ValueError(f"sample {sample.key!r} has no image to write")
    members = [(sample.image_ext, sample.image_bytes)]
    kept = kept_captions(sample)
    caption = primary_caption(sample, kept)
    if caption is not None:
        members.append(("txt", caption.encode("utf-8")))
    members.append(("json", json_bytes({**sample.metadata, **capfilt_fields(sample, kept)})))
    taken = {sample.image_ext.lower(), "txt", "json"}
    members += [(ext, data) for ext, data in sample.extra_members.items() if ext.lower() not in taken]
    return members


def json_bytes(value: dict[str, Any]) -> bytes:
    """UTF-8 JSON of a metadata object, keys in their order. Values JSON lacks (from Parquet columns) are
    written as text: dates ISO 8601, bytes base64, anything else `str`."""
    return json.dumps(value, ensure_ascii=False, default=_json_default).encode("utf-8")


def _json_default(value: Any) -> str:
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)


class WebDatasetFormat(Format):
    name = "webdataset"
    suffixes = (".tar.gz", ".tgz", ".tar")

    def shard_from_path(self, path: str) -> Shard:
        name = _basename(path)
        for suffix in self.suffixes:
            if name.endswith(suffix):
                return Shard(path, name[: -len(suffix)])
        return Shard(path, name)

    def read_samples(
        self, fs: AbstractFileSystem, shard: Shard, caption_column: str | None, image_column: str | None
    ) -> Iterator[Sample | Reject]:
        """Stream the tar (one member in memory at a time), grouping consecutive members by key; a member
        whose extension the current group already has starts a new sample of the same key."""
        key, group = "", dict[str, bytes]()
        try:
            with fs.open(shard.path, "rb") as file:
                for name, data in iter_members(file):  # raises on a cut or corrupt tar, as tarfile does
                    parts = split_member_name(name)
                    if parts is None:
                        continue
                    member_key, ext = parts
                    if member_key != key or ext in group:
                        if group:
                            yield sample_from_members(key, group, caption_column, image_column)
                        key, group = member_key, {}
                    group[ext] = data
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            if group:
                yield Reject(key, "truncated_shard", "the shard ends or breaks inside this sample")
            raise ShardReadError(f"cannot read {shard.path} to its end: {error}") from error
        if group:
            yield sample_from_members(key, group, caption_column, image_column)

    def open_writer(
        self, fs: AbstractFileSystem, output_dir: str, shard_name: str, layout: TableLayout | None = None,
        metadata_schema: pa.Schema | None = None,
    ) -> ShardWriter:
        tar_path, parquet_path = self.output_paths(output_dir, shard_name)
        return MetadataShardWriter(TarShardWriter(fs, tar_path), fs, parquet_path, metadata_schema)

    def output_paths(self, output_dir: str, shard_name: str) -> list[str]:
        return [f"{output_dir}/{shard_name}.tar", metadata_path(output_dir, shard_name)]


class TarShardWriter(ShardWriter):
    """Writes `NAME.tar.<unique>.tmp` member by member and renames it to `NAME.tar` on commit.

    Members carry fixed metadata (mtime 0, mode 0644, no owner), so the same samples give the same bytes: those
    tarfile writes (`capfilt.formats.tar_io`, without its per-member overhead).
    """

    def __init__(self, fs: AbstractFileSystem, path: str) -> None:
        self._fs, self._path, self._tmp = fs, path, temporary_path(path)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self._file = fs.open(self._tmp, "wb")
        self._tar = TarMemberWriter(self._file)

    def write(self, sample: Sample) -> None:
        for ext, data in sample_members(sample):
            self._tar.write(f"{sample.key}.{ext}", data)

    def commit(self) -> None:
        self._tar.close()
        self._file.close()
        self._fs.mv(self._tmp, self._path)

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # the partial shard is discarded anyway
            self._tar.close()
        with contextlib.suppress(OSError):
            self._file.close()
        if self._fs.exists(self._tmp):
            self._fs.rm(self._tmp)


def list_files(fs: AbstractFileSystem, directory: str) -> list[str]:
    """Paths of the regular, non-hidden files directly in `directory`."""
    entries = fs.ls(directory, detail=True)
    return [e["name"] for e in entries if e["type"] == "file" and not _basename(e["name"]).startswith(".")]


def _basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/"))
