"""A job spread over processes, devices or shares writes what one process writes."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from capfilt.api import share_of_job
from capfilt.cli import app
from capfilt.errors import ConfigError
from capfilt.formats.base import Shard
from capfilt.inspect import summarize
from capfilt.pipeline import Pipeline, run, shard_share
from tests.test_resume import bootstrap_config, make_dataset, output_files


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shares_cover_every_shard_exactly_once(count):
    shards = [Shard(f"/in/{i:05d}.tar", f"{i:05d}") for i in range(11)]
    shares = [shard_share(shards, index, count) for index in range(count)]
    assert sorted(s.name for share in shares for s in share) == [s.name for s in shards]
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_slurm_array_variables_give_the_share(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")  # --array=1-4: the third task
    assert share_of_job(None, None) == (2, 4)
    assert share_of_job(0, 2) == (0, 2)  # flags win
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    assert share_of_job(None, None) == (0, 1)


def test_share_out_of_range_is_a_config_error(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="--shard-index"):
        bootstrap_config(tmp_path, tmp_path / "out", tiny_models, shard_index=2, num_shards=2)


@pytest.fixture(scope="module")
def local_run(tiny_models, tmp_path_factory):
    """The reference: the whole job in one process."""
    directory = tmp_path_factory.mktemp("local")
    input = make_dataset(directory / "in")
    run(bootstrap_config(input, directory / "out", tiny_models))
    return input, output_files(directory / "out")


def test_shares_then_summary_equal_one_run(tiny_models, local_run, tmp_path):
    input, reference = local_run
    out = tmp_path / "out"
    first = run(bootstrap_config(input, out, tiny_models, shard_index=1, num_shards=2))
    assert first.shards == 2 and not (out / "capfilt_summary.json").exists()  # a share writes no run summary
    _, missing = summarize(str(out))
    assert missing == ["00000", "00002"] and not (out / "capfilt_summary.json").exists()
    result = CliRunner().invoke(app, ["summary", str(out)])
    assert result.exit_code == 2 and "not complete yet: 00000, 00002" in result.output

    run(bootstrap_config(input, out, tiny_models, shard_index=0, num_shards=2))
    result = CliRunner().invoke(app, ["summary", str(out)])
    assert result.exit_code == 0, result.output
    assert output_files(out) == reference


def test_shares_run_concurrently_on_one_output(tiny_models, local_run, tmp_path):
    """Two shares started together (a job array) do not lock each other out or clean each other's files."""
    import threading

    input, reference = local_run
    out = tmp_path / "out"
    pipelines = [Pipeline(bootstrap_config(input, out, tiny_models, shard_index=i, num_shards=2)) for i in range(2)]
    errors: list[BaseException] = []

    def share(pipeline: Pipeline) -> None:
        try:
            pipeline.run()
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=share, args=(p,)) for p in pipelines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    summary, missing = summarize(str(out))
    assert not missing and summary.written == json.loads(reference["capfilt_summary.json"])["written"]
    assert output_files(out) == reference


@pytest.mark.slow
def test_one_process_per_device_gives_the_local_output(tiny_models, local_run, tmp_path, caplog, capfd):
    input, reference = local_run
    out = tmp_path / "out"
    caplog.set_level(logging.INFO, logger="capfilt")
    summary = run(bootstrap_config(input, out, tiny_models, devices=("cpu", "cpu")))
    assert summary.shards == 4
    assert output_files(out) == reference
    # Each device process says which model it loads where, as one line, like the main process.
    loading = [line for line in capfd.readouterr().err.splitlines() if line.startswith("capfilt: loading the")]
    assert sorted(loading) == sorted([f"capfilt: loading the {role} {model} on cpu (float32)"
                                      for role, model in zip(("captioner", "filter"), tiny_models)] * 2)


def test_cli_share_writes_its_shards_only(tiny_models, local_run, tmp_path):
    input, _ = local_run
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "caption", str(input), str(out), "--captioner", tiny_models[0], "--max-length", "8", "--min-length", "3",
        "--shard-index", "1", "--num-shards", "3", "--quiet",
    ])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.tar")) == ["00001.tar"]
    assert not (out / "capfilt_summary.json").exists()
