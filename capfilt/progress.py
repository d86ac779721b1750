"""Rich progress bar (shards, samples, images/s) and the run's summary table."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from capfilt.observer import Observer
from capfilt.sample import Sample
from capfilt.stats import RunSummary, ShardStats


class RichProgress(Observer):
    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.samples = 0
        self.started = time.perf_counter()

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def run_started(self, total_shards: int) -> None:
        self.started = time.perf_counter()
        self.shard_task = self.progress.add_task("shards", total=total_shards, rate="")
        self.sample_task = self.progress.add_task("samples", total=None, rate="")

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
            self.console.print(f"[yellow]shard {stats.shard}: {stats.error}")


def summary_table(summary: RunSummary) -> Table:
    table = Table(title="capfilt summary", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    rate = summary.read / summary.seconds if summary.seconds else 0.0
    rows = [
        ("shards", summary.shards),
        ("read", summary.read),
        ("written", summary.written),
        ("dropped by the filter", summary.dropped),
        ("rejected", summary.rejected),
        ("synthetic captions added", summary.synthetic_captions_added),
        ("captions scored / kept", f"{summary.captions_scored} / {summary.captions_kept}"),
        ("web captions kept", summary.web_captions_kept),
        ("seconds (images/s)", f"{summary.seconds:.1f} ({rate:.1f})"),
    ]
    rows += [(f"  rejected: {reason}", count) for reason, count in summary.reject_reasons.items()]
    for kind, quantiles in summary.score_quantiles.items():
        rows.append((f"{kind.upper()} score quantiles", "  ".join(f"{q} {v:.3f}" for q, v in quantiles.items())))
    rows += [(f"  failed shard {name}", error) for name, error in summary.failed_shards.items()]
    for what, value in rows:
        table.add_row(what, str(value))
    return table


def samples_table(samples: list[Sample], dropped: list[Sample], title: str) -> Table:
    """Each sample's captions with their scores and the filter's decision, written and dropped alike."""
    table = Table(title=title)
    for column in ("sample", "caption", "ITM", "ITC", "caption kept"):
        table.add_column(column, justify="right" if column in ("ITM", "ITC") else "left")
    outcomes = [(s, "[green]written") for s in samples] + [(s, "[red]dropped") for s in dropped]
    for sample, outcome in outcomes:
        captions = sample.captions()
        for index, caption in enumerate(captions):
            table.add_row(
                f"{sample.key}\n{outcome}" if index == 0 else "",
                f"[dim]{caption.source}:[/] {caption.text}",
                "" if caption.itm_score is None else f"{caption.itm_score:.3f}",
                "" if caption.itc_score is None else f"{caption.itc_score:.3f}",
                {True: "[green]yes", False: "[red]no", None: ""}[caption.kept],
                end_section=index == len(captions) - 1,
            )
    return table
