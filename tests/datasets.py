"""Build real datasets on disk, laid out exactly as img2dataset (or Hugging Face) writes them, for tests.

Every builder takes `items`: a list of `(key, image, caption, extra)` tuples.

- `key`: the sample key (img2dataset writes zero-padded numbers such as `000000001`).
- `image`: a PIL image (encoded as JPEG), raw encoded bytes (written unchanged), or None for a failed download,
  which img2dataset records in its Parquet files but leaves out of tars and `files` folders.
- `caption`: the text, or None for a dataset downloaded without a caption column (then no `.txt` is written).
- `extra`: a dict merged into the sample's metadata after img2dataset's own fields (as `--save_additional_columns`
  does), or None.

Shards hold `samples_per_shard` items each (all in one shard by default) and are named `00000`, `00001`, ...
Builders return the paths of the shards they wrote, in order. Metadata follows img2dataset 1.47: url, caption,
the extra fields, key, status, error_message, width, height, original_width, original_height, exif, sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset
from PIL import Image

from capfilt.demo.examples import DOWNLOAD_FIELDS

ImageLike = Image.Image | bytes | None
Item = tuple[str, ImageLike, str | None, dict[str, Any] | None]


HF_FEATURES = {"image": {"_type": "Image"}, "text": {"dtype": "string", "_type": "Value"}}


def make_image(width: int = 32, height: int = 24, color: tuple[int, int, int] = (200, 40, 40)) -> Image.Image:
    """A plain RGB picture."""
    return Image.new("RGB", (width, height), color)


def encode_image(image: Image.Image, fmt: str = "JPEG", **save_options: Any) -> bytes:
    """`image` encoded in `fmt` (a Pillow format name)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_options)
    return buffer.getvalue()


def make_items(count: int, start: int = 0, captions: bool = True, extra: bool = False) -> list[Item]:
    """`count` distinct small JPEG samples keyed `000000000`, `000000001`, ... from `start`, captioned
    `a photo number N` when `captions`; `extra` adds an `{"aesthetic": N / 10}` field."""
    items: list[Item] = []
    for number in range(start, start + count):
        color = ((number * 37) % 256, (number * 91) % 256, (number * 53) % 256)
        caption = f"a photo number {number}" if captions else None
        items.append(
            (
                f"{number:09d}",
                encode_image(make_image(color=color)),
                caption,
                {"aesthetic": number / 10} if extra else None,
            )
        )
    return items


def image_bytes(image: ImageLike) -> bytes | None:
    """The bytes a builder stores for an item's image (JPEG for a PIL image)."""
    if isinstance(image, Image.Image):
        return encode_image(image)
    return image


def img2dataset_metadata(item: Item) -> dict[str, Any]:
    """The metadata img2dataset records for an item: its `.json` content and metadata Parquet row."""
    key, image, caption, extra = item
    data = image_bytes(image)
    try:
        size = Image.open(io.BytesIO(data)).size if data else (None, None)
    except OSError:  # bytes that are not an image (to test rejects) have no size
        size = (None, None)
    failed = data is None
    return {
        "url": f"http://127.0.0.1:8000/{key}.jpg",
        "caption": caption,
        **(extra or {}),
        "key": key,
        "status": "failed_to_download" if failed else "success",
        "error_message": "HTTP Error 404: Not Found" if failed else None,
        "width": size[0],
        "height": size[1],
        "original_width": size[0],
        "original_height": size[1],
        "exif": None if failed else "{}",
        "sha256": None if data is None else hashlib.sha256(data).hexdigest(),
    }


def shard_items(items: Sequence[Item], samples_per_shard: int | None = None) -> list[list[Item]]:
    """`items` cut into shards of `samples_per_shard` (one shard of all when None)."""
    size = samples_per_shard or max(len(items), 1)
    return [list(items[i : i + size]) for i in range(0, max(len(items), 1), size)]


