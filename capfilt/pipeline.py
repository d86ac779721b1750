"""Runs a capfilt job: read shards → decode → caption → filter → write shards, one shard at a time.

The shard is the unit of work: its output shard, rejects, dropped list and stats are all written under
temporary names and moved into place when the shard is complete, stats last (its presence marks a finished
shard), so rerunning the same command resumes where a killed run stopped. Reading and decoding of the next
batch overlap the models' work on the current one; a model stage whose batch runs out of device memory is
retried in halves.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from capfilt import __version__
from capfilt.config import Command, RunConfig
from capfilt.decode import DEFAULT_MAX_PIXELS
from capfilt.errors import ShardReadError
from capfilt.formats import get_format
from capfilt.formats.base import Shard
from capfilt.models import load_captioner, load_filter
from capfilt.models.base import ImageModel
from capfilt.observer import Observer
from capfilt.output import SUMMARY_FILE, OutputDirectory
from capfilt.paths import check_output_apart, resolve_input, resolve_output
from capfilt.sample import Reject, Sample
from capfilt.schema import capfilt_fields
from capfilt.stages import Batch, CaptionStage, DecodeStage, FilterStage, Stage
from capfilt.stats import RunSummary, ShardStats


class Pipeline:
    """A configured run: resolved input and output, loaded models, and the stages between them."""

    def __init__(self, config: RunConfig, observer: Observer | None = None) -> None:
        self.config = config
        self.observer = observer or Observer()
        self.fs_in, self.input_format, self.shards = resolve_input(
            config.input, config.input_format, config.storage_options
        )
        self.output_format = get_format(config.output_format or self.input_format.name)
        self.fs_out, output_dir = resolve_output(config.output, config.storage_options)
        check_output_apart(self.fs_in, self.shards, self.fs_out, output_dir)
        self.output = OutputDirectory(self.fs_out, output_dir, self.output_format)
        self.executor = ThreadPoolExecutor(max_workers=max(1, config.decode_workers))
        self.stage_batch_limit: dict[str, int] = {}
        self.models: list[ImageModel] = []
        self.stages = self._build_model_stages()
        self.decode = DecodeStage(self.executor, DEFAULT_MAX_PIXELS, self.models)

    def _build_model_stages(self) -> list[Stage]:
        c = self.config
        stages: list[Stage] = []
        if c.command in (Command.caption, Command.bootstrap):
            captioner = load_captioner(c.captioner, c.decoding, c.device, c.torch_dtype, c.sdpa)
            self.models.append(captioner)
            stages.append(CaptionStage(captioner))
        if c.command in (Command.filter, Command.bootstrap):
            filter_ = load_filter(c.filter, c.device, c.torch_dtype, c.filtering.text_max_tokens, c.sdpa)
            self.models.append(filter_)
            stages.append(FilterStage(filter_, c.filtering))
        return stages

    def run(self) -> RunSummary:
        """Process every shard not already complete in the output; the summary covers all of them."""
        started = time.perf_counter()
        settings = json.loads(json.dumps({"capfilt_version": __version__, **self.config.record()}))
        self.output.lock()
        try:
            self.output.prepare(settings, self.shards, self.config.overwrite)
            self.observer.run_started(len(self.shards))
            all_stats = []
            for shard in self.shards:
                stats = self.output.completed(shard)
                if stats is None:
                    self.observer.shard_started(shard.name)
                    stats = self.run_shard(shard)
                all_stats.append(stats)
                self.observer.shard_finished(stats)
            summary = RunSummary.merge(all_stats, time.perf_counter() - started)
            self.output.write_json(self.output.file(SUMMARY_FILE), summary.record())
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.output.unlock()
        return summary

    def run_shard(self, shard: Shard) -> ShardStats:
        stats = ShardStats(shard=shard.name)
        started = time.perf_counter()
        side_files = self.output.side_files(shard.name)
        try:
            layout = self.input_format.table_layout(
                self.fs_in, shard, self.config.caption_column, self.config.image_column
            )
        except ShardReadError as error:  # nothing of this shard can be read: no output shard, only its stats
            stats.error = str(error)
            self.output.write_json(side_files["stats"], stats.record())
            return stats
        rejects: list[Reject] = []
        dropped: list[Sample] = []
        with self.output_format.open_writer(self.fs_out, self.output.path, shard.name, layout) as writer:
            for batch in self._batches(shard, stats):
                for stage in self.stages:
                    batch = self._process(stage, batch, stats)
                for sample in batch.samples:
                    writer.write(sample)
                stats.written += len(batch.samples)
                stats.dropped += len(batch.dropped)
                for reject in batch.rejects:
                    stats.count_reject(reject.reason)
                rejects += batch.rejects
                dropped += batch.dropped
                self.observer.samples_done(len(batch.samples) + len(batch.dropped) + len(batch.rejects))
        self.output.write_jsonl(side_files["rejects"], [r.record() for r in rejects])
        self.output.write_jsonl(side_files["dropped"], [{"key": s.key, **capfilt_fields(s)} for s in dropped])
        stats.seconds = round(time.perf_counter() - started, 3)
        self.output.write_json(side_files["stats"], stats.record())  # last: it marks the shard complete
        return stats

    def _process(self, stage: Stage, batch: Batch, stats: ShardStats) -> Batch:
        """Run a stage in parts no larger than the largest that fitted in memory; when a part runs out of
        device memory, halve it, retry, and keep the smaller size for the rest of the run."""
        limit = self.stage_batch_limit.get(stage.name, len(batch.samples))
        if len(batch.samples) <= limit:
            try:
                return stage.process(batch, stats)
            except torch.cuda.OutOfMemoryError:
                if len(batch.samples) <= 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                limit = len(batch.samples) // 2
                self.stage_batch_limit[stage.name] = limit
                self.observer.batch_split(stage.name, limit)
        merged = Batch([], batch.rejects, batch.dropped)
        for start in range(0, len(batch.samples), limit):
            part = self._process(stage, Batch(batch.samples[start : start + limit]), stats)
            merged.samples += part.samples
            merged.rejects += part.rejects
            merged.dropped += part.dropped
        return merged

    def _batches(self, shard: Shard, stats: ShardStats) -> Iterator[Batch]:
        """Batches of read and decoded samples, made in a background thread so that reading and decoding
        (itself spread over the decode workers) overlap the models' work on the previous batch."""
        items: queue.Queue = queue.Queue(maxsize=4)
        stop = threading.Event()

        def produce() -> None:
            batch = Batch([])
            try:
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
                        items.put(self.decode.process(batch, stats))
                        batch = Batch([])
                items.put(self.decode.process(batch, stats))
            except ShardReadError as error:  # the samples read before the break are still processed
                items.put(self.decode.process(batch, stats))
                items.put(error)
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


def run(config: RunConfig, observer: Observer | None = None) -> RunSummary:
    return Pipeline(config, observer).run()
