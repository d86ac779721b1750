"""The captioner and filter give what plain per-image / per-pair transformers calls give."""

from __future__ import annotations

import time

import pytest
import torch

from capfilt.demo import shapes
from capfilt.demo.tiny_blip import build_tiny_pair
from capfilt.errors import ModelLoadError
from capfilt.models import DecodingSettings, load_captioner, load_filter
from capfilt.models import loading
from capfilt.models.blip import strip_prompt
from tests import reference


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    # Different input sizes, so that each model must use its own processor.
    return build_tiny_pair(tmp_path_factory.mktemp("tiny"), seed=3, captioner_image_size=32, filter_image_size=48)


@pytest.fixture(scope="module")
def images():
    import random

    rng = random.Random(7)
    return [shapes.render(shapes.random_scene(rng), 96) for _ in range(5)]


@pytest.mark.parametrize("num_beams,num_captions", [(3, 1), (3, 2)])
def test_beam_captions_equal_per_image_generate(tiny_pair, images, num_beams, num_captions):
    settings = DecodingSettings(num_beams=num_beams, num_captions=num_captions, max_length=12, min_length=5)
    captioner = load_captioner(str(tiny_pair[0]), settings, "cpu", torch.float32)
    assert captioner.caption(images) == [reference.beam_captions(tiny_pair[0], image, settings) for image in images]
    assert captioner.caption(images[:2]) + captioner.caption(images[2:]) == captioner.caption(images)


def test_nucleus_sampling_gives_requested_count_and_is_seeded(tiny_pair, images):
    settings = DecodingSettings(num_captions=3, max_length=12, min_length=5, seed=11)
    captioner = load_captioner(str(tiny_pair[0]), settings, "cpu", torch.float32)
    first = captioner.caption(images)
    assert [len(c) for c in first] == [3] * len(images)
    assert captioner.caption(images) == first
    assert all(not text.startswith("a picture of") for texts in first for text in texts)


@pytest.mark.parametrize("pair_batch_size", [1, 3, 256])
def test_filter_scores_equal_per_pair_calls(tiny_pair, images, pair_batch_size):
    captions = [
        ["a red circle on a blue background", "IMG_2031.JPG"],
        ["a small yellow triangle"],
        [],
        ["a picture of a picture of " * 20, "a green square", "a large star"],
        ["a white square on a black background"],
    ]
    filter_ = load_filter(str(tiny_pair[1]), "cpu", torch.float32, text_max_tokens=35)
    filter_.pair_batch_size = pair_batch_size
    scores = filter_.score(images, captions, itm=True, itc=True)
    assert [len(s) for s in scores] == [len(c) for c in captions]
    for image, texts, image_scores in zip(images, captions, scores):
        for text, score in zip(texts, image_scores):
            itm, itc = reference.pair_scores(tiny_pair[1], image, text, 35)
            assert score.itm == pytest.approx(itm, abs=1e-5)
            assert score.itc == pytest.approx(itc, abs=1e-5)


def test_filter_computes_only_requested_scores(tiny_pair, images):
    filter_ = load_filter(str(tiny_pair[1]), "cpu", torch.float32, text_max_tokens=35)
    (score,), = filter_.score(images[:1], [["a red circle"]], itm=False, itc=True)
    assert score.itm is None and score.itc is not None


def test_strip_prompt():
    assert strip_prompt("a picture of a red circle", "a picture of ") == "a red circle"
    assert strip_prompt("a red circle", "") == "a red circle"


def test_missing_local_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_filter(str(tmp_path / "nope" / "filter"), "cpu", torch.float32, 35)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load the filter"):
        load_filter(str(tmp_path / "empty"), "cpu", torch.float32, 35)


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="Hub is unreachable.*local directory"):
        load_captioner("Salesforce/blip-image-captioning-large", DecodingSettings(), "cpu", torch.float32)
    assert time.perf_counter() - started < 5


def test_bf16_runs_and_stays_close_to_fp32(tiny_pair, images):
    captions = [["a red circle on a blue background", "IMG_2031.JPG"]] * len(images)
    exact = load_filter(str(tiny_pair[1]), "cpu", torch.float32, 35).score(images, captions, itm=True, itc=True)
    half = load_filter(str(tiny_pair[1]), "cpu", torch.bfloat16, 35).score(images, captions, itm=True, itc=True)
    for row_exact, row_half in zip(exact, half):
        for a, b in zip(row_exact, row_half):
            assert b.itm == pytest.approx(a.itm, abs=2e-2) and b.itc == pytest.approx(a.itc, abs=2e-2)
    settings = DecodingSettings(num_beams=2, max_length=10, min_length=3)
    assert len(load_captioner(str(tiny_pair[0]), settings, "cpu", torch.bfloat16).caption(images)) == len(images)
