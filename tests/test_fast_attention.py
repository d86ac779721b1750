"""SDPA attention gives what transformers' own BLIP attention gives."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.demo import shapes
from capfilt.models.fast_attention import use_sdpa


@pytest.fixture(scope="module")
def images():
    rng = random.Random(3)
    return [shapes.render(shapes.random_scene(rng), 64) for _ in range(4)]


def test_vision_and_text_towers_equal_the_library(tiny_models, images):
    processor = AutoProcessor.from_pretrained(tiny_models[1])
    plain = BlipForImageTextRetrieval.from_pretrained(tiny_models[1]).eval()
    fast = use_sdpa(BlipForImageTextRetrieval.from_pretrained(tiny_models[1]).eval())
    texts = ["a red circle on a blue background", "IMG_2031.JPG", "a star", "a large green square"]
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        for use_itm_head in (True, False):
            expected = plain(**inputs, use_itm_head=use_itm_head)
            actual = fast(**inputs, use_itm_head=use_itm_head)
            torch.testing.assert_close(actual.itm_score, expected.itm_score, rtol=0, atol=1e-5)
            torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_the_decoder_cache_equals_the_library(tiny_models, images, num_beams):
    processor = AutoProcessor.from_pretrained(tiny_models[0])
    plain = BlipForConditionalGeneration.from_pretrained(tiny_models[0]).eval()
    fast = use_sdpa(BlipForConditionalGeneration.from_pretrained(tiny_models[0]).eval())
    inputs = processor(images=images, text=["a picture of "] * len(images), return_tensors="pt")
    settings = dict(num_beams=num_beams, max_length=14, min_length=5)
    with torch.no_grad():
        assert torch.equal(fast.generate(**inputs, **settings), plain.generate(**inputs, **settings))
