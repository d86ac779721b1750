"""Shared fixtures: tiny random BLIP models saved with `save_pretrained`, and noisy shapes datasets."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from capfilt.demo import shapes
from capfilt.demo.tiny_blip import build_tiny_pair
from tests.datasets import Item, encode_image


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[str, str]:
    """A random tiny captioner and filter with different input sizes (each must use its own processor)."""
    captioner, filter_ = build_tiny_pair(
        tmp_path_factory.mktemp("tiny-blip"), seed=5, captioner_image_size=32, filter_image_size=48
    )
    return str(captioner), str(filter_)


def shape_items(count: int, seed: int = 0, start: int = 0) -> list[Item]:
    """Web-like samples: true, mismatched and junk captions, and some without a caption."""
    rng = random.Random(seed)
    items: list[Item] = []
    for number in range(start, start + count):
        scene = shapes.random_scene(rng)
        kind = number % 4
        caption = {
            0: shapes.describe(scene),
            1: shapes.mismatched_caption(scene, rng),
            2: shapes.junk_alt_text(rng),
            3: None,
        }[kind]
        items.append((f"{number:09d}", encode_image(shapes.render(scene, 64)), caption, {"source": "test"}))
    return items


@pytest.fixture
def shapes_dataset(tmp_path) -> Path:
    """Three webdataset shards (7, 7, 6 samples) laid out as img2dataset writes them."""
    from tests.datasets import write_webdataset_shards

    write_webdataset_shards(tmp_path / "in", shape_items(20), samples_per_shard=7)
    return tmp_path / "in"
