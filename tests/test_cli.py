"""The `capfilt` command: a real process runs a job; every user error is one line and a non-zero exit."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    assert settings["decoding"]["num_beams"] == 2 and settings["keep"] == ["itm>=0.0"]  # --threshold 0


@pytest.mark.parametrize(
    "args,expected",
    [
        (["filter", "/no/such/dir", "OUT", "--filter", "X"], "does not exist"),
        (["filter", "IN", "OUT", "--preset", "blip-huge"], "unknown preset 'blip-huge'"),
        (["filter", "IN", "OUT", "--filter", "FILTER", "--threshold", "1.5"],
         "'itm>=1.5' is outside the range of 'itm'"),
        (["filter", "IN", "OUT", "--filter", "FILTER", "--scores", "clip"], "--scores names 'clip'"),
        (["bootstrap", "IN", "OUT", "--num-beams", "2", "--num-captions", "3"], "at most --num-beams"),
        (["caption", "IN", "OUT", "--top-p", "0"], "--top-p"),
        (["caption", "IN", "OUT", "--min-length", "40"], "--min-length"),
        (["filter", "IN", "OUT", "--storage-options", "{nope"], "not valid JSON"),
        (["filter", "IN", "OUT", "--filter", "/no/such/model"], "not a directory"),
        (["filter", "IN", "OUT", "--output-format", "csv", "--filter", "FILTER"], "unknown format 'csv'"),
        (["filter", "IN", "OUT", "--input-format", "zip", "--filter", "FILTER"], "unknown format 'zip'"),
        (["filter", "IN", "IN", "--filter", "FILTER"], "output"),
        (["filter", "IN", "IN/cleaned", "--filter", "FILTER"], "inside the input folder"),
        (["filter", "IN", "OUT", "--filter", "FILTER", "--device", "gpu0"], "unknown device 'gpu0'"),
        (["filter", "IN", "OUT", "--filter", "FILTER", "--devices", "cpu,tpu9"], "unknown device 'tpu9'"),
        (["filter", "IN", "OUT", "--filter", "FILTER", "--device", "cuda:99"], "cuda:99"),
        (["filter", "IN", "OUT", "--filter", "/no/such/model", "--devices", "cpu,cpu"], "not a directory"),
        (["filter", "IN", "OUT", "--filter", "FILTER", "--shard-index", "3", "--num-shards", "2"], "--shard-index"),
    ],
)
def test_user_errors_are_one_clear_line(tiny_models, shapes_dataset, tmp_path, args, expected):
    replace = {"IN": str(shapes_dataset), "OUT": str(tmp_path / "out"), "FILTER": tiny_models[1]}
    args = [replace.get(a, a.replace("IN/", f"{shapes_dataset}/")) for a in args]  # IN/cleaned: inside IN
    assert_one_line_error(run_cli(*args), expected)


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
    scores = sorted(caption.scores["itm"] for sample in written for caption in sample.captions())
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


# --- the first hour: fast answers, clear messages ------------------------------------------------------------

IMPORTED_MODEL_LIBRARIES = """
import sys
from capfilt.cli import app
try:
    app(sys.argv[1:])
except SystemExit:
    pass
