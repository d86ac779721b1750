"""The metadata Parquet beside each tar or folder output shard, as img2dataset writes one (`00000.parquet`
beside `00000.tar`): one row per written sample, so that scores can be studied with pyarrow, duckdb or pandas
without opening a tar, and `capfilt select --keep-top` reads the scores without touching an image.

Columns: the sample's metadata (its JSON sidecar: img2dataset's `key`, `url`, `caption`, `status`, ... and
any other), `key` and `caption` (the web caption as it came) when the sidecar lacks them, then capfilt's
columns (`capfilt.schema.arrow_fields`: `primary_caption`, `web_caption`, `web_NAME_score`, `web_kept`,
`synthetic_captions`, `kept_captions`). A column the input's own metadata Parquet has keeps that file's type
(img2dataset's sizes are int32); others take the type of their values, or JSON text when their values'
types differ from sample to sample.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from capfilt.formats.base import ShardWriter, temporary_path
from capfilt.sample import Sample
from capfilt.schema import arrow_fields, arrow_values, is_capfilt_field, score_names


def metadata_path(output_dir: str, shard_name: str) -> str:
    return f"{output_dir}/{shard_name}.parquet"


def read_metadata_schema(fs: AbstractFileSystem, path: str) -> pa.Schema | None:
    """The schema of the metadata Parquet at `path` (capfilt's own columns left out), or None without one."""
    try:
        if not fs.isfile(path):
            return None
        with fs.open(path, "rb") as handle:
            schema = pq.read_schema(handle)
    except (OSError, pa.ArrowException, UnicodeDecodeError):  # no usable metadata: the values' own types then
        return None
    return pa.schema([field for field in schema if not is_capfilt_field(field.name)])


class MetadataShardWriter(ShardWriter):
    """Writes a shard through `shard_writer` and its metadata Parquet beside it; the Parquet is committed
    right after the shard, so that a complete shard has both (its stats, written last, mark it complete)."""

    def __init__(self, shard_writer: ShardWriter, fs: AbstractFileSystem, path: str,
                 input_schema: pa.Schema | None) -> None:
        self._shard_writer = shard_writer
        self._fs, self._path = fs, path
        self._input_types = {field.name: field.type for field in input_schema or ()}
        self._rows: list[dict[str, Any]] = []
        self._scores: list[str] | None = None

    def write(self, sample: Sample) -> None:
        self._shard_writer.write(sample)
        if self._scores is None:  # every sample of a run has the same scores
            self._scores = score_names(sample)
        row = dict(sample.metadata)
        row.setdefault("key", sample.key)
        row.setdefault("caption", sample.web_caption)
        self._rows.append(row | arrow_values(sample, self._scores))

    def commit(self) -> None:
        self._shard_writer.commit()
        table = self._table()
        temporary = temporary_path(self._path)
        try:
            self._fs.makedirs(posixpath.dirname(self._path), exist_ok=True)
            with self._fs.open(temporary, "wb") as handle:
                pq.write_table(table, handle)
            self._fs.mv(temporary, self._path)
        except BaseException:
            with contextlib.suppress(OSError):
                if self._fs.exists(temporary):
                    self._fs.rm(temporary)
            raise

    def abort(self) -> None:
        self._shard_writer.abort()

    def _table(self) -> pa.Table:
        capfilt = arrow_fields(self._scores or [])
        capfilt_names = {field.name for field in capfilt}
        names = list(dict.fromkeys(name for row in self._rows for name in row if name not in capfilt_names))
        if not self._rows:
            names = [name for name in self._input_types if name not in capfilt_names] or ["key", "caption"]
        columns, fields = [], []
        for name in names:
            values = [row.get(name) for row in self._rows]
            array = _column(values, self._input_types.get(name))
            columns.append(array)
            fields.append(pa.field(name, array.type))
        for field in capfilt:
            columns.append(pa.array([row[field.name] for row in self._rows], type=field.type))
            fields.append(field)
        return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _column(values: list[Any], input_type: pa.DataType | None) -> pa.Array:
    """The column of `values`: of the input's type when it had one and the values fit it, else of the values'
    own type (text when all are null), else as JSON text."""
    if input_type is not None and not pa.types.is_null(input_type):
        with contextlib.suppress(pa.ArrowException, TypeError, ValueError, OverflowError):
            return pa.array(values, type=input_type)
    if all(value is None for value in values):
        return pa.array(values, type=pa.string())
    with contextlib.suppress(pa.ArrowException, TypeError, ValueError, OverflowError):
        array = pa.array(values)
        if _parquet_writable(array.type):
            return array
    return pa.array([None if value is None else json.dumps(value, ensure_ascii=False, default=str)
                     for value in values], type=pa.string())


def _parquet_writable(arrow_type: pa.DataType) -> bool:
    """Whether Parquet can store the type: not a struct without fields (`{}`), nor a null inside a nest."""
    if pa.types.is_struct(arrow_type):
        return arrow_type.num_fields > 0 and all(_parquet_writable(field.type) for field in arrow_type)
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return not pa.types.is_null(arrow_type.value_type) and _parquet_writable(arrow_type.value_type)
    return True
