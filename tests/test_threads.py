"""On CPU the model stages split the cores between them and the decode workers use one torch thread each, so
that a run's threads do not oversubscribe the cores; `--threads` sets the model stages' count."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from capfilt import stages
from capfilt.api import build_config
from capfilt.config import Command, RunConfig
from capfilt.pipeline import run
from capfilt.threads import decode_worker_threads, model_stage_threads, use_threads


def in_thread(torch_threads: int, function: Callable[[], object]) -> None:
    """Run `function` in a new thread whose torch thread count is `torch_threads`, as if the machine had that
    many cores, and leave the count that threads started later begin with as it was."""
    before = torch.get_num_threads()
    errors: list[BaseException] = []

    def target() -> None:
        torch.set_num_threads(torch_threads)
        try:
            function()
        except BaseException as error:  # re-raised in the test's thread
            errors.append(error)

    for thread in (threading.Thread(target=target), threading.Thread(target=torch.set_num_threads, args=(before,))):
        thread.start()
        thread.join()
    if errors:
        raise errors[0]


@pytest.fixture
def threads_seen(monkeypatch) -> dict[str, set[int]]:
    """The torch thread counts that each stage, and the decode workers, ran with."""
    seen: dict[str, set[int]] = defaultdict(set)

    def recording(cls: type, method: str, name: str) -> None:
        original = getattr(cls, method)

        def wrapper(self, *args):
            seen[name].add(torch.get_num_threads())
            return original(self, *args)

        monkeypatch.setattr(cls, method, wrapper)

    recording(stages.CaptionStage, "process", "caption")
    recording(stages.ScoreStage, "process", "filter")
    recording(stages.DecodeStage, "_decode", "decode")
    return seen


def config(command: Command, input: Path, output: Path, models: tuple[str, str], **options) -> RunConfig:
    """What `capfilt.run` runs on the CPU: short beam captions, the filter's default scores and keep rule."""
    settings: dict = {"batch_size": 4, "device": "cpu", "dtype": "float32"}
    if command in (Command.caption, Command.bootstrap):
        settings.update(captioner=models[0], num_beams=2, max_length=8, min_length=3)
    if command in (Command.filter, Command.bootstrap):
        settings.update(filter=[models[1]])
    return build_config(command, str(input), str(output), **{**settings, **options})


def test_a_thread_sets_its_own_count_only():
    before = torch.get_num_threads()
    seen = []
    thread = threading.Thread(target=lambda: (use_threads(1), seen.append(torch.get_num_threads())))
    thread.start()
    thread.join()
    in_thread(before, lambda: None)  # leave threads started later as they were
    assert seen == [1] and torch.get_num_threads() == before


def test_the_split():
    assert model_stage_threads(3, 2, "cpu") == 3
    assert model_stage_threads(None, 2, "cuda") is None and decode_worker_threads("cuda") is None
    assert decode_worker_threads("cpu") == 1
    seen = []
    in_thread(5, lambda: seen.extend(model_stage_threads(None, stages, "cpu") for stages in (1, 2, 6)))
    assert seen == [5, 2, 1]


def test_by_default_the_model_stages_split_the_cores(tiny_models, shapes_dataset, tmp_path, threads_seen):
    before = torch.get_num_threads()
    in_thread(4, lambda: run(config(Command.bootstrap, shapes_dataset, tmp_path / "both", tiny_models)))
    assert threads_seen == {"caption": {2}, "filter": {2}, "decode": {1}}
    assert torch.get_num_threads() == before, "the caller's thread keeps its count"

    threads_seen.clear()
    in_thread(4, lambda: run(config(Command.caption, shapes_dataset, tmp_path / "caption", tiny_models)))
    assert threads_seen == {"caption": {4}, "decode": {1}}


def test_threads_sets_each_model_stage_and_may_change_on_resume(tiny_models, shapes_dataset, tmp_path, threads_seen):
    run(config(Command.bootstrap, shapes_dataset, tmp_path / "out", tiny_models, threads=1))
    assert threads_seen == {"caption": {1}, "filter": {1}, "decode": {1}}
    summary = run(config(Command.bootstrap, shapes_dataset, tmp_path / "out", tiny_models, threads=2))
    assert summary.written + summary.dropped == 20  # resumed: the finished shards are counted, not redone
