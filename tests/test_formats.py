"""Readers and writers of the three formats, on real shards built the way img2dataset writes them."""

from __future__ import annotations

import gzip
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset
from fsspec.implementations.local import LocalFileSystem

from capfilt.config import FilterMode
from capfilt.errors import ShardReadError
from capfilt.formats import FORMATS, Format, Shard
from capfilt.formats.files import group_files
from capfilt.keep import KeepRules
from capfilt.sample import Caption, Reject, Sample
from capfilt.schema import arrow_fields, kept_captions, primary_caption
from capfilt.stages import Batch, KeepStage
from capfilt.stats import ShardStats
from tests.datasets import (
    encode_image,
    img2dataset_metadata,
    make_image,
    make_items,
    write_files_dataset,
    write_hf_parquet,
    write_parquet_shards,
    write_webdataset_shards,
)

FS = LocalFileSystem()
JPG = encode_image(make_image(color=(10, 200, 30)))
PNG = encode_image(make_image(color=(30, 10, 200)), "PNG")
# The fields capfilt adds to a sample's JSON, in their documented order, for a run computing itm and itc.
CAPFILT_FIELDS = ["web_caption", "web_itm_score", "web_itc_score", "web_kept", "synthetic_captions", "kept_captions"]


def arrow_names(scores: list[str]) -> list[str]:
    """The Parquet columns capfilt adds for a run whose captions have the scores `scores`."""
    return [field.name for field in arrow_fields(scores)]


def read(
    fmt: Format, path: str | Path, caption_column: str | None = None, image_column: str | None = None
) -> list[Sample | Reject]:
    return list(fmt.read_shard(FS, fmt.shard_from_path(str(path)), caption_column, image_column))


def read_samples(
    fmt: Format, path: str | Path, caption_column: str | None = None, image_column: str | None = None
) -> list[Sample]:
    return samples_only(read(fmt, path, caption_column, image_column))


def samples_only(results: Iterable[Sample | Reject]) -> list[Sample]:
    """`results`, checked to hold no reject."""
    results = list(results)
    assert all(isinstance(result, Sample) for result in results), results
    return [result for result in results if isinstance(result, Sample)]


def shard_of(fmt: Format, directory: Path) -> Shard:
    [shard] = fmt.list_shards(FS, str(directory))
    return shard


def view(sample: Sample | Reject) -> dict:
    """Everything a sample carries into its output (the decoded image and the dropped flag do not)."""
    if isinstance(sample, Reject):
        return {"reject": sample.record()}
    return {
        "key": sample.key,
        "image_bytes": sample.image_bytes,
        "image_ext": sample.image_ext,
        "web_caption": sample.web_caption,
        "metadata": sample.metadata,
        "extra_members": sample.extra_members,
        "synthetic": sample.synthetic_captions,
        "web_scores": (sample.web_scores, sample.web_kept),
    }


def scored_samples() -> list[Sample]:
    """Samples after a caption + filter run: synthetic captions with scores and decoding settings, unicode,
    nested metadata, extra members, a PNG, a sample without web caption and a bare one."""
    scored = Sample(
        key="000000007",
        image_bytes=JPG,
        image_ext="jpg",
        web_caption="Café au lait ☕ on a table",
        metadata={"url": "http://x/7.jpg", "width": 32, "nested": {"a": [1, 2.5, None]}, "ok": True},
        extra_members={"cls": b"3", "seg.png": PNG},
        synthetic_captions=[
            Caption(
                "a cup of coffee", "synthetic", {"itm": 0.91, "itc": 0.33}, True, "blip-base",
                {"num_beams": 3, "max_new_tokens": 20}, 2
            ),
            Caption("a table", "synthetic", {"itm": 0.12, "itc": 0.05}, False, "blip-base", {"top_p": 0.9}),
        ],
        web_scores={"itm": 0.42, "itc": 0.21},
        web_kept=False,
    )
    synthetic_only = Sample(
        key="000000008",
        image_bytes=PNG,
        image_ext="png",
        web_caption=None,
        metadata={"url": "http://x/8.png"},
        synthetic_captions=[Caption("a blue square", "synthetic", captioner="blip-large", decoding=None)],
        web_scores={"itm": None, "itc": None},  # no web caption: a run computing itm and itc writes them null
    )
    bare = Sample(key="000000009", image_bytes=JPG, image_ext="jpg", web_caption="plain", metadata={})
    return [scored, synthetic_only, bare]