def write_webdataset_shards(
    directory: str | Path,
    items: Sequence[Item],
    samples_per_shard: int | None = None,
    image_ext: str = "jpg",
    metadata_files: bool = True,
) -> list[Path]:
    """img2dataset's `webdataset` output: `00000.tar` with `KEY.<image_ext>`, `KEY.txt`, `KEY.json`
    (indented JSON), written by webdataset's TarWriter; with `metadata_files`, also img2dataset's
    `00000.parquet` (one metadata row per item, failed ones included) and `00000_stats.json` beside."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, shard in enumerate(shard_items(items, samples_per_shard)):
        path = directory / f"{index:05d}.tar"
        with webdataset.TarWriter(str(path)) as tar:
            for item in shard:
                data = image_bytes(item[1])
                if data is None:
                    continue
                sample = {
                    "__key__": item[0],
                    image_ext: data,
                    "json": json.dumps(img2dataset_metadata(item), indent=4).encode(),
                }
                if item[2] is not None:
                    sample["txt"] = item[2].encode("utf-8")
                tar.write(sample)
        if metadata_files:
            _write_metadata_files(directory, index, shard)
        paths.append(path)
    return paths


def write_parquet_shards(
    directory: str | Path, items: Sequence[Item], samples_per_shard: int | None = None, image_column: str = "jpg"
) -> list[Path]:
    """img2dataset's `parquet` output: `00000.parquet` with the metadata columns and the image as a binary
    `image_column` (null for failed downloads), written 100 rows per row group as img2dataset does."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, shard in enumerate(shard_items(items, samples_per_shard)):
        table = _metadata_table(shard)
        table = table.append_column(
            pa.field(image_column, pa.binary()), pa.array([image_bytes(i[1]) for i in shard], pa.binary())
        )
        path = directory / f"{index:05d}.parquet"
        pq.write_table(table, path, row_group_size=100)
        _write_stats(directory, index, shard)
        paths.append(path)
    return paths


def write_hf_parquet(directory: str | Path, items: Sequence[Item], name: str = "train-00000-of-00001.parquet") -> Path:
    """A Hugging Face `datasets` Parquet file: an `image` struct column {bytes, path} (path = `KEY.jpg`),
    a `text` caption column, the extra fields as columns, and the `huggingface` schema metadata that
    declares `image` an Image feature. There is no key column: readers key rows by index."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    images = [{"bytes": image_bytes(i[1]), "path": f"{i[0]}.jpg"} for i in items]
    columns: dict[str, list[Any]] = {"image": images, "text": [i[2] for i in items]}
    for item in items:
        for field in item[3] or {}:
            columns.setdefault(field, [])
    for field in list(columns)[2:]:
        columns[field] = [(i[3] or {}).get(field) for i in items]
    features = {
        **HF_FEATURES,
        **{f: {"dtype": str(pa.array(columns[f]).type), "_type": "Value"} for f in list(columns)[2:]},
    }
    table = pa.table(columns)
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    path = directory / name
    pq.write_table(table.replace_schema_metadata(metadata), path)
    return path


def write_files_dataset(
    directory: str | Path, items: Sequence[Item], samples_per_shard: int | None = None, image_ext: str = "jpg"
) -> list[Path]:
    """img2dataset's `files` output: a folder per shard (`00000/KEY.jpg`, `KEY.txt`, `KEY.json`) with
    `00000.parquet` and `00000_stats.json` beside it. Returns the shard folders."""
    directory = Path(directory)
    paths = []
    for index, shard in enumerate(shard_items(items, samples_per_shard)):
        folder = directory / f"{index:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for item in shard:
            data = image_bytes(item[1])
            if data is None:
                continue
            (folder / f"{item[0]}.{image_ext}").write_bytes(data)
            if item[2] is not None:
                (folder / f"{item[0]}.txt").write_text(item[2], encoding="utf-8")
            (folder / f"{item[0]}.json").write_text(json.dumps(img2dataset_metadata(item), indent=4), encoding="utf-8")
        _write_metadata_files(directory, index, shard)
        paths.append(folder)
    return paths


def _metadata_table(shard: Sequence[Item]) -> pa.Table:
    rows = [img2dataset_metadata(item) for item in shard]
    names = list(dict.fromkeys(name for row in rows for name in row))
    types = dict(DOWNLOAD_FIELDS)  # img2dataset's columns besides url, caption and extra ones
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        columns[name] = pa.array(values, types[name]) if name in types else pa.array(values)
    return pa.table(columns)


def _write_metadata_files(directory: Path, index: int, shard: Sequence[Item]) -> None:
    pq.write_table(_metadata_table(shard), directory / f"{index:05d}.parquet")
    _write_stats(directory, index, shard)


def _write_stats(directory: Path, index: int, shard: Sequence[Item]) -> None:
    successes = sum(image_bytes(i[1]) is not None for i in shard)
    stats = {
        "count": len(shard),
        "successes": successes,
        "failed_to_download": len(shard) - successes,
        "status_dict": {},
    }
    (directory / f"{index:05d}_stats.json").write_text(json.dumps(stats, indent=4))
