"""The BLIP-2 filter family against plain `Blip2ForImageTextRetrieval(...)` calls, on a tiny random BLIP-2
(capfilt.demo.tiny_blip2)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    OPTConfig,
)

from capfilt.demo.tiny_blip2 import TEXT_POSITIONS, build_tiny_blip2
from capfilt.errors import ModelLoadError
from capfilt.models import filter_family, load_filter
from capfilt.models.blip2 import Blip2Filter
from tests.scoring import bootstrap_with_filter, max_difference, pictures, values

LONG_CAPTION = " ".join(["a small red circle next to a big blue square on a white background"] * 3)
# Several pictures, 0 to 3 captions each, a caption the tokenizer truncates, texts repeated within and across
# pictures.
CAPTIONS = [["a red circle", "IMG_2031.JPG", LONG_CAPTION], [], ["a blue square", "a red circle", "a red circle"],
            [LONG_CAPTION]]
NAMES = ("blip2_itm", "blip2_itc")


@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory) -> str:
    return str(build_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2") / "blip2", seed=3))


@pytest.fixture(scope="module")
def tiny_blip2_text_only(tmp_path_factory) -> str:
    """A processor without image tokens before the text, and a config without their id."""
    return str(build_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2") / "blip2", seed=4, image_tokens=False))


@torch.inference_mode()
def plain_scores(model_dir: str, images: list[Image.Image], captions: list[list[str]]) -> dict[str, list[list[float]]]:
    """As the model card calls it: the processor, then the model with the ITM head (softmax, index 1 = match)
    on each pair, and without it (ITC) on each picture against its captions."""
    model = Blip2ForImageTextRetrieval.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    itm, itc = [], []
    for image, texts in zip(images, captions):
        if not texts:
            itm.append([])
            itc.append([])
            continue
        pairs = processor(images=[image] * len(texts), text=texts, padding=True, truncation=True, return_tensors="pt")
        logits = model(**pairs, use_image_text_matching_head=True).logits_per_image
        itm.append(logits.softmax(dim=-1)[:, 1].tolist())
        inputs = processor(images=[image], text=texts, padding=True, truncation=True, return_tensors="pt")
        itc.append(model(**inputs, use_image_text_matching_head=False).logits_per_image[0].tolist())
    return {"blip2_itm": itm, "blip2_itc": itc}


@pytest.mark.parametrize("model", ["tiny_blip2", "tiny_blip2_text_only"])
def test_blip2_scores_equal_the_plain_call_in_one_batch(model, request):
    model_dir = request.getfixturevalue(model)
    blip2 = load_filter(model_dir, "cpu", torch.float32)
    assert isinstance(blip2, Blip2Filter) and blip2.own_passes
    assert len(blip2.processor.tokenizer(LONG_CAPTION)["input_ids"]) > TEXT_POSITIONS  # it is truncated
    images = pictures(len(CAPTIONS))
    ours = blip2.score(images, CAPTIONS, NAMES)
    theirs = plain_scores(model_dir, images, CAPTIONS)
    assert [len(row) for row in ours] == [len(row) for row in CAPTIONS]
    for name in NAMES:
        assert max_difference(values(ours, name), theirs[name]) <= 1e-5, name
    # The scores spread, and differ between pictures: a test of near-constant scores would show nothing.
    itm = [value for row in values(ours, "blip2_itm") for value in row]
    assert 0 < min(itm) < 0.5 < max(itm) < 1
    itc = values(ours, "blip2_itc")
    assert -1 <= min(map(min, filter(None, itc))) and max(map(max, filter(None, itc))) <= 1
    assert abs(itc[0][0] - itc[2][1]) > 1e-3  # "a red circle" against two pictures


def test_only_the_scores_asked_for(tiny_blip2):
    blip2 = load_filter(tiny_blip2, "cpu", torch.float32)
    images = pictures(len(CAPTIONS))
    both = blip2.score(images, CAPTIONS, NAMES)
    itc = blip2.score(images, CAPTIONS, ("blip2_itc",))
    assert all(set(pair) == {"blip2_itc"} for pairs in itc for pair in pairs)
    assert values(itc, "blip2_itc") == values(both, "blip2_itc")
    assert blip2.score(images, CAPTIONS, ()) == [[{} for _ in texts] for texts in CAPTIONS]


def test_the_library_path_and_bf16_agree(tiny_blip2):
    images = pictures(len(CAPTIONS))
    theirs = plain_scores(tiny_blip2, images, CAPTIONS)
    fallback = Blip2Filter(tiny_blip2, "cpu", torch.float32)
    fallback.own_passes = False  # what a release whose passes differ from the plain call gets
    scores = fallback.score(images, CAPTIONS, NAMES)
    bf16 = Blip2Filter(tiny_blip2, "cpu", torch.bfloat16)
    assert bf16.own_passes
    bf16_scores = bf16.score(images, CAPTIONS, NAMES)
    for name in NAMES:
        assert max_difference(values(scores, name), theirs[name]) <= 1e-5, name
        assert max_difference(values(bf16_scores, name), theirs[name]) <= 3e-2, name


def test_one_vision_pass_per_batch(tiny_blip2):
    """Three pictures with two or three captions each, both scores: one vision pass; one Q-Former pass each for
    the pairs (ITM), the pictures' queries and the distinct texts (ITC)."""
    blip2 = load_filter(tiny_blip2, "cpu", torch.float32)
    calls = {"vision": 0, "qformer": 0}

    def counter(name: str):
        def count(*_) -> None:
            calls[name] += 1
        return count

    blip2.model.vision_model.register_forward_hook(counter("vision"))
    blip2.model.qformer.register_forward_hook(counter("qformer"))
    captions = [["a red circle", "a blue square"], ["a red circle", "IMG_2031.JPG", "a green star"],
                ["a blue square", LONG_CAPTION]]
    scores = blip2.score(pictures(3), captions, NAMES)
    assert [len(row) for row in scores] == [2, 3, 2]
    assert calls == {"vision": 1, "qformer": 3}


