"""What `capfilt report` costs on outputs of 10 to 10,000 shards: a fixed amount of reading, and no listing.

    python benchmarks/report_speed.py [--shards 10,100,1000,10000] [--repeats 3]

A real output is made once (`capfilt bootstrap --preset demo` over the bundled example, 2 shards of 24 samples,
with --keep-dropped), and its shards are copied under new names until the output has N shards, with the run
summary merged from all N shards' stats as a run writes it. For each N the report is written `--repeats` times
and the median time printed beside the bytes it read from the output's files, and, as the baseline, the time of
one pass over every shard's stats (what a report built from the shards' stats instead of the summary would
cost at least). The report's time should stay flat as N grows, the pass's grow with N.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from fsspec.implementations import local

import capfilt
from capfilt.report import write_report
from capfilt.stats import RunSummary, ShardStats

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "shapes"


def make_output(source: Path, target: Path, shards: int) -> None:
    """`source`'s output with its shards copied under the names 00000..{shards-1}, and the summary merged."""
    target.mkdir(parents=True)
    (target / ".dropped").mkdir()
    originals = sorted(path.stem.removesuffix("_stats") for path in source.glob("*_stats.json"))
    stats = []
    for index in range(shards):
        original, name = originals[index % len(originals)], f"{index:05d}"
        for suffix in (".tar", ".parquet", "_stats.json", "_dropped.jsonl", "_rejects.jsonl"):
            shutil.copyfile(source / f"{original}{suffix}", target / f"{name}{suffix}")
        for suffix in (".tar", ".parquet"):
            shutil.copyfile(source / ".dropped" / f"{original}{suffix}", target / ".dropped" / f"{name}{suffix}")
        record = json.loads((source / f"{original}_stats.json").read_text()) | {"shard": name}
        (target / f"{name}_stats.json").write_text(json.dumps(record))
        stats.append(ShardStats.from_record(record))
    shutil.copyfile(source / "capfilt_run.json", target / "capfilt_run.json")
    summary = RunSummary.merge(stats, 1.0, json.loads((source / "capfilt_run.json").read_text())["keep"])
    (target / "capfilt_summary.json").write_text(json.dumps(summary.record()))


class ReadCounter:
    """Counts the bytes read through fsspec's local filesystem (every read of the report goes through it)."""

    bytes_read = 0

    @classmethod
    def install(cls) -> None:
        cat_file, open_file = local.LocalFileSystem.cat_file, local.LocalFileSystem._open

        def counted_cat_file(self, path, start=None, end=None, **kwargs):
            data = cat_file(self, path, start, end, **kwargs)
            cls.bytes_read += len(data)
            return data

        def counted_open(self, path, mode="rb", **kwargs):
            handle = open_file(self, path, mode, **kwargs)
            if "r" in mode:
                read = handle.read

                def counted_read(*args):
                    data = read(*args)
                    cls.bytes_read += len(data)
                    return data

                handle.read = counted_read
            return handle

        local.LocalFileSystem.cat_file, local.LocalFileSystem._open = counted_cat_file, counted_open


def timed_report(output: Path, repeats: int) -> tuple[float, int]:
    times = []
    for _ in range(repeats):
        ReadCounter.bytes_read = 0
        started = time.perf_counter()
        write_report(str(output), str(output.parent / "report.html"))
        times.append(time.perf_counter() - started)
    return statistics.median(times), ReadCounter.bytes_read


def stats_pass(output: Path) -> float:
    started = time.perf_counter()
    RunSummary.merge([ShardStats.from_record(json.loads(path.read_text())) for path in output.glob("*_stats.json")], 0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="10,100,1000,10000")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ReadCounter.install()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        capfilt.run(str(EXAMPLE), str(work / "source"), "bootstrap", preset="demo", keep_dropped=True, device="cpu")
        print("| shards | report (median) | bytes read by the report | one pass over the shards' stats |")
        print("|--:|--:|--:|--:|")
        for count in (int(n) for n in args.shards.split(",")):
            output = work / f"out{count}"
            make_output(work / "source", output, count)
            seconds, read = timed_report(output, args.repeats)
            print(f"| {count} | {seconds:.2f} s | {read / 1e6:.2f} MB | {stats_pass(output):.2f} s |", flush=True)
            shutil.rmtree(output)


if __name__ == "__main__":
    main()
