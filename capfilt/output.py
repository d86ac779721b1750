"""The output directory of a run: its lock, its recorded settings, and which shards are already complete.

Rerunning the same command resumes: a shard whose stats file exists (written last, after the shard and its
side files) and records no error is complete and skipped. A failed shard, whether its input broke off or its
processing raised, is redone: the cause may be passing (a lost connection, a busy device) or fixed since.
Leftover temporaries of a killed run are removed first. A rerun with settings that change the output is
refused rather than mixing results; `--overwrite` starts again. One run at a time may write a directory: an
advisory lock (flock) that the kernel releases when its process dies, so a killed run never leaves it stuck.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
from typing import IO, Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from capfilt.errors import ConfigError, OutputError
from capfilt.formats.base import Format, Shard, temporary_path
from capfilt.stats import ShardStats

RUN_FILE = "capfilt_run.json"
SUMMARY_FILE = "capfilt_summary.json"
LOCK_FILE = "capfilt.lock"
# --keep-dropped's shards: hidden, so that loaders reading the output (webdataset globs, HF datasets, pyarrow) and
# capfilt's own listings never take them for output shards.
DROPPED_DIR = ".dropped"
# Settings that do not change what is written: a resumed run may differ in these.
NON_OUTPUT_SETTINGS = ("output", "device", "devices", "ray_address", "ray_workers", "shard_index", "num_shards",
                       "batch_size", "decode_workers", "threads", "overwrite", "report", "capfilt_version")


class OutputDirectory:
    def __init__(self, fs: AbstractFileSystem, path: str, output_format: Format) -> None:
        self.fs, self.path, self.format = fs, path.rstrip("/"), output_format
        self._lock: IO[str] | None = None
        self._lock_path = self.file(LOCK_FILE)

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"

    @property
    def dropped_dir(self) -> str:
        return self.file(DROPPED_DIR)

    def side_files(self, shard_name: str) -> dict[str, str]:
        """Paths of a shard's stats, rejects and dropped lists, beside the output shard."""
        return {kind: self.file(f"{shard_name}_{kind}{ext}") for kind, ext in
                (("stats", ".json"), ("rejects", ".jsonl"), ("dropped", ".jsonl"))}

    def lock(self, part: str | None = None) -> None:
        """Take the directory (or `part` of a split job: its own lock) for this run, or fail in one line when
        another live run holds it."""
        if not isinstance(self.fs, LocalFileSystem):
            return  # object stores have no locks; shards are still written atomically
        self._lock_path = self.file(LOCK_FILE if part is None else f"capfilt.{part}.lock")
        handle = open(self._lock_path, "a+")  # noqa: SIM115 (held until unlock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise OutputError(f"another capfilt run ({holder}) is writing to {self.path}; wait for it to finish")
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)
            self._lock.close()
            self._lock = None

    def prepare(self, settings: dict[str, Any], shards: list[Shard], overwrite: bool, whole_run: bool = True) -> None:
        """Check or record the run's settings, clear what a killed run left of `shards`, or their outputs on
        overwrite. Only a `whole_run` (not one share of a split job) touches the run summary."""
        run_file = self.file(RUN_FILE)
        if overwrite:
            self._remove_outputs(shards, whole_run)
        elif self.fs.exists(run_file):
            previous = json.loads(self.fs.cat_file(run_file))
            changed = _changed_settings(previous, settings)
            if changed:
                raise ConfigError(
                    f"{self.path} holds the output of a run with other settings ({'; '.join(changed)}); "
                    "rerun with the same settings to resume, pass --overwrite to start again, or use another output"
                )
        self.remove_temporaries(shards, whole_run)
        self.write_json(run_file, settings)

    def remove_temporaries(self, shards: list[Shard], whole_run: bool = False) -> None:
        """Remove what killed runs left unfinished of `shards`, and of the run files for a `whole_run` (other
        shares of a split job may be writing theirs). One listing of the folder, however many shards: on an
        object store each listing is a request."""
        patterns = [self.file(f"{RUN_FILE}.*.tmp"), self.file(f"{SUMMARY_FILE}.*.tmp")] if whole_run else []
        for shard in shards:
            patterns += self._shard_temporaries(shard)
        leftovers = self.fs.glob(self.file("*.tmp")) + self.fs.glob(f"{self.dropped_dir}/*.tmp")
        for leftover in leftovers:
            if any(fnmatch.fnmatchcase(leftover, pattern) for pattern in patterns):
                self.fs.rm(leftover, recursive=True)

    def remove_shard_temporaries(self, shard: Shard) -> None:
        """Remove what an earlier attempt at `shard` left (a Ray attempt killed mid-shard, just before this one)."""
        self.remove_temporaries([shard])

    def _shard_temporaries(self, shard: Shard) -> list[str]:
        paths = self.shard_paths(shard)
        return [pattern for path in paths for pattern in (f"{path}.tmp", f"{path}.*.tmp")]

    def shard_paths(self, shard: Shard) -> list[str]:
        """Everything a run writes for `shard`: its output shard, side files and dropped samples' shard."""
        return (self.format.output_paths(self.path, shard.name) + list(self.side_files(shard.name).values())
                + self.format.output_paths(self.dropped_dir, shard.name))

    def shard_stats(self, shard: Shard) -> ShardStats | None:
        """The stats a run wrote for `shard` (complete, or failed with an error), or None."""
        stats_path = self.side_files(shard.name)["stats"]
        if not self.fs.exists(stats_path):
            return None
        try:
            return ShardStats.from_record(json.loads(self.fs.cat_file(stats_path)))
        except (ValueError, TypeError):
            return None

    def completed(self, shard: Shard) -> ShardStats | None:
        """The stats of a shard a previous run finished, or None when it must be (re)done: never run, failed,
        or its output gone."""
        stats = self.shard_stats(shard)
        if stats is None or stats.error:
            return None
        # A shard that wrote nothing may leave no output: an object store holds no empty folder.
        if stats.written and not all(self.fs.exists(p) for p in self.format.output_paths(self.path, shard.name)):
            return None
        return stats

    def _remove_outputs(self, shards: list[Shard], whole_run: bool) -> None:
        paths = [self.file(RUN_FILE), self.file(SUMMARY_FILE)] if whole_run else []
        for shard in shards:
            paths += self.shard_paths(shard)
        for path in paths:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def write_json(self, path: str, record: dict) -> None:
        self.write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")

    def write_jsonl(self, path: str, records: list[dict]) -> None:
        self.write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def write_text(self, path: str, text: str) -> None:
        """Write under a temporary name and rename, so a reader never sees half a file. The name is unique to
        this writer: the shares of a split job may write the same run file at once."""
        temporary = temporary_path(path)
        with self.fs.open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        self.fs.mv(temporary, path)


def held_by_a_run(fs: AbstractFileSystem, folder: str) -> bool:
    """Whether a live capfilt run holds the output `folder`'s lock (a killed run's lock file is not held)."""
    path = f"{folder}/{LOCK_FILE}"
    if not isinstance(fs, LocalFileSystem) or not os.path.exists(path):
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _changed_settings(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = (set(previous) | set(current)) - set(NON_OUTPUT_SETTINGS)
    # A setting newer than the run that wrote `previous` (absent there) changes nothing while it is off.
    added_off = {key for key in set(current) - set(previous) if current[key] in (None, False, [], {})}
    return [f"{key}: {previous.get(key)!r} -> {current.get(key)!r}" for key in sorted(keys - added_off)
            if previous.get(key) != current.get(key)]
