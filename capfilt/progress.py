"""Rich progress bar (shards, samples, images/s, time left) and the tables of `capfilt show` and the summary."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Self

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from capfilt.keep import KeepRule, KeepTop
from capfilt.observer import Observer
from capfilt.sample import Reject, Sample
from capfilt.stats import HISTOGRAM_BINS, RunSummary, ShardStats, dense, occupied_range, rebinned

if TYPE_CHECKING:
    from capfilt.formats.base import Shard
    from capfilt.worker import Locations


class SamplesTimeRemaining(TimeRemainingColumn):
    """Time left, on the samples row only: the shards row jumps at once by the shards a resumed run skips."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.fields.get("eta") else Text("")


class RichProgress(Observer):
    """Shows a run's progress on `console`; with `debug`, the traceback of each shard that fails."""

    def __init__(self, console: Console, debug: bool = False) -> None:
        self.console = console
        self.debug = debug
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            SamplesTimeRemaining(),
            console=console,
            transient=False,
        )
        self.samples = 0  # processed by this run, not counting the shards a resumed run skips
        self.running = False  # the models have loaded and shards are being processed
        self.started = time.perf_counter()
        self._stopped = threading.Event()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self.progress.stop()

    def run_started(self, total_shards: int) -> None:
        self.progress.start()  # here, not on entering: the models have loaded and their lines are printed
        self.running = True
        self.started = time.perf_counter()
        self.shard_task = self.progress.add_task("shards", total=total_shards, rate="")
        self.sample_task = self.progress.add_task("samples", total=None, rate="", eta=True)

    def run_planned(self, complete: int, pending: list[Shard], locations: Locations) -> None:
        if not pending:
            self.console.print(f"nothing to do: {_shards(complete)} already complete")
            self.progress.update(self.sample_task, visible=False)
            return
        if complete:
            self.console.print(f"resuming: {_shards(complete)} already complete, {len(pending)} to do")
        # Counting may take a request per shard on object storage: the run does not wait for it.
        threading.Thread(target=self._count_samples, args=(pending, locations), daemon=True).start()

    def _count_samples(self, pending: list[Shard], locations: Locations) -> None:
        """Give the samples row a total (and so a time left) when every pending shard tells its count."""
        total = 0
        for shard in pending:
            count = None if self._stopped.is_set() else locations.input_format.expected_samples(locations.fs_in, shard)
            if count is None:
                return
            total += count
        self.progress.update(self.sample_task, total=total)

    def shard_started(self, shard_name: str) -> None:
        self.progress.update(self.shard_task, description=f"shards ({shard_name})")

    def samples_done(self, count: int) -> None:
        self.samples += count
        rate = self.samples / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.sample_task, advance=count, rate=f"{rate:.1f} images/s")

    def batch_split(self, stage: str, batch_size: int) -> None:
        self.console.print(f"[yellow]{stage}: out of device memory; going on with batches of {batch_size}")

    def shard_finished(self, stats: ShardStats) -> None:
        self.progress.advance(self.shard_task)
        if stats.error:
            self.console.print(f"shard {stats.shard}: {stats.error}", style="yellow", markup=False, highlight=False)
            if self.debug and stats.traceback:
                self.console.print(stats.traceback.rstrip(), markup=False, highlight=False)


def _shards(count: int) -> str:
    return f"{count} shard{'' if count == 1 else 's'}"