def test_blip2_declares_its_scores_and_default_rule(tiny_blip2):
    family = filter_family(tiny_blip2)
    assert family is Blip2Filter
    assert [score.name for score in family.scores] == ["blip2_itm", "blip2_itc"]
    assert family.default_scores == ("blip2_itm",) and family.default_keep == ("blip2_itm>=0.5",)


def test_a_blip2_captioner_is_refused_as_a_filter(tiny_blip2, tmp_path):
    """A BLIP-2 checkpoint with a language model and no retrieval weights shares the filter's model_type."""
    retrieval = Blip2ForImageTextRetrieval.from_pretrained(tiny_blip2).config.to_dict()
    qformer = {**retrieval["qformer_config"], "use_qformer_text_input": False}
    opt = OPTConfig(vocab_size=50, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                    word_embed_proj_dim=16, max_position_embeddings=32)
    config = Blip2Config(vision_config=retrieval["vision_config"], qformer_config=qformer,
                         text_config=opt.to_dict(), num_query_tokens=retrieval["num_query_tokens"])
    Blip2ForConditionalGeneration(config).save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(tiny_blip2).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="image-text retrieval weights"):
        load_filter(str(tmp_path), "cpu", torch.float32)


def test_bootstrap_with_a_blip_captioner_and_a_blip2_filter(tiny_models, tiny_blip2, tmp_path):
    # A rule on ITC makes the run compute it beside the family's default ITM.
    summary, run, records = bootstrap_with_filter(tiny_models[0], tiny_blip2, tmp_path, keep=["blip2_itc>=0.3"])
    assert summary.read == summary.written == 8
    assert run["keep"] == ["blip2_itc>=0.3"] and set(run["scores"]) == {"blip2_itm", "blip2_itc"}
    captions = [caption for record in records for caption in record["synthetic_captions"]]
    assert captions and all(0 <= caption["blip2_itm_score"] <= 1 for caption in captions)
    assert all(-1 <= caption["blip2_itc_score"] <= 1 for caption in captions)
    assert any(record.get("web_blip2_itm_score") is not None for record in records)
    assert any(record.get("web_blip2_itc_score") is not None for record in records)
