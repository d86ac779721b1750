"""Crashes lose nothing: reruns resume and give the bytes an uninterrupted run gives."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from capfilt.api import build_config
from capfilt.config import Command, FilterMode, RunConfig
from capfilt.errors import ConfigError, OutputError
from capfilt.formats import FORMATS
from capfilt.observer import Observer
from capfilt.output import NON_OUTPUT_SETTINGS, OutputDirectory
from capfilt.pipeline import Pipeline, run
from tests.conftest import shape_items
from tests.datasets import write_webdataset_shards

# Timing fields differ from run to run by nature; everything else must be identical.
TIMING_FIELDS = ("seconds",)


def make_dataset(directory: Path) -> Path:
    items = shape_items(24, seed=4)
    items[3] = (items[3][0], b"not an image", "a caption", None)  # rejects must survive resumption too
    write_webdataset_shards(directory, items, samples_per_shard=6)
    return directory


def bootstrap_config(input: Path, output: Path, models, **options) -> RunConfig:
    """What `capfilt.run(input, output, command="bootstrap", ...)` runs: 2 sampled captions per image, both BLIP
    scores computed and every caption kept (itm>=0.0, itc>=-1.0), on the CPU, with the options of the command
    lines below (`capfilt_process`, and test_ray's), so that their outputs are the same; `options` (the CLI's
    names) override."""
    settings = {
        "captioner": models[0], "filter": [models[1]], "num_captions": 2, "max_length": 12, "min_length": 4,
        "seed": 7, "scores": "itm,itc", "threshold": 0.0, "itc_threshold": -1.0, "batch_size": 4, "device": "cpu",
        "dtype": "float32",
    }
    return build_config(Command.bootstrap, str(input), str(output), **{**settings, **options})


class ShardCounter(Observer):
    def __init__(self) -> None:
        self.started: list[str] = []

    def shard_started(self, shard_name: str) -> None:
        self.started.append(shard_name)


def output_files(directory: Path) -> dict[str, bytes]:
    """Every file of an output; JSON records without timings, the output path and the settings that may differ
    between runs writing the same output (batch size, devices, runner, shard share)."""
    files = {}
    for path in sorted(directory.iterdir()):
        data = path.read_bytes()
        if path.suffix == ".json":
            record = json.loads(data)
            for field in (*TIMING_FIELDS, *NON_OUTPUT_SETTINGS, "output"):
                record.pop(field, None)
            data = json.dumps(record, sort_keys=True).encode()
        files[path.name] = data
    return files


def test_rerun_skips_complete_shards_and_redoes_the_rest(tiny_models, tmp_path):
    input, out = make_dataset(tmp_path / "in"), tmp_path / "out"
    first = run(bootstrap_config(input, out, tiny_models))
    reference = output_files(out)
    (out / "00002_stats.json").unlink()  # as if killed after shard 00002 was written but before its stats
    counter = ShardCounter()
    second = Pipeline(bootstrap_config(input, out, tiny_models, batch_size=3), counter).run()
    assert counter.started == ["00002"]
    assert output_files(out) == reference
    assert (second.read, second.written, second.rejected) == (first.read, first.written, first.rejected)


def test_overwrite_redoes_every_shard(tiny_models, tmp_path):
    input, out = make_dataset(tmp_path / "in"), tmp_path / "out"
    run(bootstrap_config(input, out, tiny_models))
    counter = ShardCounter()
    Pipeline(bootstrap_config(input, out, tiny_models, overwrite=True), counter).run()
    assert counter.started == ["00000", "00001", "00002", "00003"]


def test_rerun_with_other_settings_is_refused(tiny_models, tmp_path):
    input, out = make_dataset(tmp_path / "in"), tmp_path / "out"
    run(bootstrap_config(input, out, tiny_models))
    other = {"threshold": 0.7, "itc_threshold": None, "scores": None, "mode": FilterMode.drop}  # ITM alone, >= 0.7
    with pytest.raises(ConfigError, match=r"other settings.*keep: \[.*\] -> \['itm>=0\.7'\].*--overwrite"):
        run(bootstrap_config(input, out, tiny_models, **other))
    with pytest.raises(ConfigError, match="decoding"):  # DecodingSettings(num_beams=3, max_length=12)
        run(bootstrap_config(input, out, tiny_models, num_beams=3, num_captions=1, max_length=12, min_length=10,
                             seed=0))
    run(bootstrap_config(input, out, tiny_models, **other, overwrite=True))


def test_a_second_run_on_the_same_output_is_refused(tiny_models, tmp_path):
    input, out = make_dataset(tmp_path / "in"), tmp_path / "out"
    out.mkdir()
    holder = OutputDirectory(*_local(out), FORMATS["webdataset"])
    holder.lock()
    try:
        with pytest.raises(OutputError, match="another capfilt run .* is writing"):
            run(bootstrap_config(input, out, tiny_models))
    finally:
        holder.unlock()
    run(bootstrap_config(input, out, tiny_models))


def test_a_killed_run_does_not_leave_the_lock_stuck(tiny_models, tmp_path):
    input, out = make_dataset(tmp_path / "in"), tmp_path / "out"
    out.mkdir()
    code = (
        "import sys, time, fsspec; from capfilt.output import OutputDirectory; from capfilt.formats import FORMATS;"
        f"d = OutputDirectory(fsspec.filesystem('file'), {str(out)!r}, FORMATS['webdataset']); d.lock();"
        "print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(OutputError):
        run(bootstrap_config(input, out, tiny_models))
    holder.kill()
    holder.wait()
    assert run(bootstrap_config(input, out, tiny_models)).written > 0


def test_out_of_memory_splits_the_batch_and_keeps_the_smaller_size(tiny_models, tmp_path):
    input = make_dataset(tmp_path / "in")
    run(bootstrap_config(input, tmp_path / "reference", tiny_models))
    pipeline = Pipeline(bootstrap_config(input, tmp_path / "out", tiny_models, batch_size=6))
    caption_stage = pipeline.runner.worker.stages[0]
    original, sizes = caption_stage.process, []

    def small_memory(batch, stats):
        sizes.append(len(batch.samples))
        if len(batch.samples) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(batch, stats)

    caption_stage.process = small_memory
    pipeline.run()
    assert pipeline.runner.worker.stage_batch_limit == {"caption": 2}
    # One failure (the first batch), then every batch goes straight in at the smaller size.
    assert sizes[0] > 2 and max(sizes[1:]) <= 2
    assert output_files(tmp_path / "out") == output_files(tmp_path / "reference")


def _local(path: Path):
    import fsspec

    return fsspec.filesystem("file"), str(path)


def interruptible() -> None:
    """Ctrl-C's signal handled as a terminal's process gets it: a test run started in the background
    (`nohup ... &`) ignores SIGINT, and a child inherits that (capfilt then rightly runs on, as under nohup)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def capfilt_process(input: Path, output: Path, models, batch_size: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "capfilt", "bootstrap", str(input), str(output), "--captioner", models[0],
         "--filter", models[1], "--num-captions", "2", "--max-length", "12", "--min-length", "4", "--seed", "7",
         "--scores", "itm,itc", "--threshold", "0", "--itc-threshold", "-1", "--batch-size", str(batch_size),
         "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible,
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.005)
    return False


