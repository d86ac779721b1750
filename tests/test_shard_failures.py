"""A shard fails alone: an exception in a model stage abandons its shard, which a rerun redoes, and shards failing
one after another with the same error stop the run in one line.

Faults are injected into the real models (`capfilt.worker.load_captioner` / `load_filter` return them with
`caption_pixels` / `score_pixels` raising on chosen samples) and run through the real pipeline.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import threading
from collections.abc import Collection
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from capfilt import worker
from capfilt.cli import app
from capfilt.config import RunConfig
from capfilt.formats import webdataset as webdataset_format
from capfilt.observer import Observer
from capfilt.pipeline import SYSTEMATIC_FAILURES, FailureStreak, Pipeline, run
from capfilt.runners import processes
from capfilt.stats import RunSummary, ShardStats
from tests.conftest import shape_items
from tests.datasets import write_webdataset_shards
from tests.test_resume import ShardCounter, bootstrap_config, output_files

SHARDS = 5
SAMPLES_PER_SHARD = 4
# The second sample of each shard: a model may be made to fail on it. Its web caption names it, so that the
# filter, which sees only captions, can tell it too.
ODD_KEYS = {f"{n:05d}": f"{SAMPLES_PER_SHARD * n + 1:09d}" for n in range(SHARDS)}

Faults = dict[str, Exception]  # sample key -> the error a model raises on a batch holding it


def odd_caption(key: str) -> str:
    return f"an odd sample, {key}"


def inject(monkeypatch: pytest.MonkeyPatch, captioner: Faults | None = None, filter: Faults | None = None) -> None:
    """Models loaded from now on raise a fresh copy of `captioner[key]` / `filter[key]` on a batch holding `key`."""

    def raise_on(faults: Faults, keys: list[str]) -> None:
        for key in keys:
            if key in faults:
                raise type(faults[key])(*faults[key].args)

    load_captioner, load_filter = worker.load_captioner, worker.load_filter

    def faulty_captioner(*args, **kwargs):  # type: ignore[no-untyped-def]
        model = load_captioner(*args, **kwargs)
        caption_pixels = model.caption_pixels

        def raising(pixels: torch.Tensor, keys: list[str]) -> list[list[str]]:
            raise_on(captioner or {}, keys)
            return caption_pixels(pixels, keys)

        model.caption_pixels = raising
        return model

    def faulty_filter(*args, **kwargs):  # type: ignore[no-untyped-def]
        model = load_filter(*args, **kwargs)
        score_pixels = model.score_pixels
        by_caption = {odd_caption(key): error for key, error in (filter or {}).items()}

        def raising(pixels: torch.Tensor, captions: list[list[str]], names: Collection[str]) -> list[list]:
            raise_on(by_caption, [text for texts in captions for text in texts])
            return score_pixels(pixels, captions, names)

        model.score_pixels = raising
        return model

    monkeypatch.setattr(worker, "load_captioner", faulty_captioner)
    monkeypatch.setattr(worker, "load_filter", faulty_filter)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("failures") / "in"
    items = shape_items(SHARDS * SAMPLES_PER_SHARD, seed=9)
    odd = set(ODD_KEYS.values())
    items = [(key, image, odd_caption(key) if key in odd else caption, meta) for key, image, caption, meta in items]
    write_webdataset_shards(directory, items, samples_per_shard=SAMPLES_PER_SHARD)
    return directory


@pytest.fixture(scope="module")
def clean_run(tiny_models, dataset, tmp_path_factory) -> tuple[RunSummary, dict[str, bytes]]:
    """The reference: the run without faults, its summary and its files."""
    out = tmp_path_factory.mktemp("clean") / "out"
    summary = run(bootstrap_config(dataset, out, tiny_models))
    assert not summary.failed_shards
    return summary, output_files(out)


def without(files: dict[str, bytes], shard: str) -> dict[str, bytes]:
    """An output's files but the given shard's and the run summary."""
    return {name: data for name, data in files.items() if not name.startswith(shard) and name != "capfilt_summary.json"}


def check_abandoned(out: Path, shard: str, error: str, raised_in: str) -> None:
    """`shard` left no output but its stats, which record `error` and its traceback, and count nothing."""
    assert sorted(p.name for p in out.glob(f"{shard}*")) == [f"{shard}_stats.json"]
    assert not list(out.glob("*.tmp"))
    stats = json.loads((out / f"{shard}_stats.json").read_text())
    assert stats["error"] == error
    assert stats["traceback"].startswith("Traceback") and raised_in in stats["traceback"], stats["traceback"]
    assert stats["read"] == stats["written"] == stats["rejected"] == stats["dropped"] == 0
    assert not stats["histograms"]


@pytest.mark.parametrize("stage", ["captioner", "filter"])
def test_a_model_error_fails_its_shard_alone_and_a_rerun_redoes_it(tiny_models, dataset, clean_run, tmp_path,
                                                                    monkeypatch, stage: str) -> None:
    reference_summary, reference = clean_run
    inject(monkeypatch, **{stage: {ODD_KEYS["00002"]: RuntimeError("CUDA error: an illegal memory access\nmore")}})
    out = tmp_path / "out"
    config = bootstrap_config(dataset, out, tiny_models)
    summary = run(config)

    assert summary.failed_shards == {"00002": "RuntimeError: CUDA error: an illegal memory access"}
    check_abandoned(out, "00002", "RuntimeError: CUDA error: an illegal memory access", "raising")
    assert without(output_files(out), "00002") == without(reference, "00002")
    # Its samples are in no count: the summary accounts for the other shards, and names this one failed.
    assert summary.read == summary.written + summary.dropped + summary.rejected == reference_summary.read - 4
    assert json.loads((out / "capfilt_summary.json").read_text())["failed_shards"] == summary.failed_shards

    monkeypatch.undo()
    counter = ShardCounter()
    rerun = Pipeline(config, counter).run()
    assert counter.started == ["00002"]  # the failed shard is not complete; the others are
    assert not rerun.failed_shards
    assert output_files(out) == reference


class SplitRecorder(Observer):
    def __init__(self) -> None:
        self.splits: list[tuple[str, int]] = []
        self.finished: list[ShardStats] = []

    def batch_split(self, stage: str, batch_size: int) -> None:
        self.splits.append((stage, batch_size))

    def shard_finished(self, stats: ShardStats) -> None:
        self.finished.append(stats)


def test_out_of_memory_with_one_sample_fails_only_its_shard(tiny_models, dataset, clean_run, tmp_path,
                                                            monkeypatch) -> None:
    _, reference = clean_run
    message = "CUDA out of memory. Tried to allocate 20.00 MiB"
    inject(monkeypatch, captioner={ODD_KEYS["00001"]: torch.cuda.OutOfMemoryError(message)})
    out = tmp_path / "out"
    recorder = SplitRecorder()
    summary = Pipeline(bootstrap_config(dataset, out, tiny_models), recorder).run()

    assert recorder.splits == [("caption", 2), ("caption", 1)]  # halved down to the sample alone, then failed
    assert summary.failed_shards == {"00001": f"OutOfMemoryError: {message}"}
    check_abandoned(out, "00001", f"OutOfMemoryError: {message}", "raising")
    assert without(output_files(out), "00001") == without(reference, "00001")  # the rest ran one image at a time
    # The observer gets the traceback, for --debug to show.
    [failed] = [stats for stats in recorder.finished if stats.error]
    assert failed.shard == "00001" and "OutOfMemoryError" in failed.traceback


def cli_bootstrap(dataset: Path, out: Path, models: tuple[str, str], *flags: str):
    return CliRunner().invoke(app, ["bootstrap", str(dataset), str(out), "--captioner", models[0], "--filter",
                                    models[1], "--max-length", "12", "--min-length", "4", "--threshold", "0", "--device", "cpu", *flags])


def test_shards_failing_alike_one_after_another_stop_the_run_in_one_line(tiny_models, dataset, tmp_path,
                                                                         monkeypatch) -> None:
    # The same error, but for the numbers in its message.
    faults = {ODD_KEYS[shard]: RuntimeError(f"device-side assert triggered on sample {ODD_KEYS[shard]}")
              for shard in ("00000", "00001", "00002")}
    inject(monkeypatch, captioner=faults)
    out = tmp_path / "out"
    result = cli_bootstrap(dataset, out, tiny_models, "--quiet")

    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # typer's exit, not an escaped exception
    [line] = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("capfilt: error: shards 00000, 00001, 00002 failed one after another"), line
    assert "RuntimeError: device-side assert triggered on sample" in line and "rerun" in line, line
    assert "Traceback" not in result.output
    # The run stopped there: the shards after were not started, the lock is released, no summary is written.
    assert sorted(p.name for p in out.glob("*_stats.json")) == [f"0000{n}_stats.json" for n in range(3)]
    assert not (out / "capfilt.lock").exists() and not (out / "capfilt_summary.json").exists()

    monkeypatch.undo()
    result = cli_bootstrap(dataset, out, tiny_models, "--quiet")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "capfilt_summary.json").read_text())["read"] == SHARDS * SAMPLES_PER_SHARD


def test_failures_apart_or_with_other_errors_do_not_stop_the_run(tiny_models, dataset, tmp_path,
                                                                 monkeypatch) -> None:
    # 00000 and 00001-00002 fail one after another with two errors; 00003 finishes; 00004 fails like 00002.
    inject(monkeypatch, captioner={ODD_KEYS["00000"]: RuntimeError("one error")},
           filter={ODD_KEYS[shard]: ValueError("another error") for shard in ("00001", "00002", "00004")})
    out = tmp_path / "out"
    result = cli_bootstrap(dataset, out, tiny_models)

    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last == "capfilt: error: 4 shard(s) failed: 00000, 00001, 00002, 00004 (see the summary)", last
    for shard in ("00000", "00001", "00002", "00004"):
        assert f"failed shard {shard}" in result.output  # in the summary table
    summary = json.loads((out / "capfilt_summary.json").read_text())
    assert summary["failed_shards"] == {"00000": "RuntimeError: one error", "00001": "ValueError: another error",
                                        "00002": "ValueError: another error", "00004": "ValueError: another error"}
    assert summary["read"] == summary["written"] == SAMPLES_PER_SHARD  # 00003's, all written
    assert (out / "00003.tar").exists() and not (out / "00002.tar").exists()


def streak_stops(*shards: tuple[str | None, bool]) -> list[bool]:
    """What a streak says after each shard, given as (error, whether it was abandoned)."""
    streak = FailureStreak()
    return [streak.add(ShardStats(shard=f"{n:05d}", error=error, traceback="Traceback ..." if abandoned else None))
            for n, (error, abandoned) in enumerate(shards)]


def test_only_processing_failures_alike_in_a_row_make_a_systematic_error() -> None:
    oom = [(f"OutOfMemoryError: Tried to allocate {size} GiB", True) for size in ("2.00", "3.50", "1.25")]
    assert SYSTEMATIC_FAILURES == 3 and streak_stops(*oom) == [False, False, True]
    assert streak_stops(*oom[:2], (None, False), *oom) == [False, False, False, False, False, True]
    truncated = [(f"/in/{n:05d}.tar: truncated", False) for n in range(4)]  # bad input, not a systematic error
    assert not any(streak_stops(*truncated))
    assert not any(streak_stops(oom[0], truncated[0], *oom[1:]))


FAULTY_SHARD_IN_A_PROCESS = "00001"


def _start_with_a_fault(config: RunConfig, locations: worker.Locations, *start: object) -> None:
    """A device process's start (see capfilt.runners.processes), whose captioner fails on one shard."""
    error = RuntimeError(f"failed in process on {ODD_KEYS[FAULTY_SHARD_IN_A_PROCESS]}")
    inject(pytest.MonkeyPatch(), captioner={ODD_KEYS[FAULTY_SHARD_IN_A_PROCESS]: error})
    _real_start(config, locations, *start)


