"""The SigLIP filter family against plain `SiglipModel(...)` calls, on a tiny random SigLIP (capfilt.demo.tiny_siglip)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, SiglipModel

import capfilt
from capfilt.demo.tiny_siglip import build_tiny_siglip
from capfilt.models import filter_family, load_filter
from capfilt.models.siglip import SiglipFilter
from tests.conftest import shape_items
from tests.datasets import write_webdataset_shards
from tests.scoring import bootstrap_with_filter, max_difference, pictures, values

LONG_CAPTION = " ".join(["a small red circle next to a big blue square on a white background"] * 5)
CAPTIONS = [["a red circle", "IMG_2031.JPG", LONG_CAPTION], [], ["a blue square", "a red circle"], [LONG_CAPTION]]


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory) -> str:
    return str(build_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip") / "siglip", seed=3))


@torch.inference_mode()
def plain_scores(model_dir: str, images: list[Image.Image], captions: list[list[str]]) -> list[list[float]]:
    """As SigLIP's model card calls it: `padding="max_length"`, then `torch.sigmoid(logits_per_image)`."""
    model, processor = SiglipModel.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)
    result = []
    for image, texts in zip(images, captions):
        if not texts:
            result.append([])
            continue
        inputs = processor(text=texts, images=[image], padding="max_length", truncation=True, return_tensors="pt")
        result.append(torch.sigmoid(model(**inputs).logits_per_image)[0].tolist())
    return result


def test_siglip_scores_equal_the_plain_call_in_one_batch(tiny_siglip):
    siglip = load_filter(tiny_siglip, "cpu", torch.float32)
    assert isinstance(siglip, SiglipFilter) and siglip.own_passes
    images = pictures(len(CAPTIONS))
    ours = values(siglip.score(images, CAPTIONS, ("siglip",)), "siglip")
    theirs = plain_scores(tiny_siglip, images, CAPTIONS)
    assert [len(row) for row in ours] == [len(row) for row in CAPTIONS]
    assert max_difference(ours, theirs) <= 1e-5
    # The scores spread over (0, 1): a test of probabilities all near 0 would show nothing.
    flat = [value for row in ours for value in row]
    assert 0 < min(flat) and max(flat) < 1 and max(flat) - min(flat) > 0.05


def test_the_library_path_and_bf16_agree(tiny_siglip):
    images = pictures(len(CAPTIONS))
    theirs = plain_scores(tiny_siglip, images, CAPTIONS)
    fallback = SiglipFilter(tiny_siglip, "cpu", torch.float32)
    fallback.own_passes = False  # what a release whose passes differ from the plain call gets
    assert max_difference(values(fallback.score(images, CAPTIONS, ("siglip",)), "siglip"), theirs) <= 1e-5
    bf16 = SiglipFilter(tiny_siglip, "cpu", torch.bfloat16)
    assert max_difference(values(bf16.score(images, CAPTIONS, ("siglip",)), "siglip"), theirs) <= 3e-2


def test_siglip_declares_its_score_and_default_rule(tiny_siglip):
    family = filter_family(tiny_siglip)
    assert family is SiglipFilter
    assert [score.name for score in family.scores] == ["siglip"] and family.default_keep == ("siglip>=0.1",)


def test_bootstrap_with_a_blip_captioner_and_a_siglip_filter(tiny_models, tiny_siglip, tmp_path):
    summary, run, records = bootstrap_with_filter(tiny_models[0], tiny_siglip, tmp_path)
    assert summary.read == summary.written == 8
    assert run["keep"] == ["siglip>=0.1"] and set(run["scores"]) == {"siglip"}
    assert all(0 <= caption["siglip_score"] <= 1 for record in records for caption in record["synthetic_captions"])
    assert any(record.get("web_siglip_score") is not None for record in records)


def test_captions_longer_than_the_text_tower_are_counted_as_truncated(tiny_siglip, tmp_path):
    """The tiny SigLIP reads 16 tokens (the released ones 64): a longer web caption is scored on its start, and
    the run's stats say how many were."""
    items = shape_items(4)
    for index, caption in ((0, LONG_CAPTION), (1, "a red circle")):
        items[index] = (items[index][0], items[index][1], caption, items[index][3])
    write_webdataset_shards(tmp_path / "in", items, samples_per_shard=4)
    summary = capfilt.run(str(tmp_path / "in"), str(tmp_path / "out"), "filter", filter=[tiny_siglip], batch_size=4,
                          device="cpu", dtype="fp32", mode="annotate")
    assert summary.captions_truncated == {"siglip": 1}
    assert json.loads((tmp_path / "out" / "capfilt_summary.json").read_text())["captions_truncated"] == {"siglip": 1}
    shard_stats = json.loads((tmp_path / "out" / "00000_stats.json").read_text())
    assert shard_stats["captions_truncated"] == {"siglip": 1}
