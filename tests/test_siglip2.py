"""The SigLIP 2 NaFlex filter family against plain `Siglip2Model(...)` calls, on a tiny random SigLIP 2
(capfilt.demo.tiny_siglip2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Siglip2Model

from capfilt.demo.tiny_siglip2 import build_tiny_siglip2
from capfilt.errors import ModelLoadError
from capfilt.models import filter_family, load_filter
from capfilt.models.siglip import SiglipFilter
from capfilt.models.siglip2 import Siglip2Filter, pack, unpack
from tests.scoring import bootstrap_with_filter, max_difference, values

MAX_NUM_PATCHES = 16
LONG_CAPTION = " ".join(["a small red circle next to a big blue square on a white background"] * 8)
CAPTIONS = [["a red circle", "IMG_2031.JPG", LONG_CAPTION], [], ["a blue square", "a red circle"], [LONG_CAPTION],
            ["A Red Circle", "a green star"]]
# Height × width: wide, tall, square, a strip, a small one: different patch grids and paddings in one batch.
SIZES = [(29, 47), (70, 22), (33, 33), (12, 95), (9, 14)]


@pytest.fixture(scope="module")
def tiny_siglip2(tmp_path_factory) -> str:
    return str(build_tiny_siglip2(tmp_path_factory.mktemp("tiny-siglip2") / "siglip2", seed=3,
                                  max_num_patches=MAX_NUM_PATCHES))


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for size in SIZES]


@torch.inference_mode()
def plain_scores(model_dir: str, images: list[Image.Image], captions: list[list[str]]) -> list[list[float]]:
    """As SigLIP 2's model card calls it: `padding="max_length"`, `max_num_patches`, then
    `torch.sigmoid(logits_per_image)`; one call per picture."""
    model, processor = Siglip2Model.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)
    result = []
    for image, texts in zip(images, captions):
        if not texts:
            result.append([])
            continue
        inputs = processor(text=texts, images=[image], padding="max_length", max_num_patches=MAX_NUM_PATCHES,
                           return_tensors="pt")
        result.append(torch.sigmoid(model(**inputs).logits_per_image)[0].tolist())
    return result


def test_the_pictures_have_different_patch_grids_and_pack_into_one_shape(tiny_siglip2):
    processor = AutoProcessor.from_pretrained(tiny_siglip2).image_processor
    inputs = processor(images=pictures(), return_tensors="pt")
    grids = [tuple(grid) for grid in inputs["spatial_shapes"].tolist()]
    assert len(set(grids)) >= 4 and len({rows * columns for rows, columns in grids}) > 2
    siglip2 = load_filter(tiny_siglip2, "cpu", torch.float32)
    packed = siglip2.preprocess_all(pictures())
    assert packed.shape == (len(SIZES), MAX_NUM_PATCHES, 3 * 16 * 16 + 3)
    for key, value in unpack(packed).items():
        assert torch.equal(value, inputs[key].to(value.dtype)), key
    # The grid's columns stay exact past bfloat16's 256 (a 1 × 1024 strip of a so400m NaFlex checkpoint).
    big = {"pixel_values": torch.zeros(1, 1024, 6), "pixel_attention_mask": torch.ones(1, 1024, dtype=torch.int32),
           "spatial_shapes": torch.tensor([[1, 1023]])}
    assert unpack(siglip2.to_device(pack(big)))["spatial_shapes"].tolist() == [[1, 1023]]


def test_siglip2_scores_equal_the_plain_call_in_one_batch(tiny_siglip2):
    siglip2 = load_filter(tiny_siglip2, "cpu", torch.float32)
    assert isinstance(siglip2, Siglip2Filter) and siglip2.own_passes
    images = pictures()
    ours = values(siglip2.score(images, CAPTIONS, ("siglip",)), "siglip")
    theirs = plain_scores(tiny_siglip2, images, CAPTIONS)
    assert max_difference(ours, theirs) <= 1e-5
    # The scores spread over (0, 1): a test of probabilities all near 0 would show nothing.
    flat = [value for row in ours for value in row]
    assert 0 < min(flat) and max(flat) < 1 and max(flat) - min(flat) > 0.05
    # SigLIP 2's tokenizer lowercases (where the release has it), as the plain call does.
    if type(siglip2.processor.tokenizer).__name__ == "Siglip2Tokenizer":
        lowercase = values(siglip2.score(images[4:], [["a red circle"]], ("siglip",)), "siglip")[0][0]
        assert ours[4][0] == pytest.approx(lowercase, abs=1e-6)


def test_the_library_path_and_bf16_agree(tiny_siglip2):
    images = pictures()
    theirs = plain_scores(tiny_siglip2, images, CAPTIONS)
    fallback = Siglip2Filter(tiny_siglip2, "cpu", torch.float32)
    fallback.own_passes = False  # what a release whose passes differ from the plain call gets
    assert max_difference(values(fallback.score(images, CAPTIONS, ("siglip",)), "siglip"), theirs) <= 1e-5
    bf16 = Siglip2Filter(tiny_siglip2, "cpu", torch.bfloat16)
    assert bf16.own_passes
    assert max_difference(values(bf16.score(images, CAPTIONS, ("siglip",)), "siglip"), theirs) <= 3e-2


def test_a_tokenizer_that_pads_on_the_left(tmp_path):
    """Siglip2Tokenizer's class default pads on the left: texts are padded as the tokenizer pads them."""
    model_dir = str(build_tiny_siglip2(tmp_path / "left", seed=4, max_num_patches=MAX_NUM_PATCHES,
                                       padding_side="left"))
    siglip2 = load_filter(model_dir, "cpu", torch.float32)
    assert siglip2.processor.tokenizer.padding_side == "left" and siglip2.own_passes
    images = pictures()
    theirs = plain_scores(model_dir, images, CAPTIONS)
    assert max_difference(values(siglip2.score(images, CAPTIONS, ("siglip",)), "siglip"), theirs) <= 1e-5
    siglip2.own_passes = False
    assert max_difference(values(siglip2.score(images, CAPTIONS, ("siglip",)), "siglip"), theirs) <= 1e-5


def test_the_family_is_chosen_by_model_type(tiny_siglip2):
    family = filter_family(tiny_siglip2)
    assert family is Siglip2Filter
    assert [score.name for score in family.scores] == ["siglip"] and family.default_keep == ("siglip>=0.1",)
    with pytest.raises(ModelLoadError, match="'siglip2' model, not a SiglipModel"):
        SiglipFilter(tiny_siglip2, "cpu", torch.float32)


def test_bootstrap_with_a_blip_captioner_and_a_siglip2_filter(tiny_models, tiny_siglip2, tmp_path):
    summary, run, records = bootstrap_with_filter(tiny_models[0], tiny_siglip2, tmp_path)
    assert summary.read == summary.written == 8
    assert run["keep"] == ["siglip>=0.1"] and set(run["scores"]) == {"siglip"}
    assert all(0 <= caption["siglip_score"] <= 1 for record in records for caption in record["synthetic_captions"])
    assert any(record.get("web_siglip_score") is not None for record in records)
