"""Parquet shards: one row per sample, the image as bytes in a column.

Read: img2dataset's `parquet` output (columns key, caption, url, ..., `jpg` binary) and Hugging Face datasets
(an `image` struct column {bytes, path} and a `text` column). The image column is `image_column` if given,
else the first of jpg, png, webp, image; the caption column is `caption_column` if given, else the first of
caption, text, txt (a string column, or a binary one holding UTF-8 text); the key is the `key` column, else the
row index as 9 digits, and a row whose key an earlier row of the file has is a `duplicate_key` reject. Every
other column goes into `Sample.metadata`. Rows are read a batch at a time, never the whole file.

Write from a Parquet input (given its `TableLayout`): every input column with its exact type and the schema's
metadata, the image and the caption written back the same way (the caption as it came in: the primary caption
has a column of its own), a `key` column added when the input had none (so keys stay stable once rows are
dropped), then capfilt's columns (`capfilt.schema.arrow_fields`, `primary_caption` first).

Write from another format: columns `key`, the image column (`jpg`, `png` or `webp` after the first sample's
image type, else `image`), `caption` (the web caption, the `.txt` that came in),
`json` (the sample's whole JSON metadata as text: it may nest and
vary from sample to sample, which columns could not hold), `extra_members` (other members as
[{ext, data}], null when none), then capfilt's columns. The schema metadata key `capfilt` marks the `json` and
`extra_members` columns, so that reading the file back restores the same samples. An image read from Parquet
takes the extension its bytes show (so a `.jpeg` member comes back as `.jpg`).
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from capfilt.decode import sniff_image_ext
from capfilt.errors import ShardReadError
from capfilt.formats.base import Format, Shard, ShardWriter, TableLayout, restore_fields, temporary_path
from capfilt.formats.webdataset import IMAGE_EXTS, json_bytes
from capfilt.sample import Reject, Sample
from capfilt.schema import arrow_fields, arrow_values, is_capfilt_field, score_names

IMAGE_COLUMNS = ("jpg", "png", "webp", "image")
CAPTION_COLUMNS = ("caption", "text", "txt")
KEY_COLUMN = "key"
JSON_COLUMN = "json"
EXTRA_MEMBERS_COLUMN = "extra_members"
EXTRA_MEMBERS_TYPE = pa.list_(pa.struct([("ext", pa.string()), ("data", pa.binary())]))
CAPFILT_METADATA_KEY = b"capfilt"

_READ_BATCH_ROWS = 64
# Row groups of at most 256 rows or 64 MiB of images: small enough to stream, large enough to scan fast.
_ROW_GROUP_ROWS = 256
_ROW_GROUP_BYTES = 64 * 1024 * 1024


class ParquetFormat(Format):
    name = "parquet"
    suffixes = (".parquet",)

    def shard_from_path(self, path: str) -> Shard:
        name = posixpath.basename(path)
        return Shard(path, name.removesuffix(".parquet"))

    def table_layout(
        self,
        fs: AbstractFileSystem,
        shard: Shard,
        caption_column: str | None = None,
        image_column: str | None = None,
    ) -> TableLayout:
        try:
            with fs.open(shard.path, "rb") as file:
                schema = pq.ParquetFile(file).schema_arrow
        except (pa.ArrowException, OSError, UnicodeDecodeError) as error:  # a corrupt footer's names may not be text
            raise ShardReadError(f"cannot read {shard.path} as Parquet: {error}") from error
        return layout_of(schema, shard.path, caption_column, image_column)

    def metadata_schema(self, fs: AbstractFileSystem, shard: Shard) -> pa.Schema | None:
        """The shard's own columns: a tar or folder output's metadata Parquet keeps their types."""
        from capfilt.formats.metadata import read_metadata_schema

        return read_metadata_schema(fs, shard.path)

    def expected_samples(self, fs: AbstractFileSystem, shard: Shard) -> int | None:
        """The row count in the file's footer: one read of the footer, none of the data."""
        try:
            with fs.open(shard.path, "rb") as file:
                return pq.ParquetFile(file).metadata.num_rows
        except (pa.ArrowException, OSError, UnicodeDecodeError):
            return None

    def read_samples(
        self, fs: AbstractFileSystem, shard: Shard, caption_column: str | None, image_column: str | None
    ) -> Iterator[Sample | Reject]:
        try:
            with fs.open(shard.path, "rb") as file:
                parquet = pq.ParquetFile(file)
                layout = layout_of(parquet.schema_arrow, shard.path, caption_column, image_column)
                index = 0
                # Batches stay within a row group, so a corrupt group loses none of the rows before it.
                for group in range(parquet.num_row_groups):
                    for batch in parquet.iter_batches(batch_size=_READ_BATCH_ROWS, row_groups=[group]):
                        for row in batch.to_pylist():
                            yield sample_from_row(row, index, layout)
                            index += 1
        except (pa.ArrowException, OSError, UnicodeDecodeError) as error:
            raise ShardReadError(f"cannot read {shard.path} as Parquet: {error}") from error

    def open_writer(
        self, fs: AbstractFileSystem, output_dir: str, shard_name: str, layout: TableLayout | None = None,
        metadata_schema: pa.Schema | None = None,
    ) -> ShardWriter:
        return ParquetShardWriter(fs, self.output_paths(output_dir, shard_name)[0], layout)

    def output_paths(self, output_dir: str, shard_name: str) -> list[str]:
        return [f"{output_dir}/{shard_name}.parquet"]


