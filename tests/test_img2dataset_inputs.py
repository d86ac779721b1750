"""capfilt's readers on datasets made by the real img2dataset (1.47.0), as users' data is made.

The fixtures in tests/data/img2dataset/ were downloaded by `img2dataset.download` from a local HTTP server
(see make_fixtures.py there, which says how to remake them): 12 URLs in two shards of 6, in each of the
`webdataset`, `parquet` and `files` output formats; one URL answers 404 (shard 00000), one serves HTML bytes
(shard 00001), so 10 samples were downloaded. The URL list had `url`, `caption` and `license` columns
(`license` saved with `save_additional_columns`); one caption is missing, one is non-ASCII.

`IMG2DATASET_METADATA_TYPES` records the columns and Arrow types of the metadata Parquet img2dataset writes
beside each shard, read from the real files, so that capfilt's own metadata can be compared against it.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capfilt.decode import decode_image, sniff_image_ext
from capfilt.formats import detect_format
from capfilt.paths import resolve_input
from capfilt.sample import Reject, Sample

FIXTURES = Path(__file__).parent / "data" / "img2dataset"
FORMAT_NAMES = ("webdataset", "parquet", "files")
SHARD_NAMES = ["00000", "00001"]

# The metadata Parquet beside each webdataset tar / files folder (`NNNNN.parquet`), in img2dataset's column
# order: first the URL list's columns (`save_additional_columns`, then caption, then url; their types are the
# URL list's own), then the columns img2dataset adds. One row per URL, failed downloads included (their
# width..exif and hash are null). The sizes are int32, not int64.
IMG2DATASET_METADATA_TYPES: dict[str, pa.DataType] = {
    "license": pa.string(),
    "caption": pa.string(),
    "url": pa.string(),
    "key": pa.string(),
    "status": pa.string(),
    "error_message": pa.string(),
    "width": pa.int32(),
    "height": pa.int32(),
    "original_width": pa.int32(),
    "original_height": pa.int32(),
    "exif": pa.string(),
    "sha256": pa.string(),
}
# img2dataset's `parquet` output: the same columns, then the image bytes in a column named after
# `encode_format`. There is no `txt` column: the caption is in `caption`.
IMG2DATASET_PARQUET_TYPES: dict[str, pa.DataType] = {**IMG2DATASET_METADATA_TYPES, "jpg": pa.binary()}


def _types(path: Path) -> dict[str, pa.DataType]:
    schema = pq.read_schema(path)
    return dict(zip(schema.names, schema.types, strict=True))


def _rows(output_format: str) -> list[dict[str, Any]]:
    """Every URL's row of img2dataset's Parquet for `output_format`, both shards, without the image bytes."""
    rows = []
    for shard in SHARD_NAMES:
        table = pq.read_table(FIXTURES / output_format / f"{shard}.parquet")
        rows += table.drop_columns([c for c in ("jpg",) if c in table.column_names]).to_pylist()
    return rows


def _stats(output_format: str, shard: str) -> dict[str, Any]:
    return json.loads((FIXTURES / output_format / f"{shard}_stats.json").read_text())


def _read(output_format: str) -> tuple[str, list[str], list[Sample | Reject], dict[str, Any]]:
    """(format name, shard names, every item read, the format and filesystem) through capfilt's own readers."""
    fs, fmt, shards = resolve_input(str(FIXTURES / output_format), None, {})
    items: list[Sample | Reject] = []
    for shard in shards:
        items += list(fmt.read_shard(fs, shard, None))
    return fmt.name, [shard.name for shard in shards], items, {"fs": fs, "format": fmt, "shards": shards}


@pytest.mark.parametrize("output_format", ["webdataset", "files"])
def test_metadata_parquet_has_the_recorded_columns_and_types(output_format):
    for shard in SHARD_NAMES:
        types = _types(FIXTURES / output_format / f"{shard}.parquet")
        assert list(types) == list(IMG2DATASET_METADATA_TYPES)
        assert types == IMG2DATASET_METADATA_TYPES


def test_parquet_output_has_the_metadata_columns_then_the_image():
    for shard in SHARD_NAMES:
        types = _types(FIXTURES / "parquet" / f"{shard}.parquet")
        assert list(types) == list(IMG2DATASET_PARQUET_TYPES)
        assert types == IMG2DATASET_PARQUET_TYPES


