"""Score once, select many times: the time per sample of `capfilt select` (keep rules re-applied to an
annotated output, no model, no image decoded) against the `filter` run that scored it, side by side.

    python benchmarks/select_speed.py [--shards 4] [--rows 1000]

It writes the shapes examples (img2dataset's webdataset layout), scores them once with the demo filter in
`--mode annotate` (the timed baseline, model loading excluded: it is timed from the first shard), then times
`select` with the run's own rule and with `--keep-top itm:0.3` (two passes: the scores, then the copy).
All three go through `capfilt.run`, the entry point the CLI calls, with the defaults a user gets.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import capfilt
from capfilt.demo.examples import write_examples
from capfilt.observer import Observer


class RunClock(Observer):
    """The time from the run's start (its models loaded, its plan made) to its end."""

    def run_started(self, total_shards: int) -> None:
        self.started = time.perf_counter()


def timed(input: Path, output: Path, command: str, **options: object) -> tuple[float, int]:
    """Seconds and samples of a run: a model run from its first shard (loading excluded), a run without
    models from the call (its pass over the scores included)."""
    clock = RunClock()
    called = time.perf_counter()
    summary = capfilt.run(str(input), str(output), command, observer=clock, **options)
    started = clock.started if command != "select" else called
    return time.perf_counter() - started, summary.read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows", type=int, default=1000, help="samples per shard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_examples(root / "in", shards=args.shards, rows=args.rows)
        runs = {
            "filter (demo BLIP ITM, annotate)": timed(root / "in", root / "scored", "filter", preset="demo",
                                                       mode="annotate", device="cpu"),
            "select (the run's rule)": timed(root / "scored", root / "selected", "select"),
            "select --keep-top itm:0.3": timed(root / "scored", root / "top", "select", keep_top=["itm:0.3"]),
        }
    baseline = runs["filter (demo BLIP ITM, annotate)"]
    print(f"{'run':36} {'samples':>8} {'seconds':>8} {'ms/sample':>10} {'vs filter':>10}")
    for name, (seconds, samples) in runs.items():
        per_sample = seconds / samples
        ratio = (baseline[0] / baseline[1]) / per_sample
        print(f"{name:36} {samples:8d} {seconds:8.2f} {per_sample * 1000:10.3f} {ratio:9.1f}x")


if __name__ == "__main__":
    main()
