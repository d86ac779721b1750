"""End to end: real shards in, real shards out, compared with plain per-image transformers calls."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset
from PIL import Image

from capfilt.api import build_config
from capfilt.config import Command, FilterMode, RunConfig
from capfilt.formats import FORMATS
from capfilt.models import DecodingSettings
from capfilt.pipeline import Pipeline, run
from capfilt.sample import Sample
from capfilt.stages import ScoreStage
from tests import reference
from tests.conftest import shape_items
from tests.datasets import (
    write_files_dataset,
    write_hf_parquet,
    write_parquet_shards,
    write_webdataset_shards,
)

BEAM = DecodingSettings(num_beams=3, max_length=12, min_length=5)
# The options that give BEAM (the preset's prompt and top-p are BEAM's defaults).
BEAM_OPTIONS = {"num_beams": 3, "max_length": 12, "min_length": 5}
# Both BLIP scores, with BLIP's thresholds: a caption is kept when ITM >= 0.5 and ITC >= 0.3.
BOTH_SCORES = ["itm>=0.5", "itc>=0.3"]
DECODING_OPTIONS = {"num_beams", "num_captions", "top_p", "max_length", "min_length", "repetition_penalty", "prompt",
                    "seed"}


def config(command: Command, input: Path | str, output: Path, models: tuple[str, str], **options) -> RunConfig:
    """The config `capfilt.run` builds for the tiny models on the CPU, 4 images a batch: the captioner with BEAM,
    the filter computing both scores (BOTH_SCORES) in annotate mode; `options` (the CLI's names) override."""
    settings: dict = {"device": "cpu", "dtype": "float32", "batch_size": 4}
    if command in (Command.caption, Command.bootstrap):
        settings.update(captioner=models[0], **BEAM_OPTIONS)
    if command in (Command.filter, Command.bootstrap):
        settings.update(filter=[models[1]], keep=BOTH_SCORES, mode=FilterMode.annotate)
    built = build_config(command, str(input), str(output), **{**settings, **options})
    if built.decoding is not None and not DECODING_OPTIONS & set(options):
        assert built.decoding == BEAM
    return built


def read_output(directory: Path, format_name: str = "webdataset") -> list[Sample]:
    """Every written sample, read back with capfilt's own reader for that format."""
    fmt = FORMATS[format_name]
    samples = []
    for shard in fmt.list_shards(_local_fs(), str(directory)):
        samples += [s for s in fmt.read_shard(_local_fs(), shard, None) if isinstance(s, Sample)]
    return samples


def _local_fs():
    import fsspec

    return fsspec.filesystem("file")


def jsonl_keys(directory: Path, suffix: str) -> list[str]:
    keys = []
    for path in sorted(directory.glob(f"*_{suffix}.jsonl")):
        keys += [json.loads(line)["key"] for line in path.read_text().splitlines()]
    return keys


def decoded(sample: Sample) -> Image.Image:
    return Image.open(io.BytesIO(sample.image_bytes)).convert("RGB")


def assert_equals_plain_calls(sample: Sample, models: tuple[str, str]) -> None:
    """A bootstrapped sample's beam captions and ITM / ITC scores are what the plain per-image calls give."""
    image = decoded(sample)
    assert [c.text for c in sample.synthetic_captions] == reference.beam_captions(models[0], image, BEAM)
    for caption in sample.captions():
        itm, itc = reference.pair_scores(models[1], image, caption.text)
        assert caption.scores["itm"] == pytest.approx(itm, abs=1e-5)
        assert caption.scores["itc"] == pytest.approx(itc, abs=1e-5)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_bootstrap_equals_per_image_reference_calls(tiny_models, shapes_dataset, tmp_path, batch_size):
    out = tmp_path / "out"
    summary = run(config(Command.bootstrap, shapes_dataset, out, tiny_models, batch_size=batch_size))
    samples = read_output(out)
    assert summary.written == len(samples) == 20
    for sample in samples:
        assert_equals_plain_calls(sample, tiny_models)
        for caption in sample.captions():
            assert caption.kept == (caption.scores["itm"] >= 0.5 and caption.scores["itc"] >= 0.3)
        assert sample.synthetic_captions[0].decoding["num_beams"] == 3
        assert sample.synthetic_captions[0].captioner == tiny_models[0]


def test_drop_keeps_exactly_the_images_with_a_passing_caption(tiny_models, shapes_dataset, tmp_path):
    annotated = read_output(_run_filter(tiny_models, shapes_dataset, tmp_path / "annotate", FilterMode.annotate))
    scores = sorted(c.scores["itm"] for s in annotated for c in s.captions())
    threshold = scores[len(scores) // 2]  # half the captions pass: some images keep one, some none
    out = _run_filter(tiny_models, shapes_dataset, tmp_path / "drop", FilterMode.drop, threshold)
    written = read_output(out)

    expected = [s.key for s in annotated if any(c.scores["itm"] >= threshold for c in s.captions())]
    assert [s.key for s in written] == expected
    assert sorted(jsonl_keys(out, "dropped")) == sorted(s.key for s in annotated if s.key not in expected)
    assert 0 < len(expected) < len(annotated)
    for sample in written:  # the primary caption is the best kept one
        best = max((c for c in sample.captions() if c.kept), key=lambda c: c.scores["itm"])
        assert json.loads(_member(out, sample.key, "json"))["kept_captions"][0] == best.text
        assert _member(out, sample.key, "txt").decode() == best.text


def _run_filter(models, input: Path, out: Path, mode: FilterMode, threshold: float = 0.5) -> Path:
    run(config(Command.filter, input, out, models, keep=[f"itm>={threshold!r}"], mode=mode))
    return out


def _member(directory: Path, key: str, ext: str) -> bytes:
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            if f"{key}.{ext}" in tar.getnames():
                return tar.extractfile(f"{key}.{ext}").read()
    raise KeyError(key)


def test_every_sample_is_written_dropped_or_rejected(tiny_models, tmp_path):
    items = shape_items(12)
    good_jpeg = items[0][1]
    items[2] = (items[2][0], b"this is not an image", "a red circle", None)
    items[5] = (items[5][0], good_jpeg[: len(good_jpeg) // 3], "a truncated picture", None)
    items[7] = (items[7][0], b"", "an empty file", None)
    write_webdataset_shards(tmp_path / "in", items, samples_per_shard=5)
    with tarfile.open(tmp_path / "in" / "00001.tar", "a") as tar:  # a caption without its image
        info = tarfile.TarInfo("999999999.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"lost!"))
    out = tmp_path / "out"
    summary = run(config(Command.bootstrap, tmp_path / "in", out, tiny_models, keep=["itm>=0.4995"],
                         mode=FilterMode.drop, batch_size=3))

    written = [s.key for s in read_output(out)]
    dropped, rejected = jsonl_keys(out, "dropped"), jsonl_keys(out, "rejects")
    read = [item[0] for item in items] + ["999999999"]
    assert sorted(written + dropped + rejected) == sorted(read)
    assert written == [key for key in read if key in written]  # input order kept
    assert summary.read == len(read) and summary.written == len(written)
    assert summary.dropped == len(dropped) and summary.rejected == len(rejected) == 4
    reasons = {json.loads(line)["key"]: json.loads(line)["reason"] for p in out.glob("*_rejects.jsonl")
               for line in p.read_text().splitlines()}
    assert reasons[items[2][0]] == "undecodable_image"
    assert reasons[items[7][0]] == "empty_image"
    assert reasons["999999999"] == "missing_image"
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("*_stats.json"))]
    assert sum(s["read"] for s in stats) == summary.read
    assert json.loads((out / "capfilt_summary.json").read_text())["written"] == summary.written


def test_caption_then_filter_scores_the_synthetic_captions(tiny_models, shapes_dataset, tmp_path):
    captioned = tmp_path / "captioned"
    run(config(Command.caption, shapes_dataset, captioned, tiny_models))
    first = read_output(captioned)
    assert all(len(s.synthetic_captions) == 1 and s.synthetic_captions[0].scores == {} for s in first)
    filtered = tmp_path / "filtered"
    run(config(Command.filter, captioned, filtered, tiny_models))
    second = read_output(filtered)
    assert [s.key for s in second] == [s.key for s in first]
    for before, after in zip(first, second):
        assert after.web_caption == before.web_caption
        assert [c.text for c in after.synthetic_captions] == [c.text for c in before.synthetic_captions]
        assert all({"itm", "itc"} <= set(c.scores) for c in after.captions())


def _write(format_name: str, directory: Path, items) -> None:
    {
        "webdataset": lambda: write_webdataset_shards(directory, items, samples_per_shard=4),
        "parquet": lambda: write_parquet_shards(directory, items, samples_per_shard=4),
        "hf-parquet": lambda: write_hf_parquet(directory, items),
        "files": lambda: write_files_dataset(directory, items, samples_per_shard=4),
    }[format_name]()


@pytest.mark.parametrize("input_format", ["webdataset", "parquet", "hf-parquet", "files"])
@pytest.mark.parametrize("output_format", [None, "webdataset", "parquet", "files"])
def test_every_format_in_and_out(tiny_models, tmp_path, input_format, output_format):
    items = [item for item in shape_items(9) if item[2] is not None]
    _write(input_format, tmp_path / "in", items)
    out = tmp_path / "out"
    run(config(Command.filter, tmp_path / "in", out, tiny_models, output_format=output_format, batch_size=3))
    written_format = output_format or ("parquet" if "parquet" in input_format else input_format)
    samples = read_output(out, written_format)
    assert sorted(s.web_caption for s in samples) == sorted(item[2] for item in items)
    assert all("itm" in s.web_scores for s in samples)
    if written_format == "webdataset":  # what a training loader sees
        pairs = list(webdataset.WebDataset(sorted(map(str, out.glob("*.tar"))), shardshuffle=False)
                     .decode("pil").to_tuple("jpg", "txt"))
        assert len(pairs) == len(items) and all(isinstance(image, Image.Image) for image, _ in pairs)
    if written_format == "parquet":
        table = pq.read_table(sorted(out.glob("*.parquet")))
        assert {"web_caption", "web_itm_score", "synthetic_captions", "kept_captions"} <= set(table.column_names)
    if written_format == input_format == "parquet":  # every input column kept
        source = pq.read_table(sorted((tmp_path / "in").glob("*.parquet")))
        assert set(source.column_names) <= set(pq.read_table(sorted(out.glob("*.parquet"))).column_names)


def test_a_crash_mid_shard_leaves_no_finished_looking_shard(tiny_models, shapes_dataset, tmp_path):
    out = tmp_path / "out"
    pipeline = Pipeline(config(Command.filter, shapes_dataset, out, tiny_models, batch_size=2))
    filter_stage = next(stage for stage in pipeline.runner.worker.stages if isinstance(stage, ScoreStage))
    calls = {"n": 0}
    original = filter_stage.process

    def crash_on_third_batch(batch, stats):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return original(batch, stats)

    filter_stage.process = crash_on_third_batch
    summary = pipeline.run()  # the shard fails alone (tests/test_shard_failures.py)
    assert summary.failed_shards == {"00000": "RuntimeError: simulated crash"}
    assert sorted(p.name for p in out.glob("00000*")) == ["00000_stats.json"] and not list(out.glob("*.tmp"))
    assert pipeline.output.completed(pipeline.shards[0]) is None  # its stats record the error: a rerun redoes it


def test_a_broken_shard_fails_alone(tiny_models, shapes_dataset, tmp_path):
    (shapes_dataset / "00001.tar").write_bytes((shapes_dataset / "00001.tar").read_bytes()[:3000])
    summary = run(config(Command.filter, shapes_dataset, tmp_path / "out", tiny_models))
    assert list(summary.failed_shards) == ["00001"]
    assert summary.read == summary.written + summary.dropped + summary.rejected
    assert (tmp_path / "out" / "00000.tar").exists() and (tmp_path / "out" / "00002.tar").exists()


def test_images_are_decoded_once_per_bootstrap(tiny_models, shapes_dataset, tmp_path, monkeypatch):
    from capfilt import stages

    calls = []
    original = stages.decode_image
    monkeypatch.setattr(stages, "decode_image", lambda data, max_pixels: calls.append(1) or original(data, max_pixels))
    run(config(Command.bootstrap, shapes_dataset, tmp_path / "out", tiny_models))
    assert len(calls) == 20


def test_shard_names_follow_the_input(tiny_models, tmp_path):
    write_webdataset_shards(tmp_path / "in", shape_items(6), samples_per_shard=2)
    out = tmp_path / "out"
    run(config(Command.filter, f"{tmp_path}/in/{{00000..00001}}.tar", out, tiny_models))
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert not (out / "00002.tar").exists()
