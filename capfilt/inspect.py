"""Read back what a run wrote, without loading any model: samples for `capfilt show` (written ones from the
shards, dropped ones and rejects from the `NAME_dropped.jsonl` / `NAME_rejects.jsonl` lists beside them), and
the merged run summary for `capfilt summary`."""

from __future__ import annotations

import itertools
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fsspec import AbstractFileSystem

from capfilt.errors import InputError, OutputError
from capfilt.formats import get_format
from capfilt.output import RUN_FILE, SUMMARY_FILE, OutputDirectory
from capfilt.paths import open_output, resolve_input
from capfilt.sample import Reject, Sample
from capfilt.schema import sample_from_dropped_record
from capfilt.stats import RunSummary

_Record = TypeVar("_Record")


@dataclass
class OutputSamples:
    """The first samples of a folder: a capfilt output's written, dropped and rejected samples, or, for a
    folder no run wrote (an input dataset), its samples as they are."""

    samples: list[Sample]
    dropped: list[Sample]
    rejects: list[Reject]
    is_run_output: bool


def read_output(output: str, limit: int, storage_options: dict[str, Any]) -> OutputSamples:
    """Up to `limit` samples of each kind from the folder `output` (or from one shard of it)."""
    fs, path = open_output(output, storage_options)
    path = path.rstrip("/")
    if not fs.exists(path):
        raise OutputError(f"no output at {output}")
    folder = path if fs.isdir(path) else posixpath.dirname(path)  # an output folder, or one shard in it
    is_run_output = fs.exists(f"{folder}/{RUN_FILE}")
    try:
        fs, fmt, shards = resolve_input(output, None, storage_options)
    except InputError as error:
        if is_run_output:  # the run file is written first: this run stopped or failed before any shard finished
            raise OutputError(f"the run in {output} finished no shard: it failed or was stopped before the first "
                              "one (rerun its command to resume)") from error
        raise
    samples: list[Sample] = []
    for shard in shards:
        items = fmt.read_shard(fs, shard, None)
        samples += itertools.islice((s for s in items if isinstance(s, Sample)), limit - len(samples))
        if len(samples) >= limit:
            break
    dropped = _read_lists(fs, path, "dropped", limit, sample_from_dropped_record)
    rejects = _read_lists(fs, path, "rejects", limit, lambda r: Reject(r["key"], r["reason"], r.get("detail", "")))
    return OutputSamples(samples, dropped, rejects, is_run_output)


def read_output_samples(output: str, limit: int, storage_options: dict[str, Any]) -> tuple[list[Sample], list[Sample]]:
    """Up to `limit` written and `limit` dropped samples of the output `output`."""
    found = read_output(output, limit, storage_options)
    return found.samples, found.dropped


def _read_lists(fs: AbstractFileSystem, folder: str, kind: str, limit: int,
                parse: Callable[[dict[str, Any]], _Record]) -> list[_Record]:
    """The first `limit` records of the shards' `NAME_{kind}.jsonl` lists, in shard order."""
    records: list[_Record] = []
    for path in sorted(fs.glob(f"{folder}/*_{kind}.jsonl")):
        with fs.open(path, "r", encoding="utf-8") as handle:
            records += (parse(json.loads(line)) for line in itertools.islice(handle, limit - len(records)))
        if len(records) >= limit:
            break
    return records


def summarize(output: str, storage_options: dict | None = None) -> tuple[RunSummary, list[str]]:
    """Merge the stats of every shard of the run recorded in `output` into its run summary, written beside
    them; returns it with the names of shards not complete yet (then no summary is written). Its `seconds`
    is the shards' own time added up, not a wall time."""
    fs_out, output_dir = open_output(output, storage_options)
    output_dir = output_dir.rstrip("/")
    if not fs_out.isdir(output_dir):
        raise OutputError(f"no output at {output}")
    run_file = f"{output_dir}/{RUN_FILE}"
    if not fs_out.exists(run_file):
        raise OutputError(f"{output} holds no capfilt run ({RUN_FILE} is missing)")
    settings = json.loads(fs_out.cat_file(run_file))
    _, input_format, shards = resolve_input(settings["input"], settings.get("input_format"), storage_options)
    output_format = get_format(settings.get("output_format") or input_format.name)
    directory = OutputDirectory(fs_out, output_dir, output_format)
    done = {shard.name: directory.shard_stats(shard) for shard in shards}
    missing = [name for name, stats in done.items() if stats is None]
    finished = [stats for stats in done.values() if stats is not None]
    select_top = () if settings.get("command") == "select" else (settings.get("keep_top") or ())
    summary = RunSummary.merge(finished, sum(stats.seconds for stats in finished), settings.get("keep") or (),
                               select_top)
    if not missing:
        directory.write_json(directory.file(SUMMARY_FILE), summary.record())
    return summary, missing
