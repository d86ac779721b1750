"""tarfile against capfilt.formats.tar_io on a webdataset shard, in µs per member, writing and reading.

    python benchmarks/tar_io.py [--samples 5000] [--repeat 5]

Each sample is three members as img2dataset writes them: KEY.jpg (~3 KB of random bytes), KEY.txt (a caption)
and KEY.json (~600 bytes). Both sides write to and read from memory, so the figures are the per-member Python
cost that a local disk or an object store adds its own time to; each is the best of --repeat runs. The reads
also run through a reader that has only `read` (as fsspec's files for remote stores), on a shard whose members
each have a pax header (webdataset's TarWriter: a float mtime) and on a gzip shard.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import tarfile
import time
from collections.abc import Callable

from capfilt.formats.tar_io import TarMemberWriter, iter_members


def shard_members(samples: int) -> list[tuple[str, bytes]]:
    members = []
    for index in range(samples):
        key = f"{index:09d}"
        meta = {"key": key, "caption": "a photo of a dog " * 4, "url": f"https://example.com/{key}.jpg"}
        meta["pad"] = "x" * (600 - len(json.dumps(meta)) - 10)
        members.append((f"{key}.jpg", os.urandom(2800 + index % 500)))
        members.append((f"{key}.txt", f"a photo of a dog number {index}".encode()))
        members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


def write_tarfile(members: list[tuple[str, bytes]], mtime: float = 0) -> bytes:
    file = io.BytesIO()
    with tarfile.open(fileobj=file, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            tar.addfile(info, io.BytesIO(data))
    return file.getvalue()


def write_fast(members: list[tuple[str, bytes]]) -> bytes:
    file = io.BytesIO()
    writer = TarMemberWriter(file)
    for name, data in members:
        writer.write(name, data)
    writer.close()
    return file.getvalue()


class ReadOnly:
    """A file object with `read` only, as a stream from an object store."""

    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)


def read_tarfile(file: object) -> list[tuple[str, bytes]]:
    members = []
    with tarfile.open(fileobj=file, mode="r|*") as tar:
        for member in tar:
            if member.isfile() and (stream := tar.extractfile(member)) is not None:
                members.append((member.name, stream.read()))
    return members


def read_fast(file: object) -> list[tuple[str, bytes]]:
    return list(iter_members(file))


def best(run: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    members = shard_members(args.samples)
    count = len(members)

    reference, fast = write_tarfile(members), write_fast(members)
    assert fast == reference, "TarMemberWriter's bytes differ from tarfile's"
    compressed = gzip.compress(reference, compresslevel=1)
    # webdataset's TarWriter gives each member mtime=time.time(), a float tarfile keeps in a pax record
    with_pax = write_tarfile(members, mtime=time.time())
    cases = [
        ("write", lambda: write_tarfile(members), lambda: write_fast(members)),
        ("read", lambda: read_tarfile(io.BytesIO(reference)), lambda: read_fast(io.BytesIO(reference))),
        ("read, read() only", lambda: read_tarfile(ReadOnly(reference)), lambda: read_fast(ReadOnly(reference))),
        ("read, pax records", lambda: read_tarfile(io.BytesIO(with_pax)), lambda: read_fast(io.BytesIO(with_pax))),
        ("read .tar.gz", lambda: read_tarfile(io.BytesIO(compressed)), lambda: read_fast(io.BytesIO(compressed))),
    ]
    print(f"{args.samples} samples, {count} members, {len(reference) / 1e6:.1f} MB tar; best of {args.repeat}")
    print(f"{'':20} {'tarfile µs/member':>18} {'tar_io µs/member':>17} {'speed-up':>9}")
    for label, slow_run, fast_run in cases:
        slow, slow_result = best(slow_run, args.repeat)
        quick, quick_result = best(fast_run, args.repeat)
        assert slow_result == quick_result, f"{label}: the results differ"
        print(f"{label:20} {slow / count * 1e6:18.2f} {quick / count * 1e6:17.2f} {slow / quick:8.1f}x")


if __name__ == "__main__":
    main()
