"""Runs a capfilt job: resolve input and output, take this run's share of the shards, skip those already
complete, have a runner process the rest, and merge every shard's stats into the run summary.

The runner decides where shards run: in this process (the default), one process per device (`--devices`),
or actors on a Ray cluster (`--ray`); all of them run the same `ShardWorker`, so the output is the same.
A job split over independent processes (`--shard-index I --num-shards N`, e.g. a SLURM array) gives each
process every N-th shard; `capfilt summary OUTPUT` then merges the run summary once all have finished.
A shard fails alone, but shards failing one after another with the same error stop the run: a systematic
error (a model that cannot run, a device too small for it) should not go on through every shard of a job.
"""

from __future__ import annotations

import json
import re
import time

from capfilt import __version__
from capfilt.config import Command, RunConfig
from capfilt.errors import RunError
from capfilt.formats import get_format
from capfilt.formats.base import Shard
from capfilt.observer import Observer
from capfilt.output import SUMMARY_FILE, OutputDirectory
from capfilt.paths import check_output_apart, resolve_input, resolve_output
from capfilt.plan import plan
from capfilt.runners import make_runner
from capfilt.stats import RunSummary, ShardStats
from capfilt.worker import Locations


def resolve(config: RunConfig) -> Locations:
    """Where `config` reads and writes, with every input shard listed."""
    fs_in, input_format, shards = resolve_input(config.input, config.input_format, config.storage_options)
    output_format = get_format(config.output_format or input_format.name)
    # Created when the run starts: a run refused while it is planned leaves no empty folder behind.
    fs_out, output_dir = resolve_output(config.output, config.storage_options, create=False)
    check_output_apart(fs_in, shards, fs_out, output_dir, config.input)
    return Locations(fs_in, input_format, shards, fs_out, output_dir, output_format)


# This many shards failing in a row with the same error stop the run.
SYSTEMATIC_FAILURES = 3


class FailureStreak:
    """The shards that failed last, one after another in completion order, on the same processing error."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.shards: list[str] = []

    def add(self, stats: ShardStats) -> bool:
        """Count a finished shard; True when it makes SYSTEMATIC_FAILURES in a row with the same error."""
        # Only processing failures: bad input shards may well come in a row. The same error with other
        # numbers in its message (the bytes it tried to allocate, a tensor's size) is the same error.
        error = re.sub(r"\d+", "#", stats.error) if stats.abandoned and stats.error else None
        if error is None or error != self.error:
            self.shards = []
        self.error = error
        if error is not None:
            self.shards.append(stats.shard)
        return len(self.shards) >= SYSTEMATIC_FAILURES


def shard_share(shards: list[Shard], index: int, count: int) -> list[Shard]:
    """Process `index` of `count`'s shards: every `count`-th from its own offset, so each runs exactly once."""
    return shards[index::count]


class Pipeline:
    """A configured run: resolved input and output, this run's shards, and the runner that processes them."""

    def __init__(self, config: RunConfig, observer: Observer | None = None) -> None:
        self.observer = observer or Observer()
        self.locations = resolve(config)
        # Filters' scores and keep rules settled (or refused) before any model loads or shard runs.
        self.plan = plan(config, self.locations)
        self.config = config = self.plan.config
        self.shards = shard_share(self.locations.shards, config.shard_index, config.num_shards)
        # The top fractions a scoring run leaves to `capfilt select` (select itself has turned its own into rules).
        self.select_top = () if config.command is Command.select else config.keep_top
        self.output = OutputDirectory(self.locations.fs_out, self.locations.output_dir, self.locations.output_format)
        # The models load here, before the output is touched, so that a model that cannot load is an error
        # before any shard; but only for a run with work to do: a rerun of a finished job answers at once.
        unfinished = config.overwrite or any(self.output.completed(shard) is None for shard in self.shards)
        self.runner = make_runner(config, self.locations, self.observer) if unfinished else None

    def run(self) -> RunSummary:
        """Process every shard of this run not already complete in the output; the summary covers all of them."""
        started = time.perf_counter()
        settings = json.loads(json.dumps({"capfilt_version": __version__, **self.config.record(),
                                          "scores": self.plan.record()}))
        whole_run = self.config.num_shards == 1
        self.locations.fs_out.makedirs(self.locations.output_dir, exist_ok=True)
        self.output.lock(None if whole_run else f"{self.config.shard_index}-of-{self.config.num_shards}")
        try:
            self.output.prepare(settings, self.shards, self.config.overwrite, whole_run)
            self.observer.run_started(len(self.shards))
            done: dict[str, ShardStats] = {}
            pending = []
            for shard in self.shards:
                stats = self.output.completed(shard)
                if stats is None:
                    pending.append(shard)
                else:
                    done[shard.name] = stats
                    self.observer.shard_finished(stats)
            self.observer.run_planned(len(done), pending, self.locations)
            if pending and self.runner is None:  # a shard's stats went missing since the check above
                self.runner = make_runner(self.config, self.locations, self.observer)
            streak = FailureStreak()
            for stats in self.runner.run(pending) if pending else ():
                done[stats.shard] = stats
                if not self.runner.reports_samples:
                    self.observer.samples_done(stats.read)
                self.observer.shard_finished(stats)
                if streak.add(stats):
                    raise RunError(
                        f"shards {', '.join(streak.shards)} failed one after another with the same error, so the "
                        f"run stopped: {stats.error} (tracebacks in their _stats.json files, or with --debug); "
                        "the output keeps the finished shards and a rerun resumes"
                    )
            summary = RunSummary.merge([done[shard.name] for shard in self.shards], time.perf_counter() - started,
                                       self.config.keep or (), self.select_top)
            if whole_run:  # a share of a split job leaves the run summary to `capfilt summary`
                self.output.write_json(self.output.file(SUMMARY_FILE), summary.record())
                if self.config.report:
                    from capfilt.report import write_report

                    write_report(self.config.output, storage_options=self.config.storage_options)
        finally:
            if self.runner is not None:
                self.runner.close()
            self.output.unlock()
        return summary


def run(config: RunConfig, observer: Observer | None = None) -> RunSummary:
    return Pipeline(config, observer).run()