def write(fmt: Format, directory: Path, name: str, samples: list[Sample], layout=None) -> None:
    with fmt.open_writer(FS, str(directory), name, layout) as writer:
        for sample in samples:
            writer.write(sample)


# --- webdataset -------------------------------------------------------------------------------------------


def test_webdataset_reads_img2dataset_shards_in_order_with_every_field(tmp_path: Path) -> None:
    items = make_items(4, extra=True) + [("000000004", None, "failed", None)]
    [path] = write_webdataset_shards(tmp_path, items)
    samples = read_samples(FORMATS["webdataset"], path)
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002", "000000003"]
    for sample, item in zip(samples, items):
        assert sample.image_bytes == item[1] and sample.image_ext == "jpg"
        assert sample.web_caption == item[2]
        assert sample.metadata == img2dataset_metadata(item)
        assert sample.extra_members == {} and sample.synthetic_captions == []


def test_webdataset_rejects_what_cannot_be_a_sample_and_keeps_going(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    with webdataset.TarWriter(str(path)) as tar:
        tar.write({"__key__": "a", "jpg": JPG, "txt": b"fine"})
        tar.write({"__key__": "b", "txt": b"caption without image", "json": b"{}"})
        tar.write({"__key__": "c", "jpg": JPG, "json": b"{not json"})
        tar.write({"__key__": "d", "jpg": JPG, "json": b"[1, 2]"})
        tar.write({"__key__": "e", "jpg": JPG, "txt": b"\xff\xfe latin-1 \xe9"})
        tar.write({"__key__": "f", "png": PNG})
    samples = read(FORMATS["webdataset"], path)
    assert [(s.key, s.reason) if isinstance(s, Reject) else s.key for s in samples] == [
        "a",
        ("b", "missing_image"),
        ("c", "bad_json"),
        ("d", "bad_json"),
        ("e", "bad_caption"),
        "f",
    ]
    last = samples[5]
    assert isinstance(last, Sample) and last.web_caption is None and last.image_ext == "png"


def test_truncated_tar_yields_what_it_can_then_raises(tmp_path: Path) -> None:
    [path] = write_webdataset_shards(tmp_path, make_items(5), metadata_files=False)
    data = path.read_bytes()
    cut = data.index(b"a photo number 3") - 100  # inside sample 3's members
    path.write_bytes(data[:cut])
    results: list[Sample | Reject] = []
    with pytest.raises(ShardReadError, match="00000.tar"):
        results.extend(FORMATS["webdataset"].read_shard(FS, Shard(str(path), "00000"), None))
    assert [s.key for s in results if isinstance(s, Sample)] == ["000000000", "000000001", "000000002"]
    assert [(r.key, r.reason) for r in results if isinstance(r, Reject)] == [("000000003", "truncated_shard")]


def test_webdataset_caption_and_image_member_can_be_chosen(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    with webdataset.TarWriter(str(path)) as tar:
        tar.write({"__key__": "a", "jpg": JPG, "png": PNG, "txt": b"web", "caption": b"better"})
    [sample] = read_samples(FORMATS["webdataset"], path, caption_column="caption", image_column="png")
    assert sample.web_caption == "better" and sample.image_bytes == PNG and sample.image_ext == "png"
    assert sample.extra_members == {"caption": b"better", "jpg": JPG}


def test_gzipped_tar_is_read_as_a_stream(tmp_path: Path) -> None:
    [path] = write_webdataset_shards(tmp_path, make_items(2), metadata_files=False)
    gz = tmp_path / "00001.tar.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert FORMATS["webdataset"].shard_from_path(str(gz)).name == "00001"
    assert [s.key for s in read(FORMATS["webdataset"], gz)] == ["000000000", "000000001"]


def test_webdataset_output_is_what_a_jpg_txt_loader_expects(tmp_path: Path) -> None:
    samples = scored_samples()
    write(FORMATS["webdataset"], tmp_path, "00000", samples)
    tar = str(tmp_path / "00000.tar")
    loaded = list(webdataset.WebDataset(tar, shardshuffle=False).decode().to_tuple("jpg;png", "txt"))
    # the best kept caption; the first synthetic one when there is no web caption; else the web caption
    assert loaded == [(JPG, "a cup of coffee"), (PNG, "a blue square"), (JPG, "plain")]
    pil = list(webdataset.WebDataset(tar, shardshuffle=False).decode("pil").to_tuple("jpg;png", "json"))
    assert [image.size for image, _ in pil] == [(32, 24)] * 3
    assert pil[1][1]["synthetic_captions"][0]["captioner"] == "blip-large"


def test_webdataset_json_has_metadata_first_then_capfilt_fields(tmp_path: Path) -> None:
    write(FORMATS["webdataset"], tmp_path, "00000", scored_samples()[:1])
    with tarfile.open(tmp_path / "00000.tar") as tar:
        names = tar.getnames()
        raw = tar.extractfile("000000007.json").read()  # type: ignore[union-attr]  # a regular member
        record = json.loads(raw.decode("utf-8"))
    assert names == ["000000007.jpg", "000000007.txt", "000000007.json", "000000007.cls", "000000007.seg.png"]
    assert list(record) == ["url", "width", "nested", "ok", *CAPFILT_FIELDS]
    assert record["kept_captions"] == ["a cup of coffee"] and record["web_kept"] is False
    assert record["synthetic_captions"][0]["decoding"] == {"num_beams": 3, "max_new_tokens": 20}
    assert record["synthetic_captions"][0]["count"] == 2 and record["synthetic_captions"][1]["count"] == 1
    assert "Café au lait ☕".encode() in raw  # UTF-8, not \u escapes


def test_a_synthetic_caption_count_that_is_not_a_positive_integer_is_a_bad_json_reject(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    with webdataset.TarWriter(str(path)) as tar:
        for key, count in (("a", 0), ("b", True), ("c", "2"), ("d", 2)):
            record = {"synthetic_captions": [{"text": "a dog", "count": count}]}
            tar.write({"__key__": key, "jpg": JPG, "json": json.dumps(record).encode()})
    *rejects, sample = read(FORMATS["webdataset"], path)
    assert [(r.key, r.reason) for r in rejects if isinstance(r, Reject)] == [(key, "bad_json") for key in "abc"]
    assert isinstance(sample, Sample) and sample.synthetic_captions[0].count == 2


def test_kept_captions_hold_each_text_once_best_first() -> None:
    sample = Sample("k", JPG, "jpg", "a dog on grass", web_scores={"itm": 0.6})
    sample.synthetic_captions = [
        Caption("a dog on grass", "synthetic", {"itm": 0.6}, None, "blip", None, 2),  # the web caption again
        Caption("a brown dog", "synthetic", {"itm": 0.9}, None, "blip", None),
        Caption("a cat", "synthetic", {"itm": 0.1}, None, "blip", None),
    ]
    # The keep rules judge and rank the captions, as a filter run does.
    [judged] = KeepStage(KeepRules.parse(["itm>=0.5"]), FilterMode.drop).process(Batch([sample]), ShardStats()).samples
    assert judged is sample and sample.web_kept is True
    assert [c.kept for c in sample.synthetic_captions] == [True, True, False]
    assert kept_captions(sample) == ["a brown dog", "a dog on grass"] and primary_caption(sample) == "a brown dog"
    sample.keeps_every_caption = True  # annotate mode: the output drops no caption, the verdicts stay in `kept`
    assert kept_captions(sample) == ["a brown dog", "a dog on grass", "a cat"]
    sample.keeps_every_caption = False
    sample.synthetic_captions.append(Caption("a puppy", "synthetic"))  # a later caption run: not judged yet
    assert kept_captions(sample) == ["a brown dog", "a dog on grass", "a puppy"]


def test_webdataset_output_is_byte_identical_for_the_same_input(tmp_path: Path) -> None:
    write(FORMATS["webdataset"], tmp_path / "a", "00000", scored_samples())
    write(FORMATS["webdataset"], tmp_path / "b", "00000", scored_samples())
    assert (tmp_path / "a/00000.tar").read_bytes() == (tmp_path / "b/00000.tar").read_bytes()
    with tarfile.open(tmp_path / "a/00000.tar") as tar:
        assert {member.mtime for member in tar} == {0}


# --- atomic writing, every format ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["webdataset", "parquet", "files"])
def test_nothing_final_exists_before_commit(tmp_path: Path, name: str) -> None:
    fmt = FORMATS[name]
    paths = fmt.output_paths(str(tmp_path), "00000")  # the shard, then the metadata Parquet beside a tar or folder
    final = paths[0]
    writer = fmt.open_writer(FS, str(tmp_path), "00000")
    for sample in scored_samples():
        writer.write(sample)
    assert not any(FS.exists(path) for path in paths)
    assert fmt.list_shards(FS, str(tmp_path)) == []  # a crash here leaves nothing that looks like a shard
    writer.commit()
    assert all(FS.exists(path) for path in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(path).name for path in paths)
    assert [s.key for s in read(fmt, final)] == ["000000007", "000000008", "000000009"]


@pytest.mark.parametrize("name", ["webdataset", "parquet", "files"])
def test_abort_and_errors_leave_no_files(tmp_path: Path, name: str) -> None:
    fmt = FORMATS[name]
    with pytest.raises(RuntimeError), fmt.open_writer(FS, str(tmp_path), "00000") as writer:
        writer.write(scored_samples()[0])
        raise RuntimeError("model crashed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["webdataset", "parquet", "files"])
def test_two_attempts_at_one_shard_never_share_a_temporary(tmp_path: Path, name: str) -> None:
    """A retried shard beside an attempt that still runs (a Ray node thought lost): each writes its own
    temporary, and whichever commits last leaves a whole shard."""
    fmt = FORMATS[name]
    samples = scored_samples()
    first, second = fmt.open_writer(FS, str(tmp_path), "00000"), fmt.open_writer(FS, str(tmp_path), "00000")
    for sample in samples:  # interleaved, as two processes would
        first.write(sample)
        second.write(sample)
    first.commit()
    second.commit()
    paths = fmt.output_paths(str(tmp_path), "00000")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(path).name for path in paths)
    assert [s.key for s in read(fmt, paths[0])] == [s.key for s in samples]


@pytest.mark.parametrize("name", ["webdataset", "parquet", "files"])
def test_empty_shard_is_written_and_reads_back_empty(tmp_path: Path, name: str) -> None:
    write(FORMATS[name], tmp_path, "00003", [])
    paths = FORMATS[name].output_paths(str(tmp_path), "00003")
    assert all(FS.exists(path) for path in paths) and read(FORMATS[name], paths[0]) == []


@pytest.mark.parametrize("name", ["webdataset", "parquet", "files"])
def test_writers_work_on_any_fsspec_filesystem(name: str) -> None:
    fs = fsspec.filesystem("memory")
    fmt = FORMATS[name]
    with fmt.open_writer(fs, "/capfilt-test/out", "00000") as writer:
        for sample in scored_samples():
            writer.write(sample)
    [shard] = fmt.list_shards(fs, "/capfilt-test/out")
    assert [view(s) for s in fmt.read_shard(fs, shard, None)] == [view(s) for s in scored_samples()]
    fs.rm("/capfilt-test", recursive=True)


# --- round trips and conversions ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["webdataset", "parquet", "files"])
@pytest.mark.parametrize("target", ["webdataset", "parquet", "files"])
def test_every_conversion_keeps_every_field(tmp_path: Path, source: str, target: str) -> None:
    samples = scored_samples()
    write(FORMATS[source], tmp_path / "in", "00000", samples)
    shard = shard_of(FORMATS[source], tmp_path / "in")
    assert [view(s) for s in FORMATS[source].read_shard(FS, shard, None)] == [view(s) for s in samples]
    layout = FORMATS[source].table_layout(FS, shard)
    write(
        FORMATS[target], tmp_path / "out", shard.name, samples_only(FORMATS[source].read_shard(FS, shard, None)), layout
    )
    output = FORMATS[target].read_shard(FS, shard_of(FORMATS[target], tmp_path / "out"), None)
    assert [view(s) for s in output] == [view(s) for s in samples]


@pytest.mark.parametrize("target", ["webdataset", "parquet", "files"])
def test_img2dataset_data_converts_to_every_format(tmp_path: Path, target: str) -> None:
    items = make_items(3, extra=True)
    for build in (write_webdataset_shards, write_parquet_shards, write_files_dataset):
        source_dir = tmp_path / build.__name__
        build(source_dir, items)
        fmt = next(f for f in FORMATS.values() if f.detect(FS, str(source_dir)))
        shard = shard_of(fmt, source_dir)
        samples = samples_only(fmt.read_shard(FS, shard, None))
        write(FORMATS[target], source_dir / "out", "00000", samples, fmt.table_layout(FS, shard))
        output = samples_only(FORMATS[target].read_shard(FS, shard_of(FORMATS[target], source_dir / "out"), None))
        assert [view(s) for s in output] == [view(s) for s in samples]
        assert [s.web_caption for s in output] == [i[2] for i in items]


# --- parquet ------------------------------------------------------------------------------------------------


def test_parquet_reads_img2dataset_output_and_rejects_failed_downloads(tmp_path: Path) -> None:
    items = make_items(2, extra=True) + [("000000002", None, "never downloaded", None)]
    [path] = write_parquet_shards(tmp_path, items)
    first, second, failed = read(FORMATS["parquet"], path)
    assert isinstance(first, Sample) and isinstance(failed, Reject)
    assert (first.key, first.web_caption, first.image_bytes) == ("000000000", "a photo number 0", items[0][1])
    assert first.metadata["width"] == 32 and first.metadata["aesthetic"] == 0.0 and "url" in first.metadata
    assert "key" not in first.metadata and "caption" not in first.metadata and "jpg" not in first.metadata
    assert second.key == "000000001"
    assert (failed.key, failed.reason) == ("000000002", "missing_image")
    assert "HTTP Error 404" in failed.detail


def test_parquet_output_keeps_input_columns_and_types(tmp_path: Path) -> None:
    [path] = write_parquet_shards(tmp_path / "in", make_items(3, extra=True))
    fmt = FORMATS["parquet"]
    shard = fmt.shard_from_path(str(path))
    samples = samples_only(fmt.read_shard(FS, shard, None))
    samples[0].synthetic_captions.append(
        Caption("a red thing", "synthetic", {"itm": 0.8, "itc": 0.3}, True, "blip", {"beams": 3})
    )
    samples[0].web_scores, samples[0].web_kept = {"itm": 0.1, "itc": 0.05}, False
    write(fmt, tmp_path / "out", "00000", samples, fmt.table_layout(FS, shard))
    source, output = pq.read_table(path), pq.read_table(tmp_path / "out/00000.parquet")
    assert output.schema.names == source.schema.names + arrow_names(["itm", "itc"])
    for field in source.schema:
        assert output.schema.field(field.name).type == field.type
    assert output.column("jpg").to_pylist() == source.column("jpg").to_pylist()
    assert output.column("caption").to_pylist() == source.column("caption").to_pylist()  # as it came in
    assert output.column("primary_caption").to_pylist() == ["a red thing", "a photo number 1", "a photo number 2"]
    assert output.column("web_caption").to_pylist()[0] == "a photo number 0"
    assert output.column("kept_captions").to_pylist()[0] == ["a red thing"]
    assert output.column("synthetic_captions").to_pylist()[0][0]["decoding"] == '{"beams": 3}'


def test_hugging_face_parquet_round_trips_with_its_image_struct_and_features(tmp_path: Path) -> None:
    items = make_items(3, extra=True)
    path = write_hf_parquet(tmp_path / "in", items)
    fmt = FORMATS["parquet"]
    shard = fmt.shard_from_path(str(path))
    samples = read_samples(fmt, path)
    assert [s.key for s in samples] == ["000000000", "000000001", "000000002"]  # row index: no key column
    assert samples[1].web_caption == "a photo number 1" and samples[1].image_bytes == items[1][1]
    assert samples[1].metadata == {"image": {"path": "000000001.jpg"}, "aesthetic": 0.1}
    for index, sample in enumerate(samples):  # as a filter run computing ITM leaves them
        sample.web_scores, sample.web_kept = {"itm": index / 4}, index > 0
    write(fmt, tmp_path / "out", shard.name, samples, fmt.table_layout(FS, shard))
    output = pq.read_table(tmp_path / "out" / path.name)
    assert output.schema.field("image").type == pq.read_schema(path).field("image").type
    assert output.column("image").to_pylist()[1] == {"bytes": items[1][1], "path": "000000001.jpg"}
    assert output.column("key").to_pylist() == ["000000000", "000000001", "000000002"]  # stable once filtered
    features = json.loads(output.schema.metadata[b"huggingface"])["info"]["features"]
    assert list(features) == output.schema.names  # `datasets` checks features against the columns
    assert features["image"] == {"_type": "Image"} and features["web_itm_score"] == {
        "dtype": "float64",
        "_type": "Value",
    }
    assert [view(s) for s in read(fmt, tmp_path / "out" / path.name)] == [view(s) for s in samples]


def test_parquet_caption_column_is_written_back_as_it_came_and_never_added(tmp_path: Path) -> None:
    fmt = FORMATS["parquet"]
    binary = pa.table({"jpg": [JPG, JPG], "caption": pa.array([b"caf\xc3\xa9", None], pa.binary())})
    uncaptioned = pa.table({"jpg": [JPG, JPG], "id": [1, 2]})
    for name, table in (("binary", binary), ("uncaptioned", uncaptioned)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
        shard = fmt.shard_from_path(str(tmp_path / f"{name}.parquet"))
        samples = samples_only(fmt.read_shard(FS, shard, None))
        for sample in samples:
            sample.synthetic_captions.append(Caption("a green square", "synthetic", {"itm": 0.7}, True, "blip", None))
        write(fmt, tmp_path / "out", name, samples, fmt.table_layout(FS, shard))
    written = pq.read_table(tmp_path / "out/binary.parquet")
    assert written.schema.field("caption").type == pa.binary()
    assert written.column("caption").to_pylist() == [b"caf\xc3\xa9", None]
    assert written.column("primary_caption").to_pylist() == ["a green square"] * 2
    written = pq.read_table(tmp_path / "out/uncaptioned.parquet")
    assert written.schema.names == ["jpg", "id", "key", *arrow_names(["itm"])]  # only the scores computed


def test_parquet_without_an_image_column_names_its_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"url": ["http://x"], "caption": ["c"]}), tmp_path / "00000.parquet")
    with pytest.raises(ShardReadError, match="no image column.*url, caption"):
        read(FORMATS["parquet"], tmp_path / "00000.parquet")


def test_parquet_image_and_caption_columns_can_be_chosen(tmp_path: Path) -> None:
    table = pa.table({"picture": [JPG], "alt_text": ["alt"], "caption": ["web"], "id": [7]})
    pq.write_table(table, tmp_path / "00000.parquet")
    [sample] = read_samples(FORMATS["parquet"], tmp_path / "00000.parquet", "alt_text", "picture")
    assert (sample.image_bytes, sample.image_ext, sample.web_caption) == (JPG, "jpg", "alt")
    assert sample.metadata == {"caption": "web", "id": 7}


def test_parquet_is_read_and_written_in_row_groups(tmp_path: Path) -> None:
    fake_images = [Sample(f"{i:09d}", b"\xff\xd8\xff" + bytes([i % 256]) * 100, "jpg", f"c{i}") for i in range(600)]
    write(FORMATS["parquet"], tmp_path, "00000", fake_images)
    assert pq.ParquetFile(tmp_path / "00000.parquet").num_row_groups >= 2
    keys = [s.key for s in read(FORMATS["parquet"], tmp_path / "00000.parquet")]
    assert keys == [s.key for s in fake_images]


def test_parquet_from_another_format_holds_metadata_as_json_text(tmp_path: Path) -> None:
    write(FORMATS["parquet"], tmp_path, "00000", scored_samples())
    table = pq.read_table(tmp_path / "00000.parquet")
    assert table.schema.names == ["key", "jpg", "caption", "json", "extra_members", *arrow_names(["itm", "itc"])]
    assert table.column("caption").to_pylist() == ["Café au lait ☕ on a table", None, "plain"]  # the `.txt` read
    assert table.column("primary_caption").to_pylist() == ["a cup of coffee", "a blue square", "plain"]
    assert json.loads(table.column("json")[0].as_py())["nested"] == {"a": [1, 2.5, None]}
    assert table.column("jpg").to_pylist()[1] == PNG  # a PNG among JPEGs shares the column, read back as .png


# --- files --------------------------------------------------------------------------------------------------


def test_files_reads_img2dataset_layout_beside_its_metadata(tmp_path: Path) -> None:
    items = make_items(3) + [("000000003", None, "failed", None)]
    write_files_dataset(tmp_path, items)
    assert (tmp_path / "00000.parquet").exists() and (tmp_path / "00000_stats.json").exists()
    shard = shard_of(FORMATS["files"], tmp_path)
    samples = samples_only(FORMATS["files"].read_shard(FS, shard, None))
    assert shard.name == "00000"
    assert [(s.key, s.web_caption, s.image_bytes) for s in samples] == [(i[0], i[2], i[1]) for i in items[:3]]


def test_plain_image_folder_reads_every_image_in_sorted_order(tmp_path: Path) -> None:
    folder = tmp_path / "holiday"
    folder.mkdir()
    (folder / "beach.jpg").write_bytes(JPG)
    (folder / "Dog.PNG").write_bytes(PNG)
    (folder / "photo.2019.jpg").write_bytes(JPG)
    (folder / "photo.2019.txt").write_text("dated photo")
    (folder / "README.md").write_text("my photos")
    (folder / ".DS_Store").write_bytes(b"\0")
    [shard] = FORMATS["files"].list_shards(FS, str(folder))
    assert shard.name == "holiday"
    samples = list(FORMATS["files"].read_shard(FS, shard, None))
    assert [view(s)["key"] if isinstance(s, Sample) else (s.key, s.reason) for s in samples] == [
        "Dog",
        ("README", "missing_image"),
        "beach",
        "photo.2019",
    ]
    dog, _, beach, dated = samples
    assert isinstance(dog, Sample) and isinstance(beach, Sample) and isinstance(dated, Sample)
    assert dog.image_ext == "PNG" and beach.web_caption is None and dated.web_caption == "dated photo"


def test_files_members_of_a_sample_are_grouped_by_key() -> None:
    paths = ["d/a.jpg", "d/a.seg.png", "d/a.txt", "d/a.json", "d/b.jpg", "d/b.c.txt", "d/notes"]
    assert group_files(paths) == [
        ("a", {"jpg": "d/a.jpg", "json": "d/a.json", "seg.png": "d/a.seg.png", "txt": "d/a.txt"}),
        ("b", {"c.txt": "d/b.c.txt", "jpg": "d/b.jpg"}),
    ]
