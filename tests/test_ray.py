"""Shards on a Ray cluster write what a local run writes, even when an actor's process dies mid-shard."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from capfilt.errors import ConfigError, ModelLoadError
from capfilt.pipeline import Pipeline, resolve, run
from capfilt.runners import ray as ray_runner
from tests.conftest import shape_items
from tests.datasets import write_webdataset_shards
from tests.test_resume import bootstrap_config, output_files


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local two-CPU Ray cluster; its address, for drivers in other processes."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             logging_level=logging.WARNING)  # its own cluster, even where one is running already
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tiny_models, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """The reference: the whole job in this process. Six shards, more than two actors hold at once, so
    finished actors are handed further shards."""
    directory = tmp_path_factory.mktemp("local")
    items = shape_items(24, seed=4)
    items[5] = (items[5][0], b"not an image", "a caption", None)  # a reject must come through Ray too
    input = directory / "in"
    write_webdataset_shards(input, items, samples_per_shard=4)
    run(bootstrap_config(input, directory / "out", tiny_models))
    return input, output_files(directory / "out")


def test_cli_run_on_a_cluster_gives_the_local_output(cluster, tiny_models, local_run, tmp_path):
    input, reference = local_run
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "capfilt", "bootstrap", str(input), str(out), "--captioner", tiny_models[0],
         "--filter", tiny_models[1], "--num-captions", "2", "--max-length", "12", "--min-length", "4", "--seed", "7",
         "--scores", "itm,itc", "--threshold", "0", "--itc-threshold", "-1", "--device", "cpu", "--quiet",
         "--ray", cluster, "--ray-workers", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert len(list(out.glob("*.tar"))) == 6
    assert output_files(out) == reference


def test_actor_killed_mid_shard_is_restarted_and_the_shard_rerun(cluster, tiny_models, local_run, tmp_path):
    input, reference = local_run
    out = tmp_path / "out"
    pipeline = Pipeline(bootstrap_config(input, out, tiny_models, ray="auto", ray_workers=1, batch_size=1))
    [actor] = pipeline.runner.actors
    pid = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()))
    errors: list[BaseException] = []

    def run_pipeline() -> None:
        try:
            pipeline.run()
        except BaseException as error:  # reported below
            errors.append(error)

    runner = threading.Thread(target=run_pipeline)
    runner.start()
    killed_mid_shard = False
    deadline = time.monotonic() + 120
    while runner.is_alive() and time.monotonic() < deadline:
        if any(out.glob("00001.tar.*.tmp")):  # shard 00000 is done, 00001 half written
            killed_mid_shard = not (out / "00001_stats.json").exists()
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.002)
    runner.join(timeout=300)
    assert not errors, errors
    assert killed_mid_shard
    assert output_files(out) == reference


def test_a_model_that_cannot_load_fails_before_any_shard_in_one_line(cluster, tiny_models, local_run, tmp_path):
    input, _ = local_run
    config = bootstrap_config(input, tmp_path / "out", tiny_models, captioner=str(tmp_path / "missing"),
                              ray="auto", ray_workers=1)
    with pytest.raises(ModelLoadError) as raised:
        Pipeline(config)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()  # nothing written, not even the run's settings or its folder


def test_more_workers_than_the_cluster_can_hold_is_a_config_error(cluster, tiny_models, local_run, tmp_path):
    input, _ = local_run
    config = bootstrap_config(input, tmp_path / "out", tiny_models, ray="auto", ray_workers=3)
    with pytest.raises(ConfigError, match="cluster has 2 CPU"):
        Pipeline(config)
    cuda = bootstrap_config(input, tmp_path / "out", tiny_models, ray="auto", device="cuda")
    with pytest.raises(ConfigError, match="cluster has 0 GPU"):
        Pipeline(cuda)


def test_without_ray_installed_the_error_says_how_to_get_it(tiny_models, local_run, tmp_path, monkeypatch):
    input, _ = local_run
    config = bootstrap_config(input, tmp_path / "out", tiny_models, ray="auto")
    monkeypatch.setattr(ray_runner, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'capfilt\[ray\]'"):
        ray_runner.RayRunner(config, resolve(config))
