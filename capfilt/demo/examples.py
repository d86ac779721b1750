"""Write a small noisy web dataset of shapes pictures, laid out exactly as img2dataset's webdataset output.

    python -m capfilt.demo.examples --out examples/shapes

Each shard NNNNN is `NNNNN.tar` (members `KEY.jpg`, `KEY.json` and, when the page had a caption,
`KEY.txt`), `NNNNN.parquet` (every row's metadata, failed downloads included) and `NNNNN_stats.json`.
Keys are img2dataset's: the shard number in five digits, then the row's number in the shard in four.

The captions are as noisy as web alt text: 40% are right, 30% belong to another picture, 20% are junk
(file names, adverts) and 10% are missing: half of those are an empty `.txt` (img2dataset writes one for a
null caption), half have no `.txt` at all (as datasets made without a caption column). One row per shard
failed to download, as happens on the web: it is in the parquet and the stats, not in the tar.
`example_rows` gives the same rows with their true captions, so tests can check what a filter kept.
The output is byte-for-byte the same on every run.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from webdataset import TarWriter

from capfilt.demo import shapes

IMAGE_SIZE = 128
JPEG_QUALITY = 85
# A fixed, plausible download time, so that the stats files do not change from run to run.
START_TIME = 1_700_000_000.0
# What img2dataset's download adds to each sample's metadata, with its Arrow types.
DOWNLOAD_FIELDS = [
    ("key", pa.string()),
    ("status", pa.string()),
    ("error_message", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("original_width", pa.int32()),
    ("original_height", pa.int32()),
    ("exif", pa.string()),
    ("sha256", pa.string()),
]
# img2dataset's per-shard metadata columns: the input's caption and url, then what the download added.
METADATA_SCHEMA = pa.schema([("caption", pa.string()), ("url", pa.string()), *DOWNLOAD_FIELDS])
# Each kind of web caption and its share of a shard's rows.
CAPTION_SHARES = (("right", 0.4), ("another picture's", 0.3), ("junk", 0.2), ("empty", 0.05), ("missing", 0.05))
DOWNLOAD_SECONDS = 1.5


@dataclass(frozen=True)
class Row:
    """One input row as downloaded: its picture (None if the download failed) and metadata."""

    key: str
    scene: shapes.Scene
    true_caption: str
    # One of CAPTION_SHARES' kinds: "empty" rows have an empty .txt, "missing" ones none; both have a null caption.
    caption_kind: str
    caption: str | None
    jpeg: bytes | None
    metadata: dict[str, Any]


def _jpeg(scene: shapes.Scene) -> bytes:
    buffer = io.BytesIO()
    shapes.render(scene, IMAGE_SIZE).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _web_caption(kind: str, scene: shapes.Scene, others: list[shapes.Scene], rng: random.Random) -> str | None:
    if kind == "right":
        return shapes.describe(scene)
    if kind == "another picture's":
        other = rng.choice([o for o in others if o.facts() != scene.facts()])
        return shapes.describe(other)
    if kind == "junk":
        return shapes.junk_alt_text(rng)
    return None


def example_rows(shard: int, rows: int = 25, seed: int = 0) -> list[Row]:
    """The rows of one shard, the same for the same arguments; the last row's download failed."""
    rng = random.Random(f"{seed}/{shard}")
    scenes = [shapes.random_scene(rng) for _ in range(rows)]
    # Exact shares rather than independent draws, so that even a small shard has every kind of caption.
    kinds = [kind for kind, share in CAPTION_SHARES[1:] for _ in range(round(share * rows))]
    kinds = ["right"] * (rows - len(kinds)) + kinds
    rng.shuffle(kinds)
    result = []
    for index, (scene, kind) in enumerate(zip(scenes, kinds)):
        key = f"{shard:05d}{index:04d}"
        caption = _web_caption(kind, scene, scenes, rng)
        failed = index == rows - 1
        jpeg = None if failed else _jpeg(scene)
        side = rng.choice((256, 400, 512, 640))
        metadata = {
            "caption": caption,
            "url": f"https://example.com/shapes/{seed}/{key}.jpg",
            "key": key,
            "status": "failed_to_download" if failed else "success",
            "error_message": "HTTP Error 404: Not Found" if failed else None,
            "width": None if failed else IMAGE_SIZE,
            "height": None if failed else IMAGE_SIZE,
            "original_width": None if failed else side,
            "original_height": None if failed else side,
            "exif": None,
            "sha256": None if jpeg is None else hashlib.sha256(jpeg).hexdigest(),
        }
        result.append(Row(key, scene, shapes.describe(scene), kind, caption, jpeg, metadata))
    return result


def write_shard(directory: Path, shard: int, rows: list[Row]) -> None:
    """Write one shard's tar, metadata parquet and stats, as img2dataset's webdataset writer does."""
    name = f"{shard:05d}"
    with open(directory / f"{name}.tar", "wb") as stream, TarWriter(stream, mtime=0) as tar:
        for row in rows:
            if row.jpeg is None:
                continue
            sample = {"__key__": row.key, "jpg": row.jpeg, "json": json.dumps(row.metadata, indent=4).encode()}
            if row.caption_kind != "missing":
                sample["txt"] = (row.caption or "").encode()
            tar.write(sample)
    table = pa.Table.from_pylist([row.metadata for row in rows], schema=METADATA_SCHEMA)
    pq.write_table(table, directory / f"{name}.parquet")
    successes = sum(row.jpeg is not None for row in rows)
    failures: dict[str, int] = {}
    for row in rows:
        if row.metadata["error_message"] is not None:
            failures[row.metadata["error_message"]] = failures.get(row.metadata["error_message"], 0) + 1
    start = START_TIME + 60 * shard
    stats = {
        "count": len(rows),
        "successes": successes,
        "failed_to_download": len(rows) - successes,
        "failed_to_resize": 0,
        "duration": DOWNLOAD_SECONDS,
        "start_time": start,
        "end_time": start + DOWNLOAD_SECONDS,
        "status_dict": {"success": successes, **failures},
    }
    (directory / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))


def write_examples(directory: Path, shards: int = 2, rows: int = 25, seed: int = 0) -> None:
    """Write `shards` shards of `rows` rows each into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        write_shard(directory, shard, example_rows(shard, rows, seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("examples/shapes"))
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25, help="rows per shard, one of which failed to download")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_examples(args.out, args.shards, args.rows, args.seed)


if __name__ == "__main__":
    main()