def layout_of(
    schema: pa.Schema, path: str, caption_column: str | None = None, image_column: str | None = None
) -> TableLayout:
    """Find the image, caption and key columns of a Parquet schema (see the module doc for the rules)."""
    names = schema.names
    listing = ", ".join(names)
    if image_column is not None and image_column not in names:
        raise ShardReadError(f"{path} has no column {image_column!r} (its columns: {listing})")
    image = image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
    if image is None:
        raise ShardReadError(
            f"{path} has no image column: looked for {', '.join(IMAGE_COLUMNS)}; its columns: {listing}"
            " (name one with --image-column)"
        )
    image_type = schema.field(image).type
    if not (_is_binary(image_type) or _is_image_struct(image_type)):
        raise ShardReadError(f"{path}: image column {image!r} is {image_type}, not binary or a {{bytes, path}} struct")
    if caption_column is not None and caption_column not in names:
        raise ShardReadError(f"{path} has no column {caption_column!r} (its columns: {listing})")
    caption = caption_column or next((c for c in CAPTION_COLUMNS if c in names), None)
    marks = _capfilt_marks(schema)
    return TableLayout(
        schema=schema,
        image_column=image,
        caption_column=caption,
        key_column=KEY_COLUMN if KEY_COLUMN in names else None,
        json_column=marks.get("json_column") if marks.get("json_column") in names else None,
        extra_members_column=marks.get("extra_members_column") if marks.get("extra_members_column") in names else None,
    )


def _capfilt_marks(schema: pa.Schema) -> dict[str, Any]:
    """The column roles capfilt recorded in the schema metadata of a Parquet file it wrote ({} if none)."""
    try:
        marks = json.loads((schema.metadata or {}).get(CAPFILT_METADATA_KEY, b"{}"))
    except (ValueError, RecursionError):
        return {}
    return marks if isinstance(marks, dict) else {}


def sample_from_row(row: dict[str, Any], index: int, layout: TableLayout) -> Sample | Reject:
    """A sample from one row (column name -> Python value)."""
    raw_key = row.get(layout.key_column) if layout.key_column else None
    key = str(raw_key) if raw_key is not None else f"{index:09d}"
    image = row[layout.image_column]
    image_fields = None
    if isinstance(image, dict):
        image_fields = {name: value for name, value in image.items() if name != "bytes"}
        image = image.get("bytes")
    if image is None:
        status = ": ".join(str(row[c]) for c in ("status", "error_message") if row.get(c) is not None)
        return Reject(
            key, "missing_image", f"no image bytes in column {layout.image_column}" + (f" ({status})" if status else "")
        )
    caption = row.get(layout.caption_column) if layout.caption_column else None
    if isinstance(caption, bytes):  # a binary caption column holds UTF-8 text (written back as binary)
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as error:
            return Reject(key, "bad_caption", f"column {layout.caption_column} is not UTF-8 text: {error}")
    if caption is not None and not isinstance(caption, str):
        return Reject(key, "bad_caption", f"column {layout.caption_column} holds a {type(caption).__name__}")
    metadata: dict[str, Any] = {}
    extra: dict[str, bytes] = {}
    for name, value in row.items():
        if name in (layout.key_column, layout.caption_column):
            continue
        if name == layout.image_column:
            if image_fields is not None:
                metadata[name] = image_fields  # e.g. Hugging Face's {"path": ...}, written back beside the bytes
        elif name == layout.json_column:
            try:
                fields = json.loads(value) if value else {}
                json.dumps(fields, ensure_ascii=False).encode("utf-8")  # an escaped lone surrogate cannot be written
            except (ValueError, RecursionError) as error:
                return Reject(key, "bad_json", f"column {name}: {error}")
            if not isinstance(fields, dict):
                return Reject(key, "bad_json", f"column {name} holds a {type(fields).__name__}, not an object")
            metadata.update(fields)
        elif name == layout.extra_members_column:
            extra = {member["ext"]: member["data"] for member in value or []}
        else:
            metadata[name] = value
    sample = Sample(key, image, _image_ext(image, layout.image_column, image_fields), caption, metadata, extra)
    problem = restore_fields(sample)
    if problem:
        return Reject(key, "bad_json", f"capfilt columns: {problem}")
    return sample


