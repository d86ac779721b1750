"""Object storage through fsspec: an S3-compatible server on localhost (moto's server mode) serves as input and
output of real `capfilt` runs, which must write exactly what the same runs write on a local disk."""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import s3fs
from moto.server import ThreadedMotoServer
from PIL import Image
from typer.testing import CliRunner

from capfilt.cli import app
from capfilt.output import NON_OUTPUT_SETTINGS, RUN_FILE
from capfilt.paths import resolve_input
from capfilt.worker import ShardWorker
from tests.datasets import Item, encode_image, make_items, write_parquet_shards, write_webdataset_shards
from tests.test_resume import TIMING_FIELDS, make_dataset

# The settings of test_resume's runs (every caption kept, two synthetic captions per image, seeded).
RUN_FLAGS = ["--num-captions", "2", "--max-length", "12", "--min-length", "4", "--seed", "7", "--scores", "itm,itc",
             "--threshold", "0", "--itc-threshold", "-1", "--batch-size", "4", "--quiet"]
KEY, SECRET = "capfilt-test-key", "capfilt-test-secret"


@dataclass(frozen=True)
class Bucket:
    name: str
    endpoint: str
    fs: s3fs.S3FileSystem

    def url(self, path: str = "") -> str:
        return f"s3://{self.name}/{path}"

    def upload(self, local: Path, path: str) -> None:
        self.fs.put(f"{local}/", f"{self.name}/{path}", recursive=True)

    def download(self, path: str, local: Path) -> Path:
        self.fs.get(f"{self.name}/{path}/", f"{local}/", recursive=True)
        return local


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    requests_log = logging.getLogger("werkzeug")  # the server logs one line per request
    level = requests_log.level
    requests_log.setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    requests_log.setLevel(level)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path) -> Iterator[Bucket]:
    """A new bucket, with credentials and endpoint in the environment only, as a user sets them."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))  # nothing from the user's ~/.aws
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance would carry another test's listings
    name = f"capfilt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    yield Bucket(name, s3_endpoint, s3fs.S3FileSystem())
    s3fs.S3FileSystem.clear_instance_cache()


def capfilt(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def bootstrap(input: str, output: str, tiny_models, *flags: str) -> None:
    capfilt("bootstrap", input, output, "--captioner", tiny_models[0], "--filter", tiny_models[1], *RUN_FLAGS, *flags)


def output_tree(directory: Path) -> dict[str, bytes]:
    """Every file of an output by its path in it; the run's JSON records without timings, input and output
    locations and the settings that may differ between runs writing the same output."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.parent == directory and path.suffix == ".json":
            record = json.loads(data)
            for field in (*TIMING_FIELDS, *NON_OUTPUT_SETTINGS, "input", "output"):
                record.pop(field, None)
            data = json.dumps(record, sort_keys=True).encode()
        files[path.relative_to(directory).as_posix()] = data
    return files


def record_processed_shards(monkeypatch) -> list[str]:
    """The names of the shards that runs process from now on."""
    processed: list[str] = []
    run_shard = ShardWorker.run_shard

    def recording_run_shard(worker, shard):
        processed.append(shard.name)
        return run_shard(worker, shard)

    monkeypatch.setattr(ShardWorker, "run_shard", recording_run_shard)
    return processed


def test_bootstrap_from_s3_to_s3_writes_what_a_local_run_writes(tiny_models, bucket, tmp_path):
    local_input = make_dataset(tmp_path / "in")
    bucket.upload(local_input, "in")
    bootstrap(local_input.as_uri(), (tmp_path / "local-out").as_uri(), tiny_models)  # file:// URLs
    bootstrap(bucket.url("in"), bucket.url("out"), tiny_models)
    s3_output = output_tree(bucket.download("out", tmp_path / "s3-out"))
    assert s3_output == output_tree(tmp_path / "local-out")
    assert {"00000.tar", "00003_stats.json", "capfilt_summary.json", RUN_FILE} <= set(s3_output)
    assert not bucket.fs.glob(f"{bucket.name}/out/*.tmp")  # every temporary was moved into place


def test_a_rerun_on_s3_resumes_and_clears_what_a_killed_run_left(tiny_models, bucket, tmp_path, monkeypatch):
    bucket.upload(make_dataset(tmp_path / "in"), "in")
    bootstrap(bucket.url("in"), bucket.url("out"), tiny_models)
    reference = output_tree(bucket.download("out", tmp_path / "first"))
    out = f"{bucket.name}/out"
    # As if killed during shard 00002: its stats not written yet, its tar copied into place but the temporary
    # not deleted yet (a move on S3 is a copy, then a delete), its dropped list and a run file half written.
    bucket.fs.rm(f"{out}/00002_stats.json")
    bucket.fs.copy(f"{out}/00002.tar", f"{out}/00002.tar.tmp")
    for leftover in (f"{out}/00002_dropped.jsonl.0123456789ab.tmp", f"{out}/{RUN_FILE}.ba9876543210.tmp"):
        bucket.fs.pipe_file(leftover, b"partial")
    processed = record_processed_shards(monkeypatch)
    bootstrap(bucket.url("in"), bucket.url("out"), tiny_models)
    assert processed == ["00002"]
    assert not bucket.fs.glob(f"{out}/*.tmp")
    assert output_tree(bucket.download("out", tmp_path / "resumed")) == reference


