"""Turns one input shard into its output shard, side files and stats: read → decode → caption → score → keep → write.

A `ShardWorker` holds the loaded models and is reused for shard after shard; every runner (in-process, one
process per GPU, Ray actors) drives the same worker. The shard is the unit of work: its output shard, rejects,
dropped list and stats are all written under temporary names and moved into place when the shard is
complete, stats last (its presence marks a finished shard). Reading and decoding, and each model stage, run
in their own threads on consecutive batches; a model stage whose batch runs out of device memory is retried
in halves.

A shard fails alone: a shard that cannot be read to its end keeps what was read before the break, and an
exception in a step of its pipeline (a model's error, out of memory with one sample, a bug on an odd sample)
abandons the shard, whose stats then record the error and its traceback and nothing else. An error writing
the output (a full disk) is not the shard's: it stops the run.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from fsspec import AbstractFileSystem

from capfilt.background import in_background
from capfilt.config import RunConfig
from capfilt.decode import DEFAULT_MAX_PIXELS
from capfilt.errors import ShardReadError, one_line
from capfilt.formats.base import Format, Shard
from capfilt.keep import KeepRules
from capfilt.models import load_captioner, load_filter
from capfilt.models.base import ImageModel
from capfilt.observer import Observer
from capfilt.output import OutputDirectory
from capfilt.sample import Reject
from capfilt.schema import capfilt_fields
from capfilt.scores import run_scores
from capfilt.stages import Batch, CaptionStage, DecodeStage, KeepStage, ModelStage, ScoreStage, Stage
from capfilt.stats import ShardStats
from capfilt.threads import decode_worker_threads, model_stage_threads, use_threads


@dataclass(frozen=True)
class Locations:
    """Where a run reads and writes: resolved once by the driver, handed (pickled) to every worker."""

    fs_in: AbstractFileSystem
    input_format: Format
    shards: list[Shard]
    fs_out: AbstractFileSystem
    output_dir: str
    output_format: Format


class ShardWorker:
    """The models and stages of a run, loaded once, and the loop that runs one shard through them."""

    def __init__(self, config: RunConfig, locations: Locations, observer: Observer | None = None) -> None:
        self.config = config
        self.observer = observer or Observer()
        self.fs_in, self.input_format = locations.fs_in, locations.input_format
        self.fs_out, self.output_format = locations.fs_out, locations.output_format
        self.output = OutputDirectory(self.fs_out, locations.output_dir, self.output_format)
        self.executor = ThreadPoolExecutor(max_workers=max(1, config.decode_workers), initializer=use_threads,
                                           initargs=(decode_worker_threads(config.device),))
        self.stage_batch_limit: dict[str, int] = {}
        self.models: list[ImageModel] = []
        self.stages = self._build_stages()
        self.stage_threads = model_stage_threads(config.threads, len(self.models), config.device)
        # A run without models (select) reads scores and never decodes an image.
        self.decode = DecodeStage(self.executor, DEFAULT_MAX_PIXELS, self.models) if self.models else None

    def _build_stages(self) -> list[Stage]:
        """The run's stages after decoding, from the parts its (planned) config has: the captioner, each filter,
        the keep rules."""
        c = self.config
        stages: list[Stage] = []
        if c.captioner:
            captioner = load_captioner(c.captioner, c.decoding, c.device, c.torch_dtype, c.sdpa)
            self.models.append(captioner)
            stages.append(CaptionStage(captioner))
        for spec in c.filters:
            filter_ = load_filter(spec.model, c.device, c.torch_dtype, c.sdpa)
            self.models.append(filter_)
            named = {name: score for name, score in run_scores(filter_.scores, spec.name).items()
                     if name in spec.computes}
            stages.append(ScoreStage(filter_, named))
        if c.keep is not None:
            stages.append(KeepStage(KeepRules.parse(c.keep, c.keep_best), c.mode))
        elif c.keep_top:  # scored for select's top fractions: nothing judged here
            stages.append(KeepStage(None, c.mode))
        return stages

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def run_shard(self, shard: Shard) -> ShardStats:
        stats = ShardStats(shard=shard.name)
        started = time.perf_counter()
        # What an attempt killed mid-shard left (a Ray retry runs right after it, before any run's cleanup).
        self.output.remove_shard_temporaries(shard)
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
        dropped: list[dict] = []  # records, not samples: a sample holds its images' tensors
        schema = self.input_format.metadata_schema(self.fs_in, shard)
        try:
            with (  # on any error the writers remove their temporaries: no half shard is left
                self.output_format.open_writer(self.fs_out, self.output.path, shard.name, layout, schema) as writer,
                self.output_format.open_writer(self.fs_out, self.output.dropped_dir, shard.name, layout, schema)
                if self.config.keep_dropped else contextlib.nullcontext() as dropped_writer,
                contextlib.closing(self._steps(shard, stats)) as batches,  # on any error, stops every step's thread
            ):
                for batch in batches:
                    for sample in batch.samples:
                        writer.write(sample)
                    if dropped_writer is not None:
                        for sample in batch.dropped:
                            dropped_writer.write(sample)
                    stats.written += len(batch.samples)
                    stats.dropped += len(batch.dropped)
                    for reject in batch.rejects:
                        stats.count_reject(reject.reason)
                    rejects += batch.rejects
                    dropped += [{"key": s.key, **capfilt_fields(s)} for s in batch.dropped]
                    self.observer.samples_done(len(batch.samples) + len(batch.dropped) + len(batch.rejects))
        except StepFailed as failure:
            return self._abandon(shard, failure.__cause__, started)
        self.output.write_jsonl(side_files["rejects"], [r.record() for r in rejects])
        self.output.write_jsonl(side_files["dropped"], dropped)
        stats.seconds = round(time.perf_counter() - started, 3)
        self.output.write_json(side_files["stats"], stats.record())  # last: it marks the shard complete
        return stats

    def _abandon(self, shard: Shard, error: BaseException, started: float) -> ShardStats:
        """The stats of a shard abandoned on `error`, written as its stats file: the error in one line and its
        traceback, and no counts, since none of its samples is in the output. A rerun redoes the shard."""
        stats = ShardStats(
            shard=shard.name,
            seconds=round(time.perf_counter() - started, 3),
            error=one_line(error),
            traceback="".join(traceback.format_exception(error)),
        )
        self.output.write_json(self.output.side_files(shard.name)["stats"], stats.record())
        return stats

    def _steps(self, shard: Shard, stats: ShardStats) -> Iterator[Batch]:
        """The shard's batches through every stage: reading and each model stage in its own thread, working
        on consecutive batches side by side (see capfilt.background). The keep rules run where their batch is:
        Python that holds the GIL gains nothing from a thread, and a run without models (select) reads,
        judges and writes in one."""
        batches = self._read(shard, stats)
        if self.models:
            batches = in_background(batches, f"read-{shard.name}")
        for stage in self.stages:
            batches = self._run_stage(stage, batches, stats)
            if isinstance(stage, ModelStage):
                batches = in_background(batches, f"{stage.name}-{shard.name}")
        return _failures_marked(batches)

    def _run_stage(self, stage: Stage, batches: Iterator[Batch], stats: ShardStats) -> Iterator[Batch]:
        if isinstance(stage, ModelStage):
            use_threads(self.stage_threads)  # torch's thread count is per thread: this runs in the stage's own
        # Closed here, as this step ends (done, stopped or raising), so that the steps before it stop their
        # threads now. Left to the garbage collector, a step's clean-up (it joins its thread) would run in
        # whatever thread collects it, maybe one holding the decode pool's lock that the joined thread awaits:
        # the next shard then hung once its step had raised.
        with contextlib.closing(batches):
            for batch in batches:
                yield self._process(stage, batch, stats)

    def _process(self, stage: Stage, batch: Batch, stats: ShardStats) -> Batch:
        """Run a stage in parts no larger than the largest that fitted in memory; when a part runs out of
        device memory, halve it, retry, and keep the smaller size for the rest of the run."""
        limit = self.stage_batch_limit.get(stage.name, len(batch.samples))
        if len(batch.samples) <= limit:
            try:
                return stage.process(batch, stats)
            except torch.cuda.OutOfMemoryError:
                if len(batch.samples) <= 1:  # nothing left to split: the shard fails
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

    def _read(self, shard: Shard, stats: ShardStats) -> Iterator[Batch]:
        """Batches of read and decoded samples (decoding spread over the decode workers). When the shard
        breaks off, the samples read before the break are still processed and the error is recorded."""
        batch = Batch([])
        try:
            for item in self.input_format.read_shard(
                self.fs_in, shard, self.config.caption_column, self.config.image_column
            ):
                if isinstance(item, Reject):
                    batch.rejects.append(item)
                else:
                    if item.web_caption is not None and not item.web_caption.strip():
                        item.web_caption = None
                    batch.samples.append(item)
                if len(batch.samples) + len(batch.rejects) >= self.config.batch_size:
                    stats.read += len(batch.samples) + len(batch.rejects)
                    yield self._decoded(batch, stats)
                    batch = Batch([])
        except ShardReadError as error:
            stats.error = str(error)
        stats.read += len(batch.samples) + len(batch.rejects)
        yield self._decoded(batch, stats)

    def _decoded(self, batch: Batch, stats: ShardStats) -> Batch:
        return self.decode.process(batch, stats) if self.decode else batch


class StepFailed(Exception):
    """An exception raised in a step of a shard's pipeline (its `__cause__`), told apart from an error writing
    the output: the first fails the shard, the second stops the run."""


def _failures_marked(batches: Iterator[Batch]) -> Iterator[Batch]:
    try:
        yield from batches
    except Exception as error:  # not KeyboardInterrupt or SystemExit: those stop the run
        raise StepFailed from error
