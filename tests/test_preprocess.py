"""capfilt's table-driven preprocessing gives the checkpoint's image processor's tensor, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessor

try:  # BLIP's PIL image processor; before transformers 5.24 it was `BlipImageProcessor`
    from transformers import BlipImageProcessorPil as BlipImageProcessor
except ImportError:
    from transformers import BlipImageProcessor

from capfilt.decode import decode_image
from capfilt.models.preprocess import fast_preprocess, processor_preprocess
from tests.datasets import encode_image


def pictures() -> list[Image.Image]:
    """Photos' shapes and contents: noise, flat colour, extremes, portrait, landscape, tiny, and a JPEG round trip."""
    rng = np.random.default_rng(1)
    noise = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(384, 384), (480, 640),
                                                                                           (900, 300), (5, 7)]]
    flat = [Image.new("RGB", (200, 120), colour) for colour in [(0, 0, 0), (255, 255, 255), (12, 200, 99)]]
    gray = Image.fromarray(rng.integers(0, 256, (64, 96), dtype=np.uint8)).convert("RGB")
    jpeg = decode_image(encode_image(noise[1]), 10**8)
    return [*noise, *flat, gray, jpeg]


@pytest.mark.parametrize("size", [32, 384])
def test_fast_preprocess_equals_the_processor_bit_for_bit(size):
    processor = BlipImageProcessor(size={"height": size, "width": size})
    fast = fast_preprocess(processor)
    assert fast is not None
    reference = processor_preprocess(processor)
    for picture in pictures():
        got, want = fast(picture), reference(picture)
        assert got.dtype == want.dtype == torch.float32
        assert torch.equal(got, want), picture.size


def test_saved_checkpoint_processor_takes_the_fast_path(tiny_models):
    processor = AutoProcessor.from_pretrained(tiny_models[0]).image_processor
    fast = fast_preprocess(processor)
    assert fast is not None
    assert torch.equal(fast(pictures()[1]), processor_preprocess(processor)(pictures()[1]))


@pytest.mark.parametrize("processor", [
    BlipImageProcessor(size={"height": 32, "width": 32}, do_normalize=False),  # settings the table does not cover
    CLIPImageProcessor(),  # another family: shortest-edge resize and centre crop
])
def test_processors_it_does_not_reproduce_keep_their_own_path(processor):
    assert fast_preprocess(processor) is None
