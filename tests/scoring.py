"""What the model families' tests share: pictures of several sizes, scores as plain numbers, how far two sets
of them differ, and a bootstrap run with a tiny BLIP captioner and the family's filter, read back."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import capfilt
from capfilt.stats import RunSummary
from tests.conftest import shape_items
from tests.datasets import write_webdataset_shards


def pictures(count: int) -> list[Image.Image]:
    """`count` random pictures, each of another size (29 x 47 pixels, then taller and narrower)."""
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (29 + 11 * i, 47 - 5 * i, 3), dtype=np.uint8)) for i in range(count)]


def values(scores: list[list[dict[str, float]]], name: str) -> list[list[float]]:
    """The score `name` of every pair, per image, from a filter's `score` output."""
    return [[pair[name] for pair in pairs] for pairs in scores]


def max_difference(actual: list[list[float]], expected: list[list[float]]) -> float:
    """The largest difference between two sets of per-image scores of the same shape."""
    assert [len(row) for row in actual] == [len(row) for row in expected]
    return max((abs(a - e) for row_a, row_e in zip(actual, expected) for a, e in zip(row_a, row_e)), default=0.0)


def bootstrap_with_filter(captioner: str, filter_id: str, tmp_path: Path,
                          **options: Any) -> tuple[RunSummary, dict[str, Any], list[dict[str, Any]]]:
    """`capfilt bootstrap --mode annotate` of 8 shapes samples (2 shards) with `captioner` and the filter: its
    summary, its capfilt_run.json and the JSON records of its first shard."""
    write_webdataset_shards(tmp_path / "in", shape_items(8), samples_per_shard=4)
    summary = capfilt.run(str(tmp_path / "in"), str(tmp_path / "out"), "bootstrap", captioner=captioner,
                          filter=[filter_id], batch_size=4, device="cpu", dtype="fp32", num_captions=2, num_beams=1,
                          max_length=12, min_length=5, mode="annotate", **options)
    run = json.loads((tmp_path / "out" / "capfilt_run.json").read_text())
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        records = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return summary, run, records