print("imported:", sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""


def test_commands_that_run_no_model_import_no_model_library(shapes_dataset, tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "capfilt_run.json").write_text(json.dumps({"input": str(shapes_dataset)}))
    commands = [["--help"], ["--version"], ["presets"], ["caption", "--help"], ["show", str(shapes_dataset)],
                ["summary", str(tmp_path / "job")], ["bootstrap", "IN", "OUT", "--top-p", "0"],
                ["filter", "IN", "OUT", "--device", "gpu0"], ["caption", "IN", "OUT", "--num-beams", "x"],
                ["filter", "IN", "OUT", "--storage-options", "{nope"], ["filter", "IN"]]
    for command in commands:
        result = subprocess.run([sys.executable, "-c", IMPORTED_MODEL_LIBRARIES, *command], check=False,
                                capture_output=True, text=True, timeout=60)
        assert result.stdout.splitlines()[-1] == "imported: []", (command, result.stdout, result.stderr)


def test_version_prints_capfilt_s_version():
    from capfilt import __version__

    result = run_cli("--version")
    assert result.exit_code == 0 and result.output == f"capfilt {__version__}\n"


def test_presets_marks_the_default_one():
    from capfilt.presets import DEFAULT_PRESET

    lines = run_cli("presets").output.splitlines()
    assert [line.split()[0] for line in lines if "(default)" in line] == [DEFAULT_PRESET]


def test_help_shows_every_default_including_the_preset_s():
    result = CliRunner().invoke(app, ["bootstrap", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for option, default in [("--top-p", "preset: 0.9"), ("--keep", "preset's: itm>=0.5"),
                            ("--max-length", "preset: 30"), ("--batch-size", "32"), ("--preset", "blip-large"),
                            ("--device", "auto")]:
        assert re.search(rf"{option} .*?\[default: \(?{re.escape(default)}\)?\]", text), (option, text)
    assert "top-p ." not in text and "top-p." in text  # no text swallowed as rich markup


# `python -m capfilt`, with Python's own Ctrl-C handler even where this test's process was started ignoring SIGINT
# (as a shell does for background jobs), which Python would otherwise pass on.
AT_A_TERMINAL = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                 "runpy.run_module('capfilt', run_name='__main__')")


def capfilt_process(*args: str) -> subprocess.Popen:
    """A real `capfilt` process, as started at a terminal."""
    return subprocess.Popen([sys.executable, "-c", AT_A_TERMINAL, *args], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def interrupted_lines(process: subprocess.Popen, stderr_before: str = "") -> list[str]:
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr_before + stderr
    assert "Traceback" not in stderr_before + stderr
    return [line for line in (stderr_before + stderr).splitlines() if line.startswith("capfilt:")]


def test_ctrl_c_while_torch_imports_is_one_line_and_status_130(shapes_dataset, tmp_path):
    process = capfilt_process("bootstrap", str(shapes_dataset), str(tmp_path / "out"), "--preset", "demo")
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline:  # torch's library is loading
        time.sleep(0.01)
    assert interrupted_lines(process) == ["capfilt: interrupted"]


def test_ctrl_c_while_models_load_is_one_line_and_status_130(shapes_dataset, tmp_path):
    process = capfilt_process("bootstrap", str(shapes_dataset), str(tmp_path / "out"), "--preset", "demo")
    first = process.stderr.readline()
    assert first.startswith("capfilt: loading the captioner"), first  # which model, on which device
    lines = interrupted_lines(process, first)
    # Cut while the filter loads, one line; or, if the run had just started, the one line that says so.
    assert len(lines) in (2, 3) and lines[0] == first.strip(), lines
    assert lines[-1] == "capfilt: interrupted" or "Rerun the same command to resume" in lines[-1], lines
    assert not (tmp_path / "out" / "capfilt.lock").exists()


def test_model_loading_lines_are_silent_with_quiet_and_printed_once(tiny_models, shapes_dataset, tmp_path):
    args = ["filter", str(shapes_dataset), "OUT", "--filter", tiny_models[1], "--threshold", "0"]
    loud = run_cli(*[str(tmp_path / "loud") if a == "OUT" else a for a in args])
    assert loud.exit_code == 0, loud.output
    assert [line for line in loud.output.splitlines() if "loading the filter" in line] == [
        f"capfilt: loading the filter {tiny_models[1]} on cpu (float32)"
    ]
    quiet = run_cli(*[str(tmp_path / "quiet") if a == "OUT" else a for a in args], "--quiet")
    assert quiet.exit_code == 0 and quiet.output == "", quiet.output


def test_an_unexpected_error_is_one_line_or_with_debug_its_traceback(tiny_models, shapes_dataset, tmp_path,
                                                                      monkeypatch):
    from capfilt.pipeline import Pipeline

    def broken(self):
        raise ValueError("a bug\nover two lines")

    monkeypatch.setattr(Pipeline, "run", broken)
    args = ["filter", str(shapes_dataset), str(tmp_path / "out"), "--filter", tiny_models[1], "--quiet"]
    result = run_cli(*args)
    assert result.exit_code == 1, result.output
    assert result.output == "capfilt: error: ValueError: a bug over two lines (rerun with --debug for the traceback)\n"
    result = run_cli(*args, "--debug")
    assert result.exit_code == 1 and "Traceback" in result.output and "in broken" in result.output, result.output
    assert result.output.splitlines()[-1] == "capfilt: error: ValueError: a bug over two lines"


def test_debug_shows_the_traceback_of_a_failed_shard(tiny_models, shapes_dataset, tmp_path, monkeypatch):
    from capfilt.stats import ShardStats
    from capfilt.worker import ShardWorker

    def failing(self, shard):
        return ShardStats(shard=shard.name, error="RuntimeError: boom", traceback="Traceback (most recent call last):\n"
                          "  File 'worker.py', line 1, in run_shard\nRuntimeError: boom\n")

    monkeypatch.setattr(ShardWorker, "run_shard", failing)
    args = ["filter", f"{shapes_dataset}/00000.tar", str(tmp_path / "out"), "--filter", tiny_models[1]]
    plain = run_cli(*args)
    assert "shard 00000: RuntimeError: boom" in plain.output and "Traceback" not in plain.output, plain.output
    debug = run_cli(*args, "--overwrite", "--debug")
    assert "in run_shard" in debug.output and debug.exit_code == 2, debug.output


def test_a_rerun_says_what_it_skips_and_a_finished_job_has_nothing_to_do(tiny_models, shapes_dataset, tmp_path):
    out = tmp_path / "out"
    args = ["filter", str(shapes_dataset), str(out), "--filter", tiny_models[1], "--threshold", "0"]
    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    assert re.search(r"samples\D*20/20", first.output), first.output  # a total, from img2dataset's _stats.json
    assert "resuming" not in first.output and "nothing to do" not in first.output
    (out / "00001_stats.json").unlink()
    resumed = run_cli(*args)
    assert "resuming: 2 shards already complete, 1 to do" in resumed.output, resumed.output
    assert re.search(r"samples\D*7/7", resumed.output), resumed.output  # the shard to do, not the skipped ones
    finished = run_cli(*args)
    assert finished.exit_code == 0, finished.output
    assert "nothing to do: 3 shards already complete" in finished.output
    assert "images/s" not in finished.output  # no speed made up from no work
    assert re.search(r"read\s+│\s+20", finished.output)  # the job's totals are still shown
    assert "loading the filter" in resumed.output and "loading the filter" not in finished.output  # no models


def test_the_progress_total_comes_from_parquet_footers(tiny_models, tmp_path):
    from tests.datasets import make_items, write_parquet_shards

    write_parquet_shards(tmp_path / "in", make_items(9), samples_per_shard=4)
    (tmp_path / "in" / "00001_stats.json").unlink()  # the footer alone tells the count
    result = run_cli("filter", str(tmp_path / "in"), str(tmp_path / "out"), "--filter", tiny_models[1])
    assert result.exit_code == 0, result.output
    assert re.search(r"samples\D*9/9", result.output), result.output


def test_show_lists_rejects_and_leaves_out_score_columns_without_values(tiny_models, tmp_path):
    from tests.datasets import make_items, write_webdataset_shards

    items = make_items(3)
    items[1] = ("000000001", b"not an image", "a broken picture", None)
    write_webdataset_shards(tmp_path / "in", items)
    out = tmp_path / "out"
    result = run_cli("caption", str(tmp_path / "in"), str(out), "--captioner", tiny_models[0], "--max-length", "8",
                     "--min-length", "4", "--quiet")
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(app, ["show", str(out)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert len(re.findall(r"│ written\s+│", shown.output)) == 2
    assert re.search(r"│ 000000001\s+│ undecodable_image\s+│", shown.output), shown.output
    header = next(line for line in shown.output.splitlines() if "caption" in line and "sample" in line)
    lowered = header.lower()  # a caption run scores nothing: no score column, whatever its case
    assert "itm" not in lowered and "itc" not in lowered and "kept" not in lowered


def test_show_of_an_input_labels_its_samples_input(shapes_dataset):
    shown = CliRunner().invoke(app, ["show", str(shapes_dataset), "-n", "3"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert len(re.findall(r"│ input\s+│", shown.output)) == 3 and "written" not in shown.output
    assert "no capfilt run wrote" in shown.output


def test_show_of_a_missing_output_or_of_a_run_that_finished_no_shard(tmp_path):
    assert_one_line_error(run_cli("show", str(tmp_path / "nowhere")), f"no output at {tmp_path / 'nowhere'}")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "capfilt_run.json").write_text("{}")
    assert_one_line_error(run_cli("show", str(tmp_path / "failed")), "finished no shard")
    assert_one_line_error(run_cli("summary", str(tmp_path / "nowhere")), "no output at")