_real_start = processes._start


@pytest.mark.slow
def test_a_model_error_in_a_device_process_fails_its_shard_alone(tiny_models, dataset, clean_run, tmp_path,
                                                                 monkeypatch) -> None:
    _, reference = clean_run
    monkeypatch.setattr(processes, "_start", _start_with_a_fault)  # pickled by name: the processes run it
    out = tmp_path / "out"
    summary = run(bootstrap_config(dataset, out, tiny_models, devices=("cpu", "cpu")))

    error = f"RuntimeError: failed in process on {ODD_KEYS[FAULTY_SHARD_IN_A_PROCESS]}"
    assert summary.failed_shards == {FAULTY_SHARD_IN_A_PROCESS: error}
    check_abandoned(out, FAULTY_SHARD_IN_A_PROCESS, error, "raising")
    assert without(output_files(out), FAULTY_SHARD_IN_A_PROCESS) == without(reference, FAULTY_SHARD_IN_A_PROCESS)


def test_an_error_writing_the_output_stops_the_run_at_once(tiny_models, dataset, tmp_path, monkeypatch) -> None:
    """Not the shard's fault: every shard would fail alike, so the run stops on the first."""

    def no_space(self, sample) -> None:  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(webdataset_format.TarShardWriter, "write", no_space)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left on device"):
        run(bootstrap_config(dataset, out, tiny_models))
    assert not list(out.glob("0000*")) and not list(out.glob("*.tmp"))


