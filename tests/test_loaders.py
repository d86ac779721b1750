"""Every output loads with Hugging Face `datasets`, and no image has a caption twice.

`datasets` infers a webdataset's JSON features from the first five samples of the first tar: a field that is
`[]` or null there and set later fails to load, so capfilt writes each field with the same type in every sample.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capfilt.config import Command, DecodingSettings, FilterMode
from capfilt.pipeline import run
from capfilt.sample import Sample
from capfilt.stats import RunSummary
from tests.conftest import shape_items
from tests.datasets import make_items, write_hf_parquet, write_parquet_shards, write_webdataset_shards
from tests.test_pipeline import config, read_output

datasets = pytest.importorskip("datasets")

DECODING = DecodingSettings(num_beams=2, max_length=10, min_length=4)
DEMO_MODELS = ("models/demo/captioner", "models/demo/filter")
# The filter's options (`capfilt.run`'s names): keep rules and mode.
# No ITM score reaches 1: in annotate mode no caption passes, so no image keeps one by the filter's verdict.
NOTHING_PASSES = {"keep": ["itm>=1.0"], "mode": FilterMode.annotate}
EVERYTHING_PASSES = {"keep": ["itm>=0.0", "itc>=-1.0"], "mode": FilterMode.drop}
RUNS = {
    "caption": (Command.caption, None),
    "filter-drop": (Command.filter, EVERYTHING_PASSES),
    "filter-annotate": (Command.filter, NOTHING_PASSES),
    "bootstrap-drop": (Command.bootstrap, EVERYTHING_PASSES),
    "bootstrap-annotate": (Command.bootstrap, NOTHING_PASSES),
}


def decoding_options(decoding: DecodingSettings) -> dict:
    """The options of `capfilt.run` that give `decoding`."""
    names = ("num_beams", "num_captions", "top_p", "max_length", "min_length", "repetition_penalty", "prompt", "seed")
    return {name: getattr(decoding, name) for name in names}


def capfilt_run(command: Command, filtering: dict | None, input: Path, out: Path, models,
                decoding: DecodingSettings = DECODING, **overrides):
    """A run of test_pipeline's config with `decoding` (when the command captions) and the filter's options
    `filtering` (when it filters)."""
    captions = command in (Command.caption, Command.bootstrap)
    settings = {**(decoding_options(decoding) if captions else {}), **(filtering or {})}
    built = config(command, input, out, models, **{**settings, **overrides})
    assert built.decoding == (decoding if captions else None)
    return run(built)


def load(builder: str, out: Path, cache: Path, pattern: str, **options) -> datasets.Dataset:
    files = sorted(str(path) for path in out.glob(pattern))
    return datasets.load_dataset(builder, data_files=files, split="train", cache_dir=str(cache), **options)


def check_webdataset_rows(rows: datasets.Dataset, written: list[Sample], summary: RunSummary) -> None:
    assert len(rows) == summary.written == len(written)
    by_key = {sample.key: sample for sample in written}
    for row in rows:
        sample = by_key[row["__key__"]]
        assert row["json"]["web_caption"] == sample.web_caption
        assert row["json"]["kept_captions"] and row["txt"] == row["json"]["kept_captions"][0]
        counts = [c["count"] for c in row["json"]["synthetic_captions"]]
        assert counts == [c.count for c in sample.synthetic_captions]


@pytest.mark.parametrize("run_name", list(RUNS))
@pytest.mark.parametrize("output_format", ["webdataset", "parquet", "files"])
def test_every_output_loads_with_hugging_face_datasets(tiny_models, tmp_path, run_name, output_format):
    command, filtering = RUNS[run_name]
    items = shape_items(10)  # every fourth without a web caption; the first five have at least one
    write_parquet_shards(tmp_path / "in", items, samples_per_shard=5)
    out = tmp_path / "out"
    summary = capfilt_run(command, filtering, tmp_path / "in", out, tiny_models, output_format=output_format)
    written = read_output(out, output_format)
    assert summary.written == len(written) > 0
    cache = tmp_path / "cache"
    if output_format == "webdataset":
        check_webdataset_rows(load("webdataset", out, cache, "*.tar"), written, summary)
    elif output_format == "parquet":
        rows = load("parquet", out, cache, "*.parquet")
        assert len(rows) == summary.written
        captions = {item[0]: item[2] for item in items}
        assert rows["caption"] == [captions[key] for key in rows["key"]]  # the input's column, as it came in
        assert all(kept and kept[0] == primary for kept, primary in zip(rows["kept_captions"], rows["primary_caption"]))
    else:  # the images with imagefolder (it reads no per-image sidecars), the `.json` sidecars with json
        images = datasets.load_dataset(
            "imagefolder", data_dir=str(out), drop_labels=True, split="train", cache_dir=str(cache)
        )
        assert len(images) == summary.written
        sidecars = load("json", out, cache, "*/*.json")
        assert sorted(map(str, sidecars["web_caption"])) == sorted(str(sample.web_caption) for sample in written)
        assert all(sidecars["kept_captions"])
    if output_format != "parquet":  # the metadata Parquet beside each tar or folder: one row per written sample
        metadata = load("parquet", out, cache / "metadata", "*.parquet")
        assert sorted(metadata["key"]) == sorted(sample.key for sample in written)
        assert all(kept and kept[0] == primary for kept, primary in zip(metadata["kept_captions"],
                                                                         metadata["primary_caption"]))
        by_key = {sample.key: sample for sample in written}
        for row in metadata:
            for name, value in by_key[row["key"]].web_scores.items():
                assert row[f"web_{name}_score"] == value
    if filtering is NOTHING_PASSES:  # the verdicts say so, yet every caption is listed: nothing was dropped
        assert all(not c.kept for s in written for c in s.captions())


def test_annotate_webdataset_whose_first_samples_keep_nothing_loads(tiny_models, tmp_path):
    """The case of the issue: the first five images pass no caption and a later one does, so the captions
    that passed are `[]` in every sample `datasets` infers the types from, and a list of text later."""
    items = shape_items(8)
    write_webdataset_shards(tmp_path / "scoring", items)
    capfilt_run(Command.bootstrap, NOTHING_PASSES, tmp_path / "scoring", tmp_path / "scores", tiny_models)
    best = {s.key: max(c.scores["itm"] for c in s.captions()) for s in read_output(tmp_path / "scores")}
    items.sort(key=lambda item: best[item[0]])  # the worst five first, in one tar
    ranked = sorted(best.values())
    assert ranked[4] < ranked[-1]
    threshold = (ranked[4] + ranked[-1]) / 2
    write_webdataset_shards(tmp_path / "in", items)
    out = tmp_path / "out"
    settings = {"keep": [f"itm>={threshold!r}"], "mode": FilterMode.annotate}
    summary = capfilt_run(Command.bootstrap, settings, tmp_path / "in", out, tiny_models)
    written = read_output(out)
    passed = [any(c.kept for c in s.captions()) for s in written]
    assert not any(passed[:5]) and any(passed[5:])
    rows = load("webdataset", out, tmp_path / "cache", "*.tar")
    check_webdataset_rows(rows, written, summary)
    features = rows.features["json"]
    assert features["kept_captions"].feature.dtype == "string"
    assert features["synthetic_captions"].feature["count"].dtype == "int64"


def test_output_of_an_input_without_web_captions_loads(tiny_models, tmp_path):
    write_webdataset_shards(tmp_path / "in", make_items(6, captions=False), samples_per_shard=3)
    out = tmp_path / "out"
    summary = capfilt_run(Command.bootstrap, NOTHING_PASSES, tmp_path / "in", out, tiny_models)
    rows = load("webdataset", out, tmp_path / "cache", "*.tar")
    assert len(rows) == summary.written == 6
    assert rows["json"][0]["web_caption"] is None and rows["json"][0]["kept_captions"]


def test_hugging_face_parquet_output_loads_with_its_features(tiny_models, tmp_path):
    items = make_items(5, extra=True)
    path = write_hf_parquet(tmp_path / "in", items)
    out = tmp_path / "out"
    capfilt_run(Command.bootstrap, EVERYTHING_PASSES, tmp_path / "in", out, tiny_models)
    rows = load("parquet", out, tmp_path / "cache", "*.parquet")
    assert len(rows) == 5
    assert isinstance(rows.features["image"], datasets.Image)  # the input's features are kept
    assert rows["text"] == [item[2] for item in items] and rows["aesthetic"] == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert rows[0]["image"].size == (32, 24)
    assert rows["primary_caption"] == [kept[0] for kept in rows["kept_captions"]]
    assert pq.read_schema(out / path.name).names[: len(pq.read_schema(path).names)] == pq.read_schema(path).names


# --- one text once ------------------------------------------------------------------------------------------


def test_nucleus_captions_are_kept_once_with_their_count(tmp_path):
    """The demo captioner samples the same caption several times for almost every image."""
    num_captions = 3
    out = tmp_path / "captioned"
    summary = capfilt_run(
        Command.caption, None, Path("examples/shapes/00000.tar"), out, DEMO_MODELS,
        decoding=DecodingSettings(num_captions=num_captions, max_length=20, min_length=5, seed=3),
    )
    samples = read_output(out)
    assert samples and summary.written == len(samples)
    for sample in samples:
        texts = [c.text for c in sample.synthetic_captions]
        assert len(texts) == len(set(texts))
        assert sum(c.count for c in sample.synthetic_captions) == num_captions
    distinct = sum(len(s.synthetic_captions) for s in samples)
    assert summary.synthetic_captions_added == distinct < num_captions * len(samples)
    assert summary.duplicate_captions == num_captions * len(samples) - distinct

    # the filter reads the counts back, scores each text once and lists each kept text once
    filtered = tmp_path / "filtered"
    settings = {"keep": ["itm>=0.0"], "mode": FilterMode.drop}
    second = capfilt_run(Command.filter, settings, out, filtered, DEMO_MODELS)
    after = read_output(filtered)
    assert [[(c.text, c.count) for c in s.synthetic_captions] for s in after] == [
        [(c.text, c.count) for c in s.synthetic_captions] for s in samples
    ]
    assert second.captions_scored == sum(len({c.text for c in s.captions()}) for s in after)
    for sample in after:
        kept = json.loads(_json_member(filtered, sample.key))["kept_captions"]
        assert len(kept) == len(set(kept)) == len({c.text for c in sample.captions()})


def test_a_synthetic_caption_equal_to_the_web_caption_is_scored_and_kept_once(tiny_models, tmp_path):
    captioned = tmp_path / "captioned"
    write_webdataset_shards(tmp_path / "first", make_items(4))
    capfilt_run(Command.caption, None, tmp_path / "first", captioned, tiny_models)
    # the same images again, each with its own beam caption as the web caption
    beam = {s.key: s.synthetic_captions[0].text for s in read_output(captioned)}
    items = [(key, image, beam[key], extra) for key, image, _, extra in make_items(4)]
    write_webdataset_shards(tmp_path / "second", items)
    out = tmp_path / "out"
    summary = capfilt_run(Command.bootstrap, EVERYTHING_PASSES, tmp_path / "second", out, tiny_models)
    assert summary.captions_scored == 4 and summary.captions_kept == 4
    for sample in read_output(out):
        assert [(c.text, c.count) for c in sample.synthetic_captions] == [(sample.web_caption, 1)]
        assert sample.synthetic_captions[0].scores == sample.web_scores and "itm" in sample.web_scores
        assert json.loads(_json_member(out, sample.key))["kept_captions"] == [sample.web_caption]


def _json_member(directory: Path, key: str) -> bytes:
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            if f"{key}.json" in tar.getnames():
                return tar.extractfile(f"{key}.json").read()
    raise KeyError(key)
