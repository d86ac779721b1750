"""The dataset formats capfilt reads and writes, by name, and detection of a directory's format."""

from __future__ import annotations

from fsspec import AbstractFileSystem

from capfilt.errors import InputError
from capfilt.formats.base import Format, Shard, ShardWriter, TableLayout
from capfilt.formats.files import FilesFormat
from capfilt.formats.parquet import ParquetFormat
from capfilt.formats.webdataset import WebDatasetFormat

# Detection order: tars win over img2dataset's metadata .parquet beside them; image sub-folders win over the
# metadata .parquet beside img2dataset's `files` shards; Parquet comes last.
FORMATS: dict[str, Format] = {fmt.name: fmt for fmt in (WebDatasetFormat(), FilesFormat(), ParquetFormat())}

__all__ = ["FORMATS", "Format", "Shard", "ShardWriter", "TableLayout", "detect_format", "get_format"]


def get_format(name: str) -> Format:
    """The format called `name`, or an `InputError` listing the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise InputError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}") from None


def detect_format(fs: AbstractFileSystem, directory: str) -> Format:
    """The format of the dataset in `directory`, from its contents."""
    for fmt in FORMATS.values():
        if fmt.detect(fs, directory):
            return fmt
    entries = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(directory, detail=False))
    found = ", ".join(entries[:10]) + (", ..." if len(entries) > 10 else "") if entries else "nothing"
    raise InputError(
        f"no dataset recognised in {directory}: expected .tar shards (webdataset), .parquet files, or image files"
        f" (directly or in sub-folders); found {found}. Pass the folder that holds the shards, or a glob"
    )
