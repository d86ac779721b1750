"""BLIP's fine-tuning losses (capfilt.models.blip_training) against the transformers models they train."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.demo import shapes
from capfilt.demo.tiny_blip import PROMPT, build_tiny_pair
from capfilt.models.blip_training import (
    IGNORE,
    TEMPERATURE_RANGE,
    FilterLoss,
    caption_labels,
    captioner_loss,
    decoder_input_ids,
    hard_negatives,
    image_embeddings,
    itm_logits,
    prompt_length,
)

BATCH = 4


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[str, str]:
    captioner, filter_ = build_tiny_pair(
        tmp_path_factory.mktemp("tiny-blip-training"), seed=11, captioner_image_size=32, filter_image_size=48
    )
    return str(captioner), str(filter_)


def scenes_batch(processor, count: int = BATCH, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Pixel values of `count` distinct shapes pictures, and their true captions."""
    rng = random.Random(seed)
    scenes: list[shapes.Scene] = []
    while len(scenes) < count:
        scene = shapes.random_scene(rng)
        if shapes.describe(scene) not in {shapes.describe(s) for s in scenes}:
            scenes.append(scene)
    pixels = processor.image_processor(images=[shapes.render(s, 64) for s in scenes], return_tensors="pt")
    return pixels.pixel_values, [shapes.describe(s) for s in scenes]


@pytest.fixture
def captioner(tiny_pair):
    processor = AutoProcessor.from_pretrained(tiny_pair[0])
    return BlipForConditionalGeneration.from_pretrained(tiny_pair[0]).eval(), processor


@pytest.fixture
def retrieval(tiny_pair):
    processor = AutoProcessor.from_pretrained(tiny_pair[1])
    return BlipForImageTextRetrieval.from_pretrained(tiny_pair[1]).eval(), processor


def caption_batch(processor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    pixels, captions = scenes_batch(processor)
    captions[1] = "a red circle"  # a short one, so the batch has padding
    texts = processor.tokenizer([PROMPT + c for c in captions], padding="longest", return_tensors="pt")
    return (
        pixels,
        {"input_ids": texts.input_ids, "attention_mask": texts.attention_mask},
        prompt_length(processor.tokenizer, PROMPT),
    )


def test_caption_labels_ignore_prompt_and_padding(captioner) -> None:
    _, processor = captioner
    _, texts, length = caption_batch(processor)
    assert length == len(PROMPT.split()) + 1  # [DEC] and the prompt's words
    labels = caption_labels(texts["input_ids"], texts["attention_mask"], length)
    assert (labels[:, :length] == IGNORE).all()
    assert (labels[texts["attention_mask"] == 0] == IGNORE).all()
    kept = torch.ones_like(labels, dtype=torch.bool)
    kept[:, :length] = False
    kept &= texts["attention_mask"].bool()
    assert kept.any(dim=1).all()
    assert torch.equal(labels[kept], texts["input_ids"][kept])
    # Every caption ends with [SEP], which the captioner must learn to end with.
    sep = processor.tokenizer.sep_token_id
    assert ((labels == sep).sum(dim=1) == 1).all()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_captioner_loss_is_transformers_lm_loss(captioner, smoothing: float) -> None:
    """Transformers' own loss (`labels=`) shifts the labels itself and takes its label smoothing from the
    config (0 by default); with the same smoothing and the [DEC]-started ids, the two must agree exactly."""
    model, processor = captioner
    pixels, texts, length = caption_batch(processor)
    model.text_decoder.label_smoothing = smoothing
    ids = decoder_input_ids(model, texts["input_ids"])
    assert (ids[:, 0] == processor.tokenizer.bos_token_id).all()
    assert torch.equal(ids[:, 1:], texts["input_ids"][:, 1:])
    labels = caption_labels(ids, texts["attention_mask"], length)
    with torch.no_grad():
        expected = model(pixel_values=pixels, input_ids=ids, attention_mask=texts["attention_mask"], labels=labels).loss
        ours = captioner_loss(model, pixels, **texts, prompt_length=length, label_smoothing=smoothing)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


def test_captioner_gradient_step_lowers_loss(captioner) -> None:
    model, processor = captioner
    pixels, texts, length = caption_batch(processor)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    before = captioner_loss(model, pixels, **texts, prompt_length=length)
    optimiser.zero_grad()
    before.backward()
    optimiser.step()
    with torch.no_grad():
        after = captioner_loss(model, pixels, **texts, prompt_length=length)
    assert after < before


def filter_batch(processor, count: int = BATCH) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixels, captions = scenes_batch(processor, count)
    captions[-1] = "IMG_2031.JPG"  # something of another length, so the batch has padding
    texts = processor.tokenizer(captions, padding="longest", return_tensors="pt")
    return pixels, {"input_ids": texts.input_ids, "attention_mask": texts.attention_mask}


def test_itc_logits_are_the_models_cosine_over_temperature(retrieval) -> None:
    model, processor = retrieval
    pixels, texts = filter_batch(processor)
    loss = FilterLoss()
    with torch.no_grad():
        cosine = model(pixel_values=pixels, **texts, use_itm_head=False).itm_score
        logits = loss.itc_logits(model, image_embeddings(model, pixels), **texts)
    assert cosine.shape == (BATCH, BATCH)
    torch.testing.assert_close(logits, cosine / 0.07, rtol=1e-5, atol=1e-5)


def test_itm_logits_are_the_models_itm_score(retrieval) -> None:
    model, processor = retrieval
    pixels, texts = filter_batch(processor)
    with torch.no_grad():
        expected = model(pixel_values=pixels, **texts, use_itm_head=True).itm_score
        ours = itm_logits(model, image_embeddings(model, pixels), **texts)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_hard_negatives_follow_softmax_without_the_pair() -> None:
    sim = torch.tensor([[5.0, 1.0, 0.0, -1.0], [0.0, 3.0, 2.0, 2.0], [1.0, 1.0, 9.0, 1.0], [0.5, 0.0, 0.0, 4.0]])
    draws = 20000
    generator = torch.Generator().manual_seed(0)
    picks = torch.stack([hard_negatives(sim, generator) for _ in range(draws)])
    assert (picks != torch.arange(4)).all()
    weights = sim.softmax(dim=1).fill_diagonal_(0)
    expected = weights / weights.sum(dim=1, keepdim=True)
    for row in range(4):
        frequencies = torch.bincount(picks[:, row], minlength=4).float() / draws
        torch.testing.assert_close(frequencies, expected[row], atol=0.015, rtol=0)


def test_hard_negatives_are_reproducible_and_survive_underflow() -> None:
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(1)) * 3
    first = hard_negatives(sim, torch.Generator().manual_seed(7))
    assert torch.equal(first, hard_negatives(sim, torch.Generator().manual_seed(7)))
    # softmax(sim) underflows to 0 off the diagonal: the draw must still be one of the other columns.
    confident = torch.eye(3) * 2000
    picks = hard_negatives(confident, torch.Generator().manual_seed(0))
    assert ((picks >= 0) & (picks != torch.arange(3))).all()
    # A batch of one has no negative.
    assert hard_negatives(torch.ones(1, 1)).tolist() == [-1]


