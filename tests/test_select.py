"""Score once, select many times: `capfilt select` re-applies keep rules to an annotated output without a
model, and the metadata Parquet beside every tar or folder shard holds what the shard holds."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

import capfilt
from capfilt.demo.tiny_clip import build_tiny_clip
from capfilt.formats import FORMATS
from capfilt.output import RUN_FILE
from capfilt.sample import Sample
from capfilt.scores import Score
from tests.conftest import shape_items
from tests.datasets import write_parquet_shards, write_webdataset_shards
from tests.test_img2dataset_inputs import FIXTURES, IMG2DATASET_METADATA_TYPES

RUN = {"batch_size": 4, "device": "cpu", "dtype": "fp32", "num_captions": 3, "num_beams": 1, "max_length": 12,
       "min_length": 5, "scores": "itm,itc"}


def _files(directory: Path) -> dict[str, bytes]:
    """Every shard and side file a run writes, but the run's own records (settings, summary, stats)."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())
            if path.is_file() and not path.name.startswith("capfilt") and not path.name.endswith("_stats.json")}


@pytest.mark.parametrize("format_name", ["webdataset", "parquet"])
def test_select_with_the_runs_rule_reproduces_the_run_byte_for_byte(tiny_models, tmp_path, format_name):
    writer = write_webdataset_shards if format_name == "webdataset" else write_parquet_shards
    writer(tmp_path / "in", shape_items(20), samples_per_shard=7)
    captioner, filter_ = tiny_models
    models = {"captioner": captioner, "filter": [filter_], "keep": ["itc>=-0.03", "itm>=0.0"]}
    dropped = capfilt.run(str(tmp_path / "in"), str(tmp_path / "drop"), "bootstrap", **models, **RUN)
    capfilt.run(str(tmp_path / "in"), str(tmp_path / "annotated"), "bootstrap", **models, **RUN, mode="annotate")
    selected = capfilt.run(str(tmp_path / "annotated"), str(tmp_path / "selected"), "select", batch_size=4)
    assert 0 < dropped.dropped < dropped.read  # the rule decides something
    assert _files(tmp_path / "selected") == _files(tmp_path / "drop")
    assert (selected.written, selected.dropped, selected.rejected) == (dropped.written, dropped.dropped, 0)
    assert selected.read == selected.written + selected.dropped + selected.rejected
    recorded = json.loads((tmp_path / "selected" / RUN_FILE).read_text())
    assert recorded["keep"] == ["itc>=-0.03", "itm>=0.0"] and set(recorded["scores"]) == {"itm", "itc"}


def test_select_applies_exactly_its_own_rules_and_never_decodes(tiny_models, tmp_path, monkeypatch):
    write_webdataset_shards(tmp_path / "in", shape_items(12), samples_per_shard=6)
    captioner, filter_ = tiny_models
    capfilt.run(str(tmp_path / "in"), str(tmp_path / "annotated"), "bootstrap", captioner=captioner,
                filter=[filter_], mode="annotate", **RUN)

    def no_decoding(*args, **kwargs):
        raise AssertionError("select decoded an image")

    monkeypatch.setattr("capfilt.stages.decode_image", no_decoding)
    summary = capfilt.run(str(tmp_path / "annotated"), str(tmp_path / "out"), "select", keep=["itc>=-0.03"],
                          mode="annotate")
    assert summary.written == summary.read == 12 and summary.dropped == 0
    for sample in _read(tmp_path / "out"):
        for caption in sample.captions():
            assert caption.kept == (caption.scores["itc"] >= -0.03)  # only its rule: the run's itm rule is gone
        assert sample.keeps_every_caption is False  # read back; annotate lists every caption in kept_captions
    with pytest.raises(capfilt.errors.ConfigError, match="scores the input has: itm, itc"):
        capfilt.run(str(tmp_path / "annotated"), str(tmp_path / "bad"), "select", keep=["clip>=0.3"])


def _read(directory: Path, format_name: str = "webdataset") -> list[Sample]:
    fs, fmt = fsspec.filesystem("file"), FORMATS[format_name]
    return [s for shard in fmt.list_shards(fs, str(directory)) for s in fmt.read_shard(fs, shard, None)
            if isinstance(s, Sample)]