def _image_ext(data: bytes, column: str, fields: dict[str, Any] | None) -> str:
    """The extension the bytes show, else the column's name, else the struct's path's, else jpg."""
    sniffed = sniff_image_ext(data)
    if sniffed:
        return sniffed
    if column in IMAGE_EXTS:
        return column
    path = (fields or {}).get("path")
    if isinstance(path, str) and "." in path and path.rsplit(".", 1)[1].lower() in IMAGE_EXTS:
        return path.rsplit(".", 1)[1].lower()
    return "jpg"


class ParquetShardWriter(ShardWriter):
    """Buffers rows and writes them as row groups of `NAME.parquet.<unique>.tmp`, renamed to `NAME.parquet` on commit.

    The schema is fixed when the first sample arrives (its image type names the image column when there is no
    input layout, its scores name the score columns: every sample of a run has the same), so the file is
    created then, or at commit for an empty shard.
    """

    def __init__(self, fs: AbstractFileSystem, path: str, layout: TableLayout | None) -> None:
        self._fs, self._path, self._tmp = fs, path, temporary_path(path)
        self._input_layout = layout
        self._layout: TableLayout | None = None
        self._scores: list[str] = []
        self._file: Any = None
        self._writer: pq.ParquetWriter | None = None
        self._rows: list[dict[str, Any]] = []
        self._buffered_bytes = 0

    def write(self, sample: Sample) -> None:
        if sample.image_bytes is None:
            raise ValueError(f"sample {sample.key!r} has no image to write")
        layout = self._open(sample)
        self._rows.append(_row(sample, layout, self._scores))
        self._buffered_bytes += len(sample.image_bytes)
        if len(self._rows) >= _ROW_GROUP_ROWS or self._buffered_bytes >= _ROW_GROUP_BYTES:
            self._flush()

    def commit(self) -> None:
        self._open(None)
        self._flush()
        assert self._writer is not None
        self._writer.close()
        self._file.close()
        self._fs.mv(self._tmp, self._path)

    def abort(self) -> None:
        with contextlib.suppress(OSError, pa.ArrowException):  # the partial shard is discarded anyway
            if self._writer is not None:
                self._writer.close()
        with contextlib.suppress(OSError):
            if self._file is not None:
                self._file.close()
        if self._fs.exists(self._tmp):
            self._fs.rm(self._tmp)

    def _open(self, first: Sample | None) -> TableLayout:
        if self._layout is None:
            self._scores = score_names(first) if first is not None else []
            if self._input_layout is not None:
                self._layout = _output_layout_from(self._input_layout, self._scores)
            else:
                self._layout = _output_layout_for(first.image_ext if first is not None else None, self._scores)
            self._fs.makedirs(posixpath.dirname(self._path), exist_ok=True)
            self._file = self._fs.open(self._tmp, "wb")
            self._writer = pq.ParquetWriter(self._file, self._layout.schema)
        return self._layout

    def _flush(self) -> None:
        if self._rows:
            assert self._writer is not None and self._layout is not None
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._layout.schema))
        self._rows, self._buffered_bytes = [], 0


def _output_layout_from(source: TableLayout, scores: list[str]) -> TableLayout:
    """The input's columns (earlier capfilt columns dropped), a key column when it lacked one, then capfilt's
    columns; Hugging Face features in the schema metadata get entries for the new columns."""
    fields = [field for field in source.schema if not is_capfilt_field(field.name)]
    added = [pa.field(KEY_COLUMN, pa.string())] if source.key_column is None else []
    added += arrow_fields(scores)
    metadata = _with_hf_features(source.schema.metadata, added)
    return TableLayout(
        schema=pa.schema(fields + added, metadata=metadata),
        image_column=source.image_column,
        caption_column=source.caption_column,
        key_column=KEY_COLUMN,
        json_column=source.json_column,
        extra_members_column=source.extra_members_column,
    )


