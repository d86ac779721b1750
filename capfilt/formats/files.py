"""Folders of image files with `KEY.txt` / `KEY.json` sidecars.

This is img2dataset's `files` output: one sub-folder per shard (`00000/000000001.jpg`, `.txt`, `.json`) with
`00000.parquet` and `00000_stats.json` beside it. A plain folder of images (captions optional) is read too:
the images directly in a folder form one shard named after the folder (`photos/` -> shard `photos`), and
each sub-folder holding images is a shard of its own name. Samples are read in sorted key order.

A sample's key is its image's name without the extension (`photo.2019.jpg` -> `photo.2019`); other files
`KEY.ext` belong to it, and an image named like another sample's member (`a.seg.png` beside `a.jpg`) is an
extra member of that sample, as the webdataset writer would have stored it.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator

import pyarrow as pa
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from capfilt.errors import ShardReadError
from capfilt.formats.base import Format, Shard, ShardWriter, TableLayout, temporary_path
from capfilt.formats.metadata import MetadataShardWriter, metadata_path
from capfilt.formats.webdataset import IMAGE_EXTS, list_files, sample_from_members, sample_members
from capfilt.sample import Reject, Sample

_DATA_FILE_SUFFIXES = (".parquet", ".tar", ".tar.gz", ".tgz")


class FilesFormat(Format):
    name = "files"

    def detect(self, fs: AbstractFileSystem, directory: str) -> bool:
        """Sub-folders of images, or images directly in `directory` when no Parquet/tar files sit there
        (so that a stray preview picture does not turn a Parquet dataset into an image folder)."""
        files = list_files(fs, directory)
        if any(_is_image(p) for p in files) and not any(p.endswith(_DATA_FILE_SUFFIXES) for p in files):
            return True
        return any(_has_images(fs, d) for d in _subdirectories(fs, directory))

    def list_shards(self, fs: AbstractFileSystem, directory: str) -> list[Shard]:
        shards = [self.shard_from_path(d) for d in _subdirectories(fs, directory) if _has_images(fs, d)]
        if _has_images(fs, directory):
            shards.append(self.shard_from_path(directory))
        return sorted(shards, key=lambda shard: shard.name)

    def shard_from_path(self, path: str) -> Shard:
        return Shard(path, posixpath.basename(path.rstrip("/")) or "00000")

    def read_samples(
        self, fs: AbstractFileSystem, shard: Shard, caption_column: str | None, image_column: str | None
    ) -> Iterator[Sample | Reject]:
        try:
            paths = list_files(fs, shard.path)
        except OSError as error:
            raise ShardReadError(f"cannot list {shard.path}: {error}") from error
        for key, members in group_files(paths):
            try:
                data = {ext: fs.cat_file(path) for ext, path in members.items()}
            except OSError as error:
                yield Reject(key, "unreadable_file", str(error))
                continue
            yield sample_from_members(key, data, caption_column, image_column)

    def open_writer(
        self, fs: AbstractFileSystem, output_dir: str, shard_name: str, layout: TableLayout | None = None,
        metadata_schema: pa.Schema | None = None,
    ) -> ShardWriter:
        folder, parquet_path = self.output_paths(output_dir, shard_name)
        return MetadataShardWriter(DirectoryShardWriter(fs, folder), fs, parquet_path, metadata_schema)

    def output_paths(self, output_dir: str, shard_name: str) -> list[str]:
        return [f"{output_dir}/{shard_name}", metadata_path(output_dir, shard_name)]


def group_files(paths: list[str]) -> list[tuple[str, dict[str, str]]]:
    """Group file paths into samples: (key, {extension: path}), sorted by key, members sorted by name.

    A file whose name extends no image's key still forms a sample keyed up to its first dot (it becomes a
    `missing_image` reject); a file without a dot in its name is ignored, as webdataset does.
    """
    names = {posixpath.basename(p): p for p in paths}
    stems = {name.rsplit(".", 1)[0] for name in names if _is_image(name)}
    keys = {stem for stem in stems if not any(prefix in stems for prefix in _dot_prefixes(stem))}
    groups: dict[str, dict[str, str]] = {}
    for name in sorted(names):
        if "." not in name:
            continue
        key = next((prefix for prefix in _dot_prefixes(name) if prefix in keys), name.split(".", 1)[0])
        groups.setdefault(key, {})[name[len(key) + 1 :]] = names[name]
    return sorted(groups.items())


def _dot_prefixes(name: str) -> list[str]:
    """`a.b.c` -> [`a`, `a.b`]: the names it extends at a dot."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_image(path: str) -> bool:
    name = posixpath.basename(path)
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTS


def _has_images(fs: AbstractFileSystem, directory: str) -> bool:
    return any(_is_image(p) for p in list_files(fs, directory))


def _subdirectories(fs: AbstractFileSystem, directory: str) -> list[str]:
    """Sub-folders that may be shards: not hidden, not a writer's unfinished `.tmp` folder."""
    entries = fs.ls(directory, detail=True)
    names = [e["name"] for e in entries if e["type"] == "directory"]
    return sorted(n for n in names if not posixpath.basename(n).startswith(".") and not n.endswith(".tmp"))


class DirectoryShardWriter(ShardWriter):
    """Writes the sample files into `NAME.<unique>.tmp/` and renames the folder to `NAME/` on commit.

    A committed folder of the same name (an earlier run's) is removed first; that swap is not atomic, but on a
    local disk a folder that exists under its final name is always complete. Object stores have no folders to
    rename: there the files are moved one by one (the shard's stats, written after, still mark it complete).
    """

    def __init__(self, fs: AbstractFileSystem, path: str) -> None:
        self._fs, self._path, self._tmp = fs, path, temporary_path(path)
        fs.makedirs(self._tmp, exist_ok=True)

    def write(self, sample: Sample) -> None:
        if "/" in sample.key:
            self._fs.makedirs(posixpath.dirname(f"{self._tmp}/{sample.key}"), exist_ok=True)
        for ext, data in sample_members(sample):
            self._fs.pipe_file(f"{self._tmp}/{sample.key}.{ext}", data)

    def commit(self) -> None:
        if self._fs.exists(self._path):
            self._fs.rm(self._path, recursive=True)
        if isinstance(self._fs, LocalFileSystem):
            self._fs.mv(self._tmp, self._path, recursive=True)
            return
        # Elsewhere file by file: fsspec's recursive move also copies an object store's pseudo-folders, and fails.
        sources = self._fs.find(self._tmp)
        self._fs.makedirs(self._path, exist_ok=True)  # where folders are real, an empty shard is an empty folder
        self._fs.mv(sources, [self._path + source[len(self._tmp) :] for source in sources])
        if self._fs.exists(self._tmp):  # the emptied folders, where folders are real
            self._fs.rm(self._tmp, recursive=True)

    def abort(self) -> None:
        if self._fs.exists(self._tmp):
            self._fs.rm(self._tmp, recursive=True)