def test_fixtures_are_what_make_fixtures_describes():
    for output_format in FORMAT_NAMES:
        rows = _rows(output_format)
        assert len(rows) == 12
        by_status: dict[str, list[str]] = {}
        for row in rows:
            by_status.setdefault(row["status"], []).append(row["key"])
        assert {status: len(keys) for status, keys in by_status.items()} == {
            "success": 10,
            "failed_to_download": 1,
            "failed_to_resize": 1,
        }
        failed = {row["key"]: row["error_message"] for row in rows if row["status"] != "success"}
        assert failed == {"000003": "HTTP Error 404: File not found", "000013": "Image decoding error"}
        captions = {row["caption"] for row in rows}
        assert {"café à Paris", "IMG_2031.JPG", "red circle on white", None} <= captions
        assert sum(_stats(output_format, shard)["successes"] for shard in SHARD_NAMES) == 10
        for shard in SHARD_NAMES:
            stats = _stats(output_format, shard)
            assert stats["count"] == 6
            assert stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"] == 6
        # no run-level JSON beside the shards, only the per-shard stats
        assert sorted(p.name for p in (FIXTURES / output_format).glob("*.json")) == [
            f"{shard}_stats.json" for shard in SHARD_NAMES
        ]


@pytest.mark.parametrize("output_format", ["webdataset", "files"])
def test_json_sidecar_holds_the_metadata_row(output_format):
    """Each sample's `.json` is the sample's row of the metadata Parquet: the same keys in the same order
    (url-list columns, key, status, error_message, sizes, exif as a JSON string, sha256 of the downloaded
    bytes), written with `json.dumps(meta, indent=4)`."""
    rows = {row["key"]: row for row in _rows(output_format)}
    sidecars: dict[str, bytes] = {}
    if output_format == "webdataset":
        for shard in SHARD_NAMES:
            with tarfile.open(FIXTURES / "webdataset" / f"{shard}.tar") as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        sidecars[member.name.removesuffix(".json")] = tar.extractfile(member).read()
    else:
        for path in (FIXTURES / "files").glob("*/*.json"):
            sidecars[path.stem] = path.read_bytes()
    assert sorted(sidecars) == sorted(key for key, row in rows.items() if row["status"] == "success")
    for key, raw in sidecars.items():
        sidecar = json.loads(raw)
        assert list(sidecar) == list(IMG2DATASET_METADATA_TYPES)
        assert sidecar == rows[key]
        assert raw.startswith(b'{\n    "license": ')  # indent=4, ASCII-escaped (json.dumps defaults)
        assert raw.isascii()
        assert isinstance(json.loads(sidecar["exif"]), dict)
        assert sidecar["width"] == sidecar["height"] == 64


@pytest.mark.parametrize("output_format", FORMAT_NAMES)
def test_capfilt_detects_the_format(output_format):
    fs, fmt, shards = resolve_input(str(FIXTURES / output_format), None, {})
    assert fmt.name == output_format
    assert detect_format(fs, str(FIXTURES / output_format)).name == output_format
    assert [shard.name for shard in shards] == SHARD_NAMES