@pytest.mark.parametrize("stage", ["captioner", "filter"])
def test_a_failed_shard_stops_every_thread_of_its_pipeline_before_the_next_shard(tiny_models, dataset, tmp_path,
                                                                                monkeypatch, stage: str) -> None:
    """Each step of a shard runs in a thread; when one raises, all of them end before the shard is given up.
    Left to the garbage collector, one step's clean-up ran in another shard's thread while that held the decode
    pool's lock, and the run hung (seen in a bootstrap whose first shard failed)."""
    inject(monkeypatch, **{stage: {ODD_KEYS["00000"]: RuntimeError("boom")}})
    # One sample a batch: when a step raises, the steps before it are still busy with the shard's next batches.
    config = dataclasses.replace(bootstrap_config(dataset, tmp_path / "out", tiny_models), batch_size=1)
    alive_after_the_failure: list[str] = []
    abandon = worker.ShardWorker._abandon

    def abandoned(self, shard, error, started):  # type: ignore[no-untyped-def]
        alive_after_the_failure.extend(t.name for t in threading.enumerate() if t.name.endswith(f"-{shard.name}"))
        return abandon(self, shard, error, started)

    monkeypatch.setattr(worker.ShardWorker, "_abandon", abandoned)
    gc.disable()  # what the collector would clean up must already be stopped
    try:
        summary = run(config)
    finally:
        gc.enable()
    assert list(summary.failed_shards) == ["00000"] and summary.written > 0
    assert alive_after_the_failure == []