def test_show_and_summary_read_an_output_on_s3(tiny_models, bucket, tmp_path):
    bucket.upload(make_dataset(tmp_path / "in"), "in")
    bootstrap(bucket.url("in"), bucket.url("out"), tiny_models)
    shown = capfilt("show", bucket.url("out"), "--limit", "3")
    assert "first 3 written and dropped samples" in shown and "000000000" in shown
    summary_path = f"{bucket.name}/out/capfilt_summary.json"
    bucket.fs.rm(summary_path)  # as after a job split over processes, which leaves it to `capfilt summary`
    assert "written" in capfilt("summary", bucket.url("out"))
    assert json.loads(bucket.fs.cat_file(summary_path))["read"] == 24


def test_parquet_on_s3_with_storage_options_instead_of_the_environment(tiny_models, bucket, tmp_path, monkeypatch):
    local_input = tmp_path / "in"
    write_parquet_shards(local_input, make_items(10, extra=True), samples_per_shard=5)
    bucket.upload(local_input, "in")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name)
    options = json.dumps({"endpoint_url": bucket.endpoint, "key": KEY, "secret": SECRET})
    # Converted to image folders: on S3 a folder is moved into place object by object.
    to_files = ("--output-format", "files")
    bootstrap(bucket.url("in"), bucket.url("out"), tiny_models, *to_files, "--storage-options", options)
    bootstrap(str(local_input), str(tmp_path / "local-out"), tiny_models, *to_files)
    s3_output = output_tree(bucket.download("out", tmp_path / "s3-out"))  # its client has the credentials already
    assert s3_output == output_tree(tmp_path / "local-out")
    assert {"00000/000000000.jpg", "00001/000000009.json"} <= set(s3_output)
    assert not any(SECRET.encode() in data for data in s3_output.values())  # options are never recorded
    assert "000000000" in capfilt("show", bucket.url("out"), "--limit", "1", "--storage-options", options)


def test_an_image_folder_shard_with_nothing_written_on_s3_is_not_redone(tiny_models, bucket, tmp_path, monkeypatch):
    bucket.upload(make_dataset(tmp_path / "in"), "in")
    drop_all = ("--output-format", "files", "--threshold", "1")  # no caption is a perfect match
    bootstrap(bucket.url("in"), bucket.url("out"), tiny_models, *drop_all)
    processed = record_processed_shards(monkeypatch)
    bootstrap(bucket.url("in"), bucket.url("out"), tiny_models, *drop_all)
    assert processed == []


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs would try to reach Google")
def test_a_missing_filesystem_package_is_named_in_one_line():
    result = CliRunner().invoke(app, ["filter", "gs://bucket/data", "out", "--filter", "unused", "--quiet"])
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert line.startswith("capfilt: error: cannot open input gs://bucket/data:") and "install gcsfs" in line


def fetched_ranges(monkeypatch) -> list[tuple[int, int]]:
    """Every byte range read from S3 files from now on; downloading whole objects fails the test."""
    ranges: list[tuple[int, int]] = []
    fetch = s3fs.core.S3File._fetch_range

    def recording(file, start, end):
        ranges.append((start, end))
        return fetch(file, start, end)

    def no_download(*args, **kwargs):
        raise AssertionError("a reader downloaded a whole object instead of streaming it")

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", recording)
    for name in ("_get_file", "_cat_file", "_get", "_cat"):
        monkeypatch.setattr(s3fs.S3FileSystem, name, no_download)
    return ranges


def noise_items(count: int) -> list[Item]:
    """Samples whose images do not compress, so that shards are large enough to be read in several parts."""
    rng = random.Random(0)
    images = [Image.frombytes("RGB", (32, 32), rng.randbytes(32 * 32 * 3)) for _ in range(count)]
    return [(f"{n:09d}", encode_image(image), f"noise {n}", None) for n, image in enumerate(images)]


@pytest.mark.parametrize("format_name", ["webdataset", "parquet"])
def test_readers_stream_shards_from_s3(format_name, bucket, tmp_path, monkeypatch):
    local_input = tmp_path / "in"
    writer = write_webdataset_shards if format_name == "webdataset" else write_parquet_shards
    [shard_path] = writer(local_input, noise_items(600))  # Parquet: row groups of 100 rows, as img2dataset's
    bucket.upload(local_input, "in")
    fs, fmt, shards = resolve_input(bucket.url("in"), format_name, {"default_block_size": 16 * 1024})
    ranges = fetched_ranges(monkeypatch)
    samples = fmt.read_shard(fs, shards[0], None)
    assert next(samples).key == "000000000"
    shard_size = shard_path.stat().st_size
    assert sum(end - start for start, end in ranges) < shard_size / 3  # the first sample before the whole shard
    assert [sample.key for sample in samples][-1] == "000000599"
    assert sum(end - start for start, end in ranges) < shard_size * 1.2  # each part fetched once