@pytest.mark.parametrize("output_format", FORMAT_NAMES)
def test_capfilt_reads_every_downloaded_sample(output_format):
    name, shard_names, items, _ = _read(output_format)
    assert name == output_format
    rows = {row["key"]: row for row in _rows(output_format)}
    successes = {key: row for key, row in rows.items() if row["status"] == "success"}
    samples = [item for item in items if isinstance(item, Sample)]
    rejects = [item for item in items if isinstance(item, Reject)]

    assert len(samples) == sum(_stats(output_format, shard)["successes"] for shard in shard_names)
    assert sorted(sample.key for sample in samples) == sorted(successes)
    for sample in samples:
        row = successes[sample.key]
        # img2dataset writes a missing caption as an empty `.txt` (webdataset, files) but as null (Parquet)
        expected_caption = row["caption"] if output_format == "parquet" or row["caption"] is not None else ""
        assert sample.web_caption == expected_caption, sample.key
        assert sample.metadata["license"] == row["license"], sample.key  # the save_additional_columns column
        assert sample.metadata["url"] == row["url"]
        assert sample.metadata["status"] == "success"
        assert sample.metadata["sha256"] == row["sha256"]
        assert sample.image_ext == "jpg"
        assert sniff_image_ext(sample.image_bytes) == "jpg"
        assert sample.extra_members == {}
        if output_format == "parquet":  # the key and caption columns are the sample's key and caption
            assert "key" not in sample.metadata and "caption" not in sample.metadata
        else:  # the `.json` sidecar is kept whole
            assert sample.metadata == row

    if output_format == "parquet":
        # A failed download is a row without image bytes: a `missing_image` reject that says why.
        failed = {key: row for key, row in rows.items() if row["status"] != "success"}
        assert sorted(reject.key for reject in rejects) == sorted(failed)
        for reject in rejects:
            assert reject.reason == "missing_image"
            assert failed[reject.key]["status"] in reject.detail
            assert failed[reject.key]["error_message"] in reject.detail
    else:
        assert rejects == []


def test_captions_and_licenses_agree_across_formats():
    seen = {}
    for output_format in FORMAT_NAMES:
        _, _, items, _ = _read(output_format)
        seen[output_format] = {
            item.key: (item.web_caption or None, item.metadata["license"], item.metadata["url"])
            for item in items
            if isinstance(item, Sample)
        }
    assert seen["webdataset"] == seen["parquet"] == seen["files"]
    by_url = {url.rsplit("/", 1)[1]: (caption, lic) for caption, lic, url in seen["files"].values()}
    assert by_url["cafe_paris.jpg"] == ("café à Paris", "CC BY-SA 2.0")
    assert by_url["IMG_2031.JPG"] == ("IMG_2031.JPG", "unknown")
    assert by_url["logo_transparent.png"] == ("blue square logo", None)
    assert by_url["grey.jpg"] == (None, "CC BY 4.0")


@pytest.mark.parametrize("output_format", FORMAT_NAMES)
def test_image_bytes_are_read_unchanged(output_format):
    _, _, items, _ = _read(output_format)
    samples = {item.key: item for item in items if isinstance(item, Sample)}
    stored: dict[str, bytes] = {}
    if output_format == "webdataset":
        for shard in SHARD_NAMES:
            with tarfile.open(FIXTURES / "webdataset" / f"{shard}.tar") as tar:
                for member in tar:
                    if member.name.endswith(".jpg"):
                        stored[member.name.removesuffix(".jpg")] = tar.extractfile(member).read()
    elif output_format == "files":
        stored = {path.stem: path.read_bytes() for path in (FIXTURES / "files").glob("*/*.jpg")}
    else:
        for shard in SHARD_NAMES:
            table = pq.read_table(FIXTURES / "parquet" / f"{shard}.parquet", columns=["key", "jpg"])
            stored.update({row["key"]: row["jpg"] for row in table.to_pylist() if row["jpg"] is not None})
    assert {key: sample.image_bytes for key, sample in samples.items()} == stored


@pytest.mark.parametrize("output_format", FORMAT_NAMES)
def test_images_decode_to_rgb_at_the_download_size(output_format):
    """Among them a CMYK JPEG, an RGBA PNG (img2dataset mats it on white) and a grey PNG (which img2dataset
    re-encodes as a one-channel JPEG)."""
    _, _, items, _ = _read(output_format)
    for item in items:
        if isinstance(item, Sample):
            image = decode_image(item.image_bytes)
            assert (image.mode, image.size) == ("RGB", (64, 64)), item.key


@pytest.mark.parametrize("output_format", FORMAT_NAMES)
def test_expected_samples_before_reading(output_format):
    """The count a progress bar is given: img2dataset's `successes` for tars and folders (from the stats);
    for Parquet the footer's row count, which includes the failed downloads' rows."""
    _, _, _, opened = _read(output_format)
    fmt, fs = opened["format"], opened["fs"]
    for shard in opened["shards"]:
        stats = _stats(output_format, shard.name)
        expected = stats["count"] if output_format == "parquet" else stats["successes"]
        assert fmt.expected_samples(fs, shard) == expected