def test_hard_negatives_skip_other_captions_of_the_same_picture() -> None:
    image_ids = torch.tensor([0, 0, 1, 2])
    matches = image_ids[:, None] == image_ids[None, :]
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        picks = hard_negatives(torch.zeros(4, 4), generator, matches)
        assert not matches[torch.arange(4), picks].any()
    assert hard_negatives(torch.zeros(2, 2), generator, torch.ones(2, 2, dtype=torch.bool)).tolist() == [-1, -1]


def test_filter_loss_batch_of_one_has_positives_only(retrieval) -> None:
    model, processor = retrieval
    pixels, texts = filter_batch(processor, 1)
    losses = FilterLoss()(model, pixels, **texts, generator=torch.Generator().manual_seed(0))
    assert losses.itc.item() == pytest.approx(0.0, abs=1e-6)  # one text to choose from
    with torch.no_grad():
        match = model(pixel_values=pixels, **texts, use_itm_head=True).itm_score
    expected = torch.nn.functional.cross_entropy(match, torch.ones(1, dtype=torch.long))
    torch.testing.assert_close(losses.itm, expected, rtol=1e-5, atol=1e-5)


def test_filter_loss_is_reproducible_and_training_lowers_it(retrieval) -> None:
    model, processor = retrieval  # in eval mode: no dropout, so the same draws give the same losses
    pixels, texts = filter_batch(processor)
    loss = FilterLoss()
    first = loss(model, pixels, **texts, generator=torch.Generator().manual_seed(3))
    again = loss(model, pixels, **texts, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.stack(first), torch.stack(again))
    assert torch.allclose(first.total, first.itc + first.itm)

    parameters = [*model.parameters(), *loss.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    totals = []
    for _ in range(8):
        losses = loss(model, pixels, **texts, generator=generator)
        # BLIP clamps the temperature in place as each forward starts: the one every loss uses is in range.
        assert TEMPERATURE_RANGE[0] <= loss.temp.item() <= TEMPERATURE_RANGE[1]
        totals.append(losses.total.item())
        optimiser.zero_grad()
        losses.total.backward()
        optimiser.step()
    assert loss.temp.grad is not None and loss.temp.grad.abs() > 0
    assert totals[-1] < totals[0]


def test_temperature_is_clamped_to_blips_range(retrieval) -> None:
    model, processor = retrieval
    pixels, texts = filter_batch(processor)
    for start, clamped in [(2.0, TEMPERATURE_RANGE[1]), (1e-6, TEMPERATURE_RANGE[0])]:
        loss = FilterLoss(start)
        with torch.no_grad():
            logits = loss.itc_logits(model, image_embeddings(model, pixels), **texts)
            cosine = model(pixel_values=pixels, **texts, use_itm_head=False).itm_score
        assert loss.temp.item() == pytest.approx(clamped)
        torch.testing.assert_close(logits, cosine / clamped, rtol=1e-5, atol=1e-4)


def test_filter_loss_shares_itc_targets_between_captions_of_one_picture(retrieval) -> None:
    model, processor = retrieval
    pixels, texts = filter_batch(processor)
    pixels[1] = pixels[0]  # rows 0 and 1: two captions of one picture
    image_ids = torch.tensor([0, 0, 1, 2])
    loss = FilterLoss()
    with torch.no_grad():
        losses = loss(model, pixels, **texts, generator=torch.Generator().manual_seed(0), image_ids=image_ids)
        logits = loss.itc_logits(model, image_embeddings(model, pixels), **texts)
    targets = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    expected = (
        -(logits.log_softmax(1) * targets).sum(1).mean() - (logits.t().log_softmax(1) * targets).sum(1).mean()
    ) / 2
    torch.testing.assert_close(losses.itc, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(losses.itm)