def _scored_output(directory: Path, scores: list[float]) -> None:
    """An annotated output holding one image per score, its web caption scored `clip`, as a run writes it."""
    fs, fmt = fsspec.filesystem("file"), FORMATS["webdataset"]
    items = shape_items(len(scores))
    for shard_index, start in enumerate(range(0, len(scores), 5)):
        with fmt.open_writer(fs, str(directory), f"{shard_index:05d}") as writer:
            for (key, image, _, _), score in zip(items[start:start + 5], scores[start:start + 5]):
                sample = Sample(key, image, "jpg", f"caption {key}", web_scores={"clip": score}, web_kept=True)
                writer.write(sample)
    record = {"command": "filter", "keep": ["clip>=-1.0"], "keep_best": None,
              "scores": {"clip": Score("clip", -1.0, 1.0, "cosine").record()}}
    (directory / RUN_FILE).write_text(json.dumps(record))


def test_keep_top_is_exact_over_the_whole_input(tmp_path):
    scores = [round(0.05 * i - 0.2, 2) for i in range(20)]  # -0.2 .. 0.75, five images per shard
    _scored_output(tmp_path / "scored", scores)
    summary = capfilt.run(str(tmp_path / "scored"), str(tmp_path / "top"), "select", keep_top=["clip:0.3"])
    kept = sorted(s.web_scores["clip"] for s in _read(tmp_path / "top"))
    assert kept == sorted(scores)[-6:]  # the top 30% of 20 captions, though they sit in the last two shards
    assert (summary.written, summary.dropped) == (6, 14)
    # with another rule, both hold
    capfilt.run(str(tmp_path / "scored"), str(tmp_path / "both"), "select", keep=["clip<0.7"], keep_top=["clip:0.3"])
    assert sorted(s.web_scores["clip"] for s in _read(tmp_path / "both")) == sorted(scores)[-6:-2]


def test_a_run_scored_for_a_top_fraction_judges_nothing_and_select_keeps_it(tmp_path):
    """DataComp's recipe as a preset (`keep_top`, as `datacomp`'s): the scoring run writes every captioned sample
    with its score and judges none; `select` with no flag keeps the top fraction the run recorded, exactly as
    `--keep-top` does."""
    clip = build_tiny_clip(tmp_path / "clip", seed=0)
    preset = tmp_path / "top.toml"
    preset.write_text(f'description = "top 30% by CLIP"\nfilters = ["{clip}"]\nkeep_top = ["clip:0.3"]\n')
    write_webdataset_shards(tmp_path / "in", shape_items(12), samples_per_shard=4)
    scored = capfilt.run(str(tmp_path / "in"), str(tmp_path / "scored"), "filter", preset=str(preset),
                         device="cpu", dtype="fp32")
    assert (scored.read, scored.written, scored.dropped, scored.rejected) == (12, 9, 0, 3)  # 3 have no caption
    assert scored.select_top == ["clip:0.3"] and (scored.captions_scored, scored.captions_kept) == (9, 0)
    samples = _read(tmp_path / "scored")
    assert all(s.web_kept is None and "clip" in s.web_scores for s in samples)  # scored, not judged
    top = capfilt.run(str(tmp_path / "scored"), str(tmp_path / "top"), "select")
    explicit = capfilt.run(str(tmp_path / "scored"), str(tmp_path / "explicit"), "select", keep_top=["clip:0.3"])
    assert (top.written, top.dropped) == (explicit.written, explicit.dropped) == (3, 6)  # round(0.3 * 9)
    assert _files(tmp_path / "top") == _files(tmp_path / "explicit")
    best = sorted(s.web_scores["clip"] for s in samples)[-3:]
    assert sorted(s.web_scores["clip"] for s in _read(tmp_path / "top")) == best
    # Selecting again from the selection keeps it whole: its threshold rule, not another top 30% of it.
    again = capfilt.run(str(tmp_path / "top"), str(tmp_path / "again"), "select")
    assert (again.written, again.dropped) == (3, 0)
    # Rules given on the command line replace the preset's recipe, as they replace its `keep`.
    ruled = capfilt.run(str(tmp_path / "in"), str(tmp_path / "ruled"), "filter", preset=str(preset),
                        keep=["clip>=-1"], device="cpu", dtype="fp32")
    assert ruled.select_top == [] and ruled.captions_kept == 9


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_the_metadata_parquet_holds_what_the_tar_holds(tiny_models, shapes_dataset, tmp_path):
    captioner, filter_ = tiny_models
    capfilt.run(str(shapes_dataset), str(tmp_path / "out"), "bootstrap", captioner=captioner, filter=[filter_],
                mode="annotate", **RUN)
    for tar_path in sorted((tmp_path / "out").glob("*.tar")):
        rows = pq.read_table(tar_path.with_suffix(".parquet")).to_pylist()
        members = _tar_samples(tar_path)
        assert [row["key"] for row in rows] == list(members)
        for row in rows:
            sample = members[row["key"]]
            assert row["primary_caption"] == sample["txt"].decode()
            fields = json.loads(sample["json"])
            for name, value in fields.items():
                if name == "synthetic_captions":  # decoding settings are JSON text in Parquet
                    value = [{**c, "decoding": json.dumps(c["decoding"])} for c in value]
                assert row[name] == value, name
            # beyond the JSON: the primary caption, and the web scores of a sample without a web caption (null)
            extra = {name: row[name] for name in set(row) - set(fields) - {"primary_caption"}}
            assert set(extra) <= {"web_itm_score", "web_itc_score"} and set(extra.values()) <= {None}