KILL_POINTS = {
    "before any shard": lambda out: (out / "capfilt_run.json").exists(),
    "during the first shard": lambda out: any(out.glob("00000.tar.*.tmp")),
    "between shards": lambda out: (out / "00001_stats.json").exists(),
    "during the last shard": lambda out: any(out.glob("00003.tar.*.tmp")),
}


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_gives_the_same_bytes(tiny_models, tmp_path):
    input = make_dataset(tmp_path / "in")
    reference_run = capfilt_process(input, tmp_path / "reference", tiny_models, batch_size=5)
    assert reference_run.wait(timeout=300) == 0, reference_run.stderr.read()
    reference = output_files(tmp_path / "reference")
    killed_at = []
    for name, condition in KILL_POINTS.items():
        out = tmp_path / name.replace(" ", "-")
        victim = capfilt_process(input, out, tiny_models, batch_size=2)
        if wait_for(lambda out=out, condition=condition: condition(out), victim):
            os.kill(victim.pid, signal.SIGKILL)
            killed_at.append(name)
        victim.wait(timeout=300)
        rerun = capfilt_process(input, out, tiny_models, batch_size=3)
        assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
        assert output_files(out) == reference, name
    assert len(killed_at) >= 3, killed_at  # the moments were really hit, not raced past


@pytest.mark.slow
def test_sigint_stops_cleanly_and_the_rerun_finishes(tiny_models, tmp_path):
    input = make_dataset(tmp_path / "in")
    out = tmp_path / "out"
    process = capfilt_process(input, out, tiny_models, batch_size=2)
    assert wait_for(lambda: any(out.glob("00001.tar.*.tmp")), process)
    process.send_signal(signal.SIGINT)
    code = process.wait(timeout=60)
    stderr = process.stderr.read()
    assert code == 130, stderr
    assert "Rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert not list(out.glob("*.tmp")) and not (out / "00001.tar").exists()
    rerun = capfilt_process(input, out, tiny_models, batch_size=2)
    assert rerun.wait(timeout=300) == 0
    assert json.loads((out / "capfilt_summary.json").read_text())["read"] == 24


def test_a_moved_output_folder_still_resumes(tiny_models, tmp_path):
    input, out = make_dataset(tmp_path / "in"), tmp_path / "out"
    run(bootstrap_config(input, out, tiny_models))
    reference = output_files(out)
    moved = out.rename(tmp_path / "moved")
    (moved / "00001_stats.json").unlink()
    counter = ShardCounter()
    Pipeline(bootstrap_config(input, moved, tiny_models), counter).run()
    assert counter.started == ["00001"] and output_files(moved) == reference


def test_an_output_of_an_older_capfilt_resumes_when_the_new_settings_are_off(tiny_models, tmp_path):
    """A setting added since the output was written (absent from its capfilt_run.json) does not stop a resume
    while it is off; turned on, it changes the output and is refused."""
    dataset = tmp_path / "in"
    write_webdataset_shards(dataset, shape_items(8), samples_per_shard=4)
    out = tmp_path / "out"
    run(bootstrap_config(dataset, out, tiny_models))
    run_file = out / "capfilt_run.json"
    recorded = json.loads(run_file.read_text())
    del recorded["keep_dropped"]  # as an older capfilt wrote it
    run_file.write_text(json.dumps(recorded))
    (out / "00001_stats.json").unlink()  # one shard to redo
    assert run(bootstrap_config(dataset, out, tiny_models)).read == 8
    with pytest.raises(ConfigError, match="keep_dropped: False -> True"):  # the resume recorded it off
        run(dataclasses.replace(bootstrap_config(dataset, out, tiny_models), keep_dropped=True))
