"""The `capfilt` command: a real process runs a job; every user error is one line and a non-zero exit."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from capfilt.cli import app


def run_cli(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("capfilt: error:") and expected in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_bootstrap_runs_as_a_real_process(tiny_models, shapes_dataset, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "capfilt", "bootstrap", str(shapes_dataset), str(out), "--captioner",
         tiny_models[0], "--filter", tiny_models[1], "--num-beams", "2", "--max-length", "10", "--threshold", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "capfilt summary" in result.stderr and "written" in result.stderr
    assert re.search(r"samples\D*20/", result.stderr), result.stderr  # the progress bar counted every sample
    summary = json.loads((out / "capfilt_summary.json").read_text())
    assert summary["read"] == summary["written"] == 20
    assert summary["synthetic_captions_added"] == 20
    settings = json.loads((out / "capfilt_run.json").read_text())
    assert settings["decoding"]["num_beams"] == 2 and settings["filtering"]["itm_threshold"] == 0


@pytest.mark.parametrize(
    "args,expected",
    [
        (["filter", "/no/such/dir", "OUT", "--filter", "X"], "does not exist"),
        (["filter", "IN", "OUT", "--preset", "blip-huge"], "unknown preset 'blip-huge'"),
        (["filter", "IN", "OUT", "--threshold", "1.5"], "--threshold"),
        (["filter", "IN", "OUT", "--scores", "clip"], "--scores"),
        (["bootstrap", "IN", "OUT", "--num-beams", "2", "--num-captions", "3"], "at most --num-beams"),
        (["caption", "IN", "OUT", "--top-p", "0"], "--top-p"),
        (["caption", "IN", "OUT", "--min-length", "40"], "--min-length"),
        (["filter", "IN", "OUT", "--storage-options", "{nope"], "not valid JSON"),
        (["filter", "IN", "OUT", "--filter", "/no/such/model"], "not a directory"),
        (["filter", "IN", "OUT", "--output-format", "csv", "--filter", "FILTER"], "unknown format 'csv'"),
        (["filter", "IN", "OUT", "--input-format", "zip", "--filter", "FILTER"], "unknown format 'zip'"),
        (["filter", "IN", "IN", "--filter", "FILTER"], "output"),
        (["filter", "IN", "OUT", "--filter", "FILTER", "--device", "gpu0"], "unknown device 'gpu0'"),
        (["filter", "IN", "OUT", "--filter", "FILTER", "--devices", "cpu,tpu9"], "unknown device 'tpu9'"),
        (["filter", "IN", "OUT", "--filter", "FILTER", "--device", "cuda:99"], "cuda:99"),
        (["filter", "IN", "OUT", "--filter", "/no/such/model", "--devices", "cpu,cpu"], "not a directory"),
        (["filter", "IN", "OUT", "--filter", "FILTER", "--shard-index", "3", "--num-shards", "2"], "--shard-index"),
    ],
)
def test_user_errors_are_one_clear_line(tiny_models, shapes_dataset, tmp_path, args, expected):
    replace = {"IN": str(shapes_dataset), "OUT": str(tmp_path / "out"), "FILTER": tiny_models[1]}
    assert_one_line_error(run_cli(*[replace.get(a, a) for a in args]), expected)


def test_presets_lists_the_blip_presets():
    result = run_cli("presets")
    assert result.exit_code == 0
    assert "Salesforce/blip-image-captioning-large" in result.output
    assert "Salesforce/blip-itm-base-coco" in result.output


def test_show_lists_written_and_dropped_samples_with_scores(tiny_models, shapes_dataset, tmp_path):
    from capfilt.inspect import read_output_samples

    args = ["filter", str(shapes_dataset), "OUT", "--filter", tiny_models[1], "--quiet"]
    annotate = [str(tmp_path / "annotate") if a == "OUT" else a for a in args]
    assert run_cli(*annotate, "--mode", "annotate").exit_code == 0
    written, _ = read_output_samples(str(tmp_path / "annotate"), 100, {})
    scores = sorted(caption.itm_score for sample in written for caption in sample.captions())
    out = tmp_path / "out"
    drop = [str(out) if a == "OUT" else a for a in args]
    assert run_cli(*drop, "--threshold", str(scores[len(scores) // 2])).exit_code == 0
    summary = json.loads((out / "capfilt_summary.json").read_text())
    assert summary["written"] and summary["dropped"]  # the threshold splits the random filter's scores
    result = CliRunner().invoke(app, ["show", str(out), "-n", "50"], terminal_width=200)
    assert result.exit_code == 0
    assert len(re.findall(r"│ written\s+│", result.output)) == summary["written"]
    assert len(re.findall(r"│ dropped\s+│", result.output)) == summary["dropped"]


def test_an_output_that_cannot_be_written_is_one_line(tiny_models, shapes_dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("filter", str(shapes_dataset), str(blocker / "out"), "--filter", tiny_models[1], "--quiet")
    assert_one_line_error(result, "a-file")


def test_a_full_disk_is_one_line_and_leaves_no_half_shard(tiny_models, shapes_dataset, tmp_path, monkeypatch):
    import errno

    from capfilt.formats import webdataset as webdataset_format

    def no_space(self, sample):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(webdataset_format.TarShardWriter, "write", no_space)
    out = tmp_path / "out"
    result = run_cli("filter", str(shapes_dataset), str(out), "--filter", tiny_models[1], "--quiet", "--threshold", "0")
    assert_one_line_error(result, "No space left on device")
    assert not list(out.glob("*.tar")) and not list(out.glob("*.tmp"))