def _output_layout_for(image_ext: str | None, scores: list[str]) -> TableLayout:
    """The layout of a Parquet output converted from webdataset or files samples."""
    ext = (image_ext or "jpg").lower()
    ext = "jpg" if ext == "jpeg" else ext
    image_column = ext if ext in IMAGE_COLUMNS[:-1] else IMAGE_COLUMNS[-1]
    fields = [
        pa.field(KEY_COLUMN, pa.string()),
        pa.field(image_column, pa.binary()),
        pa.field(CAPTION_COLUMNS[0], pa.string()),
        pa.field(JSON_COLUMN, pa.string()),
        pa.field(EXTRA_MEMBERS_COLUMN, EXTRA_MEMBERS_TYPE),
        *arrow_fields(scores),
    ]
    marks = {"json_column": JSON_COLUMN, "extra_members_column": EXTRA_MEMBERS_COLUMN}
    return TableLayout(
        schema=pa.schema(fields, metadata={CAPFILT_METADATA_KEY: json.dumps(marks).encode()}),
        image_column=image_column,
        caption_column=CAPTION_COLUMNS[0],
        key_column=KEY_COLUMN,
        json_column=JSON_COLUMN,
        extra_members_column=EXTRA_MEMBERS_COLUMN,
    )


def _row(sample: Sample, layout: TableLayout, scores: list[str]) -> dict[str, Any]:
    schema = layout.schema
    roles = {layout.image_column, layout.caption_column, layout.key_column, layout.json_column}
    roles.add(layout.extra_members_column)
    plain = [name for name in schema.names if name not in roles and not is_capfilt_field(name)]
    row = {name: sample.metadata.get(name) for name in plain}
    image_type = schema.field(layout.image_column).type
    if _is_image_struct(image_type):
        fields = sample.metadata.get(layout.image_column)
        row[layout.image_column] = {**(fields if isinstance(fields, dict) else {}), "bytes": sample.image_bytes}
    else:
        row[layout.image_column] = sample.image_bytes
    key_type = schema.field(layout.key_column).type if layout.key_column else None
    if layout.key_column:
        row[layout.key_column] = (
            int(sample.key) if key_type is not None and pa.types.is_integer(key_type) else sample.key
        )
    if layout.caption_column:
        row[layout.caption_column] = _caption_value(sample.web_caption, schema.field(layout.caption_column).type)
    if layout.json_column:
        rest = {name: value for name, value in sample.metadata.items() if name not in plain}
        row[layout.json_column] = json_bytes(rest).decode("utf-8")
    if layout.extra_members_column:
        members = [{"ext": ext, "data": data} for ext, data in sample.extra_members.items()]
        row[layout.extra_members_column] = members or None
    row.update(arrow_values(sample, scores))
    return row


def _caption_value(caption: str | None, column_type: pa.DataType) -> str | bytes | None:
    """The caption as its column held it: a binary caption column holds UTF-8 text."""
    if caption is not None and _is_binary(column_type):
        return caption.encode("utf-8")
    return caption


def _with_hf_features(metadata: dict[bytes, bytes] | None, added: list[pa.Field]) -> dict[bytes, bytes] | None:
    """Add features for `added` to Hugging Face's schema metadata, which `datasets` checks against the
    columns (replacing an earlier run's, whose columns are written anew, last); metadata it cannot parse is
    left as it is."""
    if not metadata or b"huggingface" not in metadata:
        return metadata
    try:
        info = json.loads(metadata[b"huggingface"])
        features = info["info"]["features"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return metadata
    if not isinstance(features, dict):
        return metadata
    for field in added:
        features.pop(field.name, None)
        features[field.name] = _hf_feature(field.type)
    return {**metadata, b"huggingface": json.dumps(info).encode()}


def _hf_feature(arrow_type: pa.DataType) -> Any:
    """The `datasets` feature dict of a column type (lists as `[feature]`, which every version reads)."""
    if pa.types.is_list(arrow_type):
        return [_hf_feature(arrow_type.value_type)]
    if pa.types.is_struct(arrow_type):
        return {field.name: _hf_feature(field.type) for field in arrow_type}
    if pa.types.is_floating(arrow_type):
        dtype = f"float{arrow_type.bit_width}"  # Arrow calls float64 "double"
    else:
        dtype = "bool" if pa.types.is_boolean(arrow_type) else str(arrow_type)
    return {"dtype": dtype, "_type": "Value"}


def _is_binary(arrow_type: pa.DataType) -> bool:
    return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)


def _is_image_struct(arrow_type: pa.DataType) -> bool:
    return pa.types.is_struct(arrow_type) and arrow_type.get_field_index("bytes") >= 0