def summary_table(summary: RunSummary, samples_this_run: int | None = None) -> Table:
    """The run's totals. `samples_this_run`, when given, is what this process did in `summary.seconds` (a
    resumed run counts the shards it skipped in the totals, not in its speed); otherwise the speed is that of
    every shard's own time."""
    table = Table(title="capfilt summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    done = summary.read if samples_this_run is None else samples_this_run
    rows = [
        ("shards", summary.shards),
        ("read", summary.read),
        ("written", summary.written),
        ("dropped by the filter", summary.dropped),
        ("rejected", summary.rejected),
        ("synthetic captions added", summary.synthetic_captions_added),
        ("captions scored / kept", f"{summary.captions_scored} / {summary.captions_kept}"),
        ("web captions kept", summary.web_captions_kept),
    ]
    if summary.select_top:  # nothing was judged: no count of kept captions to tell
        rows[-2:] = [("captions scored", summary.captions_scored)]
    if done:  # a rerun of a finished job did nothing: no speed to tell
        rate = done / summary.seconds if summary.seconds else 0.0
        rows.append(("seconds (images/s)", f"{summary.seconds:.1f} ({rate:.1f})"))
    rows += [(f"  rejected: {reason}", count) for reason, count in summary.reject_reasons.items()]
    rows += [(f"  {name}: captions truncated to the filter's text limit", count)
             for name, count in summary.captions_truncated.items()]
    for name, quantiles in summary.score_quantiles.items():
        rows.append((f"{name} score quantiles", "  ".join(f"{q} {v:.3f}" for q, v in quantiles.items())))
    rows += [(f"  failed shard {name}", error) for name, error in summary.failed_shards.items()]
    rows += [("scored for", f"{KeepTop.parse(top).described()} (capfilt select keeps it)")
             for top in summary.select_top]
    for what, value in rows:
        table.add_row(what, Text(str(value)))
    for what, line in histogram_rows(summary):
        table.add_row(what, Text(line, no_wrap=True, justify="left"))
    return table


BLOCKS = " ▁▂▃▄▅▆▇█"


def histogram_rows(summary: RunSummary, width: int = 48) -> list[tuple[str, str]]:
    """A text histogram of the main score (the first rule's, else the first computed) over the range its
    captions span, and a line marking the rule's threshold (or where the top fraction the run is scored for
    begins)."""
    rules = [KeepRule.parse(rule) for rule in summary.marked_rules()]
    name = rules[0].score if rules else next(iter(summary.histograms), None)
    if name is None or name not in summary.histograms or name not in summary.score_ranges:
        return []
    low, high = summary.score_ranges[name]
    counts = dense(summary.histograms[name])
    rule = next((rule for rule in rules if rule.score == name), None)
    first, last = occupied_range(counts, low, high, [rule.value] if rule else [])
    edges = np.linspace(first, last, width + 1).round().astype(int)
    columns = rebinned(counts, edges)
    levels = np.ceil(columns / max(int(columns.max()), 1) * (len(BLOCKS) - 1)).astype(int)
    bins = (high - low) / HISTOGRAM_BINS
    start, end = low + first * bins, low + last * bins
    marks = [" "] * width
    if rule is not None and start <= rule.value <= end:
        marks[min(width - 1, int((rule.value - start) / (end - start) * width))] = "▲"
    label = f"{start:.3g} … {end:.3g}" + (f", ▲ {rule}" if rule is not None else "")
    return [(f"{name} histogram", "".join(BLOCKS[level] for level in levels)), (label, "".join(marks))]


def samples_table(samples: list[Sample], dropped: list[Sample], title: str, label: str = "written") -> Table:
    """Each sample's captions with their scores and the filter's decision, `label`led (written, or input for
    the samples of a dataset no run wrote) and dropped alike; a column no caption has a value for is left out."""
    outcomes = [(s, f"[green]{label}") for s in samples] + [(s, "[red]dropped") for s in dropped]
    captions = [caption for sample, _ in outcomes for caption in sample.captions()]
    # A column per score the captions have, named as the run named it; and the decision, when there is one.
    score_columns = list(dict.fromkeys(name for caption in captions for name in caption.scores))
    show_kept = any(caption.kept is not None for caption in captions)
    table = Table(title=title)
    table.add_column("sample")
    table.add_column("caption")
    for name in score_columns:
        table.add_column(name, justify="right")
    if show_kept:
        table.add_column("caption kept", justify="left")
    for sample, outcome in outcomes:
        sample_captions = sample.captions()
        if not sample_captions:
            table.add_row(Text(sample.key) + Text.from_markup(f"\n{outcome}"), Text("(no caption)", style="dim"),
                          end_section=True)
        for index, caption in enumerate(sample_captions):
            values = [Text("" if caption.scores.get(name) is None else f"{caption.scores[name]:.3f}")
                      for name in score_columns]
            if show_kept:
                values.append({True: "[green]yes", False: "[red]no", None: ""}[caption.kept])
            table.add_row(
                Text(sample.key) + Text.from_markup(f"\n{outcome}") if index == 0 else "",
                Text(f"{caption.source}: ", style="dim") + Text(caption.text),
                *values,
                end_section=index == len(sample_captions) - 1,
            )
    return table


def rejects_table(rejects: list[Reject], title: str) -> Table:
    """The samples that could not be processed: key, reason and detail."""
    table = Table(title=title)
    for column in ("sample", "reason", "detail"):
        table.add_column(column)
    for reject in rejects:
        table.add_row(Text(reject.key), Text(reject.reason), Text(reject.detail))
    return table
