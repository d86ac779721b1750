"""Runs a capfilt job: read shards → decode → caption → filter → write shards, one shard at a time.

The shard is the unit of work: its output shard, rejects, dropped list and stats are all written under
temporary names and moved into place when the shard is complete, stats last (its presence marks a finished
shard). Reading and decoding of the next batch overlap the models' work on the current one.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fsspec import AbstractFileSystem

from capfilt import __version__
from capfilt.config import Command, RunConfig
from capfilt.decode import DEFAULT_MAX_PIXELS
from capfilt.errors import ShardReadError
from capfilt.formats import get_format
from capfilt.formats.base import Shard
from capfilt.models import load_captioner, load_filter
from capfilt.observer import Observer
from capfilt.paths import check_output_apart, resolve_input, resolve_output
from capfilt.sample import Reject, Sample
from capfilt.schema import capfilt_fields
from capfilt.stages import Batch, CaptionStage, DecodeStage, FilterStage, Stage
from capfilt.stats import RunSummary, ShardStats

RUN_FILE = "capfilt_run.json"
SUMMARY_FILE = "capfilt_summary.json"


@dataclass
class ShardOutputs:
    """Where one shard's side files go, beside the output shard itself."""

    stats: str
    rejects: str
    dropped: str

    @classmethod
    def of(cls, output_dir: str, shard_name: str) -> "ShardOutputs":
        base = f"{output_dir.rstrip('/')}/{shard_name}"
        return cls(stats=f"{base}_stats.json", rejects=f"{base}_rejects.jsonl", dropped=f"{base}_dropped.jsonl")


class Pipeline:
    """A configured run: resolved input and output, loaded models, and the stages between them."""

    def __init__(self, config: RunConfig, observer: Observer | None = None) -> None:
        self.config = config
        self.observer = observer or Observer()
        self.fs_in, self.input_format, self.shards = resolve_input(
            config.input, config.input_format, config.storage_options
        )
        self.output_format = get_format(config.output_format or self.input_format.name)
        self.fs_out, self.output_dir = resolve_output(config.output, config.storage_options)
        check_output_apart(self.fs_in, self.shards, self.fs_out, self.output_dir)
        self.executor = ThreadPoolExecutor(max_workers=max(1, config.decode_workers))
        self.stages = self._build_stages()

    def _build_stages(self) -> list[Stage]:
        c = self.config
        stages: list[Stage] = [DecodeStage(self.executor, DEFAULT_MAX_PIXELS)]
        if c.command in (Command.caption, Command.bootstrap):
            stages.append(CaptionStage(load_captioner(c.captioner, c.decoding, c.device, c.torch_dtype)))
        if c.command in (Command.filter, Command.bootstrap):
            filter_ = load_filter(c.filter, c.device, c.torch_dtype, c.filtering.text_max_tokens)
            stages.append(FilterStage(filter_, c.filtering))
        return stages

    def run(self) -> RunSummary:
        started = time.perf_counter()
        self._write_json(f"{self.output_dir}/{RUN_FILE}", {"capfilt_version": __version__, **self.config.record()})
        self.observer.run_started(len(self.shards))
        all_stats = []
        try:
            for shard in self.shards:
                self.observer.shard_started(shard.name)
                stats = self.run_shard(shard)
                all_stats.append(stats)
                self.observer.shard_finished(stats)
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
        summary = RunSummary.merge(all_stats, time.perf_counter() - started)
        self._write_json(f"{self.output_dir}/{SUMMARY_FILE}", summary.record())
        return summary

    def run_shard(self, shard: Shard) -> ShardStats:
        stats = ShardStats(shard=shard.name)
        started = time.perf_counter()
        outputs = ShardOutputs.of(self.output_dir, shard.name)
        try:
            layout = self.input_format.table_layout(
                self.fs_in, shard, self.config.caption_column, self.config.image_column
            )
        except ShardReadError as error:  # nothing of this shard can be read: no output shard, only its stats
            stats.error = str(error)
            self._write_json(outputs.stats, stats.record())
            return stats
        writer = self.output_format.open_writer(self.fs_out, self.output_dir, shard.name, layout)
        rejects: list[Reject] = []
        dropped: list[Sample] = []
        with writer:
            for batch in self._batches(shard, stats):
                for stage in self.stages:
                    batch = stage.process(batch, stats)
                for sample in batch.samples:
                    writer.write(sample)
                stats.written += len(batch.samples)
                stats.dropped += len(batch.dropped)
                for reject in batch.rejects:
                    stats.count_reject(reject.reason)
                rejects += batch.rejects
                dropped += batch.dropped
                self.observer.samples_done(len(batch.samples) + len(batch.dropped) + len(batch.rejects))
        self._write_jsonl(outputs.rejects, [r.record() for r in rejects])
        self._write_jsonl(outputs.dropped, [{"key": s.key, **capfilt_fields(s)} for s in dropped])
        stats.seconds = round(time.perf_counter() - started, 3)
        self._write_json(outputs.stats, stats.record())
        return stats

    def _batches(self, shard: Shard, stats: ShardStats) -> Iterator[Batch]:
        """Batches of read samples, filled in a background thread so reading overlaps the models."""
        items: queue.Queue = queue.Queue(maxsize=4)
        stop = threading.Event()

        def produce() -> None:
            try:
                batch = Batch([])
                for item in self.input_format.read_shard(
                    self.fs_in, shard, self.config.caption_column, self.config.image_column
                ):
                    if stop.is_set():
                        return
                    if isinstance(item, Reject):
                        batch.rejects.append(item)
                    else:
                        if item.web_caption is not None and not item.web_caption.strip():
                            item.web_caption = None
                        batch.samples.append(item)
                    if len(batch.samples) + len(batch.rejects) >= self.config.batch_size:
                        items.put(batch)
                        batch = Batch([])
                items.put(batch)
            except BaseException as error:  # handed to the consumer, which decides what it means
                items.put(error)
            items.put(None)

        thread = threading.Thread(target=produce, name=f"read-{shard.name}", daemon=True)
        thread.start()
        try:
            while (item := items.get()) is not None:
                if isinstance(item, ShardReadError):
                    stats.error = str(item)
                elif isinstance(item, BaseException):
                    raise item
                else:
                    stats.read += len(item.samples) + len(item.rejects)
                    yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    items.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

    def _write_json(self, path: str, record: dict) -> None:
        self._write_atomic(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")

    def _write_jsonl(self, path: str, records: list[dict]) -> None:
        self._write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def _write_atomic(self, path: str, text: str) -> None:
        temporary = f"{path}.tmp"
        with self.fs_out.open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        self.fs_out.mv(temporary, path)


def run(config: RunConfig, observer: Observer | None = None) -> RunSummary:
    return Pipeline(config, observer).run()
