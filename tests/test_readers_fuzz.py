"""Property tests: whatever bytes a shard holds, reading it never crashes a run.

A reader may only yield `Sample`s and `Reject`s, then possibly raise `ShardReadError`; `decode_image` may only
return an RGB image or raise `DecodeError`. Any other exception would stop a whole run over one bad shard or
sample. For well-formed shards every key is accounted for, and no key is yielded as a sample twice.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from capfilt.decode import DecodeError, decode_image
from capfilt.errors import ShardReadError
from capfilt.formats import FORMATS, Format
from capfilt.formats.base import writable_text
from capfilt.formats.webdataset import split_member_name
from capfilt.sample import Reject, Sample
from capfilt.schema import KEPT, SYNTHETIC, WEB_CAPTION, WEB_KEPT, is_capfilt_field, web_score_field
from tests.datasets import encode_image, make_image

FS = LocalFileSystem()
FUZZ = settings(max_examples=120, deadline=2000, suppress_health_check=[HealthCheck.too_slow], database=None)

JPG = encode_image(make_image(16, 12, (200, 30, 30)))
PNG = encode_image(make_image(16, 12, (30, 30, 200)), "PNG")
IMAGES = [
    JPG,
    PNG,
    encode_image(make_image(16, 12).convert("P"), "GIF"),
    encode_image(make_image(16, 12), "WEBP"),
    encode_image(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"),
    encode_image(Image.new("I;16", (8, 8), 4000), "PNG"),
]
READER_REASONS = {
    "missing_image", "bad_caption", "bad_json", "truncated_shard", "duplicate_key", "bad_name", "unreadable_file"
}


@contextmanager
def folder() -> Iterator[Path]:
    """A fresh temporary folder per example (pytest's tmp_path is shared by all examples of a test)."""
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def read_all(fmt: Format, path: Path) -> tuple[list[Sample | Reject], ShardReadError | None]:
    """Everything the reader yields, and the `ShardReadError` it ended with (None when it read to the end).
    Any other exception fails the test."""
    shard = fmt.shard_from_path(str(path))
    items: list[Sample | Reject] = []
    try:
        fmt.table_layout(FS, shard)
        for item in fmt.read_shard(FS, shard, None):
            items.append(item)
    except ShardReadError as error:
        return items, error
    return items, None


def check_items(items: list[Sample | Reject]) -> None:
    """Yielded items are well formed: typed fields, known reasons, each key a sample at most once."""
    keys = []
    for item in items:
        assert isinstance(item, (Sample, Reject)), item
        assert isinstance(item.key, str)
        if isinstance(item, Reject):
            assert item.reason in READER_REASONS, item
        else:
            assert isinstance(item.image_bytes, bytes) and isinstance(item.image_ext, str)
            assert isinstance(item.metadata, dict)
            check_captions(item)
            keys.append(item.key)
    assert len(keys) == len(set(keys)), keys


def check_captions(sample: Sample) -> None:
    """The captions the models will get are text, their scores numbers, their decisions booleans."""
    assert sample.web_caption is None or isinstance(sample.web_caption, str), sample.web_caption
    for caption in sample.captions():
        assert isinstance(caption.text, str), caption
        assert isinstance(caption.scores, dict), caption
        assert all(isinstance(name, str) and isinstance(s, (int, float)) for name, s in caption.scores.items()), caption
        assert caption.kept is None or isinstance(caption.kept, bool), caption
        assert caption.decoding is None or isinstance(caption.decoding, dict), caption


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """One of `seeds` with a few bytes flipped, cut, inserted or deleted."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        operation = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        if operation == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif operation == "cut":
            del data[at:]
        elif operation == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


# --- webdataset -----------------------------------------------------------------------------------------------


def tar_bytes(entries: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


SEED_TARS = [
    tar_bytes([("a.jpg", JPG), ("a.txt", b"a red square"), ("a.json", b'{"url": "x"}'), ("b.png", PNG)]),
    tar_bytes([("x/1.jpg", JPG), ("x/1.txt", "été".encode()), ("x/2.jpg", JPG), ("x/2.json", b"[1]")]),
]
# capfilt's own JSON fields, with the score fields of the BLIP and CLIP families.
CAPFILT_FIELDS = (WEB_CAPTION, *(web_score_field(name) for name in ("itm", "itc", "clip")), WEB_KEPT, SYNTHETIC, KEPT)
assert all(is_capfilt_field(name) for name in CAPFILT_FIELDS)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
# A sample's .json: any JSON, often an object holding capfilt's own fields with values of any type.
json_members = st.one_of(
    json_values.map(lambda value: json.dumps(value).encode()),
    st.dictionaries(st.sampled_from(CAPFILT_FIELDS), json_values, max_size=4).map(lambda d: json.dumps(d).encode()),
    st.lists(json_values, max_size=3).map(
        lambda texts: json.dumps({"synthetic_captions": [{"text": text} for text in texts]}).encode()
    ),
    st.just(b"[" * 100_000 + b"]" * 100_000),
)
member_data = st.one_of(
    st.binary(max_size=64), st.sampled_from(IMAGES), json_members, st.sampled_from([b"{}", b"caption"])
)
DATA_BY_EXT = {
    "jpg": st.sampled_from(IMAGES) | st.binary(max_size=64),
    "txt": st.text(max_size=20).map(str.encode) | st.binary(max_size=16),
    "json": json_members,
}


@st.composite
def tar_entries(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """Tar members: mostly samples (`KEY.EXT` members with data that fits each extension, keys often
    repeated), sometimes a member of any name and data."""
    entries = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 4)) == 0:
            entries.append((draw(st.text(min_size=1, max_size=24)), draw(member_data)))
            continue
        key = draw(st.sampled_from(["a", "b", "x/1", "000000001"]) | st.text(min_size=1, max_size=10))
        exts = draw(st.lists(st.sampled_from(["jpg", "JPG", "png", "txt", "json", "cls", "seg.png", ""]), min_size=1,
                             max_size=4, unique=True))
        entries += [(f"{key}.{ext}", draw(DATA_BY_EXT.get(ext.lower(), member_data))) for ext in exts]
    return entries


@FUZZ
@given(st.one_of(st.binary(max_size=2048), mutated(SEED_TARS)))
def test_webdataset_reader_survives_any_bytes(data: bytes) -> None:
    with folder() as directory:
        path = directory / "00000.tar"
        path.write_bytes(data)
        items, _ = read_all(FORMATS["webdataset"], path)
        check_items(items)


@FUZZ
@given(tar_entries())
def test_webdataset_reader_accounts_for_every_key_of_a_valid_tar(entries: list[tuple[str, bytes]]) -> None:
    with folder() as directory:
        path = directory / "00000.tar"
        path.write_bytes(tar_bytes(entries))
        with tarfile.open(path) as tar:  # the names as a tar reader sees them
            names = [member.name for member in tar if member.isfile()]
        items, error = read_all(FORMATS["webdataset"], path)
        assert error is None
        check_items(items)
        expected = {writable_text(parts[0]) for parts in map(split_member_name, names) if parts is not None}
        assert {item.key for item in items} == expected


@FUZZ
@given(tar_entries(), st.sampled_from(["webdataset", "parquet", "files"]))
def test_every_sample_read_can_be_written_and_read_back(entries: list[tuple[str, bytes]], target: str) -> None:
    """A sample that passed the reader cannot crash a writer or write outside the output folder."""
    with folder() as directory:
        path = directory / "00000.tar"
        path.write_bytes(tar_bytes(entries))
        samples = [item for item in read_all(FORMATS["webdataset"], path)[0] if isinstance(item, Sample)]
        if target == "files":  # a key with a slash names a sub-folder, which the files format does not read
            samples = [sample for sample in samples if "/" not in sample.key]
        fmt = FORMATS[target]
        with fmt.open_writer(FS, str(directory / "out"), "00000") as writer:
            for sample in samples:
                writer.write(sample)
        assert sorted(p.name for p in directory.iterdir()) == ["00000.tar", "out"]
        back, error = read_all(fmt, Path(fmt.output_paths(str(directory / "out"), "00000")[0]))
        assert error is None
        assert sorted(item.key for item in back if isinstance(item, Sample)) == sorted(s.key for s in samples)


# --- parquet --------------------------------------------------------------------------------------------------


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=2)
    return buffer.getvalue()


SEED_PARQUETS = [
    parquet_bytes(pa.table({"key": ["a", "b", "c"], "jpg": [JPG, None, PNG], "caption": ["x", None, "z"]})),
    parquet_bytes(pa.table({"image": [{"bytes": PNG, "path": "a.png"}], "text": ["t"]})),
]
image_cells = st.one_of(st.none(), st.binary(max_size=32), st.sampled_from(IMAGES))


@FUZZ
@given(st.one_of(st.binary(max_size=2048), mutated(SEED_PARQUETS)))
def test_parquet_reader_survives_any_bytes(data: bytes) -> None:
    with folder() as directory:
        path = directory / "00000.parquet"
        path.write_bytes(data)
        items, _ = read_all(FORMATS["parquet"], path)
        check_items(items)


@FUZZ
@given(
    st.lists(
        st.tuples(st.one_of(st.none(), st.text(max_size=8)), image_cells, st.one_of(st.none(), st.text(max_size=20))),
        max_size=10,
    ),
    st.sampled_from(["string", "binary"]),
)
def test_parquet_reader_accounts_for_every_row(rows: list[tuple[str | None, bytes | None, str | None]],
                                               caption_type: str) -> None:
    keys, images, captions = zip(*rows) if rows else ((), (), ())
    caption_values = [c.encode() if c is not None and caption_type == "binary" else c for c in captions]
    table = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "jpg": pa.array(images, pa.binary()),
            "caption": pa.array(caption_values, getattr(pa, caption_type)()),
        }
    )
    with folder() as directory:
        path = directory / "00000.parquet"
        path.write_bytes(parquet_bytes(table))
        items, error = read_all(FORMATS["parquet"], path)
        assert error is None
        check_items(items)
        assert len(items) == len(rows)
        for item, (key, image, caption) in zip(items, rows):
            assert key is None or item.key == key
            if image is None:
                assert isinstance(item, Reject) and item.reason == "missing_image"
            elif isinstance(item, Reject):  # a row with an image is a sample unless its key is bad or came earlier
                assert item.reason in ("duplicate_key", "bad_name"), item
            else:
                assert item.image_bytes == image and item.web_caption == caption


# --- files ----------------------------------------------------------------------------------------------------

# Names a filesystem accepts: no slash or NUL, not too long for ext4's 255 bytes.
file_names = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=20),
    st.builds(
        lambda stem, ext: f"{stem}.{ext}",
        st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=12),
        st.sampled_from(["jpg", "PNG", "txt", "json", "seg.png", "webp"]),
    ),
).filter(lambda name: name not in (".", "..") and len(name.encode("utf-8")) <= 255)


@FUZZ
@given(st.dictionaries(file_names, member_data, max_size=10), st.booleans())
def test_files_reader_accounts_for_every_file(files: dict[str, bytes], undecodable_name: bool) -> None:
    with folder() as directory:
        shard = directory / "00000"
        shard.mkdir()
        if undecodable_name:  # a name that is not UTF-8, as a Latin-1 system may write it
            files = {**files, os.fsdecode(b"caf\xe9.jpg"): JPG}
        written = []
        for name, data in files.items():
            try:
                (shard / name).write_bytes(data)
            except OSError:  # a name this filesystem refuses cannot be in a dataset
                continue
            written.append(writable_text(name))
        items, error = read_all(FORMATS["files"], shard)
        assert error is None
        check_items(items)
        keys = {item.key for item in items}
        for name in written:  # every visible file with a dot belongs to a sample or reject of its prefix key
            if "." in name and not name.startswith("."):
                assert any(name.startswith(key + ".") for key in keys), (name, keys)


# --- decode ---------------------------------------------------------------------------------------------------


@FUZZ
@given(st.one_of(st.binary(max_size=4096), mutated(IMAGES)))
def test_decode_image_returns_rgb_or_a_decode_error(data: bytes) -> None:
    try:
        image = decode_image(data)
    except DecodeError as error:
        assert error.reason in {"empty_image", "undecodable_image", "image_too_large"}
        return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0