def test_outputs_of_img2dataset_shards_keep_its_metadata_columns_and_types(tiny_models, tmp_path):
    filter_ = tiny_models[1]
    for format_name in ("webdataset", "files"):
        out = tmp_path / format_name
        capfilt.run(str(FIXTURES / format_name), str(out), "filter", filter=[filter_], mode="annotate",
                    batch_size=4, device="cpu", dtype="fp32", scores="itm,itc")
        for shard in ("00000", "00001"):
            schema = pq.read_schema(out / f"{shard}.parquet")
            types = dict(zip(schema.names, schema.types))
            assert {name: types.get(name) for name in IMG2DATASET_METADATA_TYPES} == IMG2DATASET_METADATA_TYPES
            assert types["web_itm_score"] == types["web_itc_score"] == "double"
            rows = pq.read_table(out / f"{shard}.parquet").to_pylist()
            source = {row["key"]: row for row in pq.read_table(FIXTURES / format_name / f"{shard}.parquet").to_pylist()}
            for row in rows:
                assert {name: row[name] for name in IMG2DATASET_METADATA_TYPES} == source[row["key"]]
                assert 0.0 <= row["web_itm_score"] <= 1.0 or row["web_caption"] is None


def test_odd_sidecars_are_written_and_read_back(tiny_models, tmp_path):
    """A sidecar Parquet cannot store as it is (an empty object) becomes JSON text in the metadata Parquet;
    an input field named like a score field of capfilt's is replaced by capfilt's own, not read back as one."""
    (tmp_path / "in").mkdir()
    with tarfile.open(tmp_path / "in" / "00000.tar", "w") as tar:
        for key, image, caption, meta in shape_items(4):
            sidecar = {**meta, "empty": {}, "web_itm_score": "x", "nested": [{}]}
            members = {"jpg": image, "json": json.dumps(sidecar).encode(), **({"txt": caption.encode()} if caption else {})}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    summary = capfilt.run(str(tmp_path / "in"), str(tmp_path / "out"), "filter", filter=[tiny_models[1]],
                          scores="itc", mode="annotate", batch_size=4, device="cpu", dtype="fp32")
    assert summary.rejected == 1 and summary.written == 3  # the image without any caption
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert [row["empty"] for row in rows] == ["{}"] * 3 and [row["nested"] for row in rows] == ["[{}]"] * 3
    samples = _read(tmp_path / "out")
    assert len(samples) == 3 and all(isinstance(s.web_scores["itm"], float) for s in samples)
