"""The image-text-to-text captioner family against plain `model.generate(**processor(...))` calls, on a tiny
random SmolVLM (Idefics3, capfilt.demo.tiny_vlm); the other families are in tests/test_vlm_families.py."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, LogitsProcessorList, TopPLogitsWarper

import capfilt
from capfilt.decode import decode_image
from capfilt.demo.tiny_vlm import build_tiny_idefics3
from capfilt.models import captioner_family, load_captioner, load_filter
from capfilt.models.base import DecodingSettings
from capfilt.models.sampling import sample_seed
from capfilt.models.vlm import DEFAULT_INSTRUCTION, NewTokenNoise, VlmCaptioner
from tests.conftest import shape_items
from tests.datasets import write_webdataset_shards

PROMPT = "Describe this image in one sentence."
BEAM = DecodingSettings(num_beams=3, num_captions=2, max_length=8, min_length=3, prompt=PROMPT)
NUCLEUS = DecodingSettings(num_captions=2, max_length=8, min_length=3, prompt=PROMPT, seed=11)
KEYS = ["key0", "key1", "key2"]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    return str(build_tiny_idefics3(tmp_path_factory.mktemp("tiny-idefics3"), seed=3))


def pictures() -> list[Image.Image]:
    """Three pictures of different shapes (one larger than the captioner's canvas): different tile counts."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            for height, width in [(40, 30), (30, 120), (100, 100)]]


def plain_captions(model_id: str, images: list[Image.Image], settings: DecodingSettings, rows: int = 1,
                   noise_seeds: list[int] | None = None, **generate: object) -> list[list[str]]:
    """generate() on the processor's left-padded batch (each picture `rows` times), new tokens decoded; with
    `noise_seeds`, greedy over top-p-filtered logits plus that keyed noise."""
    processor = AutoProcessor.from_pretrained(model_id)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(model_id).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": settings.prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    repeated = [[image] for image in images for _ in range(rows)]
    inputs = processor(images=repeated, text=[text] * len(repeated), padding=True, return_tensors="pt")
    assert (inputs["attention_mask"][:, 0] == 0).any()  # the batch is padded, on the left
    if noise_seeds is not None:
        noise = NewTokenNoise(noise_seeds, inputs["input_ids"].shape[1])
        generate["logits_processor"] = LogitsProcessorList([TopPLogitsWarper(settings.top_p), noise])
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=settings.max_length, min_new_tokens=settings.min_length,
                             repetition_penalty=settings.effective_repetition_penalty, **generate)
    texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    n = settings.num_captions
    return [[t.strip() for t in texts[i * n : (i + 1) * n]] for i in range(len(images))]


def fitted(captioner: VlmCaptioner, images: list[Image.Image]) -> list[Image.Image]:
    """The pictures as the captioner sees them: through its preprocessing and back."""
    return captioner.pictures(captioner.preprocess_all(images))


def test_the_family_is_chosen_by_model_type(tiny_vlm):
    assert captioner_family(tiny_vlm) is VlmCaptioner


def test_pictures_come_back_whole_from_the_canvas(tiny_vlm):
    captioner = load_captioner(tiny_vlm, BEAM, "cpu", torch.float32)
    images = pictures()
    back = fitted(captioner, images)
    assert [image.size for image in back] == [(30, 40), (56, 14), (56, 56)]  # fitted into the 56-pixel side
    assert np.array_equal(np.asarray(back[0]), np.asarray(images[0]))  # a small picture is kept as decoded


def test_beam_captions_equal_generate(tiny_vlm):
    captioner = load_captioner(tiny_vlm, BEAM, "cpu", torch.float32)
    images = fitted(captioner, pictures())
    captions = captioner.caption(images, KEYS)
    assert [len(texts) for texts in captions] == [2, 2, 2]
    assert captions == plain_captions(tiny_vlm, images, BEAM, num_beams=3, num_return_sequences=2,
                                      do_sample=False)


def test_nucleus_sampling_is_keyed_and_equals_generate_with_the_same_noise(tiny_vlm):
    captioner = load_captioner(tiny_vlm, NUCLEUS, "cpu", torch.float32)
    generation = captioner.model.generation_config
    assert generation.temperature in (None, 1.0) and not generation.top_k  # the warpers: top-p alone
    images = fitted(captioner, pictures())
    together = captioner.caption(images, KEYS)
    alone = [captioner.caption([image], [key])[0] for image, key in zip(images, KEYS)]
    reversed_batch = captioner.caption(images[::-1], KEYS[::-1])[::-1]
    assert together == alone == reversed_batch
    assert captioner.caption(images, ["other0", "other1", "other2"]) != together  # the key seeds them
    seeds = [sample_seed(NUCLEUS.seed, key, j) for key in KEYS for j in range(NUCLEUS.num_captions)]
    assert together == plain_captions(tiny_vlm, images, NUCLEUS, rows=2, noise_seeds=seeds, do_sample=False)


def test_blips_default_prompt_becomes_an_instruction(tiny_vlm):
    captioner = load_captioner(tiny_vlm, replace(BEAM, prompt=DecodingSettings.prompt), "cpu", torch.float32)
    assert captioner.settings.prompt == DEFAULT_INSTRUCTION  # and the record beside each caption says so
    assert captioner.text.endswith(f"{DEFAULT_INSTRUCTION}<end_of_utterance>\nAssistant:")


def read_records(directory) -> dict[str, dict]:
    records = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    records[member.name.removesuffix(".json")] = json.loads(tar.extractfile(member).read())
    return records


def test_bootstrap_with_a_vlm_captioner_and_a_blip_filter(tiny_vlm, tiny_models, tmp_path):
    items = shape_items(6)
    write_webdataset_shards(tmp_path / "in", items, samples_per_shard=3)
    summary = capfilt.run(str(tmp_path / "in"), str(tmp_path / "out"), "bootstrap", captioner=tiny_vlm,
                          filter=[tiny_models[1]], batch_size=4, device="cpu", dtype="fp32", num_captions=2,
                          num_beams=1, top_p=NUCLEUS.top_p, max_length=8, min_length=3, prompt=PROMPT, seed=5,
                          mode="annotate")
    assert summary.read == summary.written == 6
    records = read_records(tmp_path / "out")
    assert sorted(records) == [key for key, *_ in items]
    captioner = load_captioner(tiny_vlm, replace(NUCLEUS, seed=5), "cpu", torch.float32)
    expected = captioner.caption([decode_image(image) for _, image, *_ in items], [key for key, *_ in items])
    for (key, *_), texts in zip(items, expected):
        written = records[key]["synthetic_captions"]
        assert {caption["text"]: caption["count"] for caption in written} == Counter(texts)
        assert all(0 <= caption["itm_score"] <= 1 and caption["decoding"]["prompt"] == PROMPT for caption in written)


def test_a_long_caption_is_kept_whole_and_truncated_only_for_scoring(tiny_vlm, tiny_models, tmp_path):
    """400 new tokens, past BLIP's 35-token text limit: the output keeps the caption as written; the BLIP filter
    scores what its tokenizer keeps of it."""
    items = shape_items(2)
    write_webdataset_shards(tmp_path / "in", items)
    capfilt.run(str(tmp_path / "in"), str(tmp_path / "out"), "bootstrap", captioner=tiny_vlm,
                filter=[tiny_models[1]], batch_size=2, device="cpu", dtype="fp32", num_beams=2, max_length=400,
                min_length=400, prompt=PROMPT, mode="annotate")
    records = read_records(tmp_path / "out")
    settings = DecodingSettings(num_beams=2, max_length=400, min_length=400, prompt=PROMPT)
    captioner = load_captioner(tiny_vlm, settings, "cpu", torch.float32)
    blip = load_filter(tiny_models[1], "cpu", torch.float32)
    for key, image, *_ in items:
        [[caption]] = captioner.caption([decode_image(image)], [key])
        [written] = records[key]["synthetic_captions"]
        assert written["text"] == caption  # whole
        full = blip.processor.tokenizer(caption)["input_ids"]
        assert len(full) > blip.text_max_tokens == len(blip.tokenize([caption])[0]) == 35
        [[scores]] = blip.score([decode_image(image)], [[caption]], ["itm"])
        assert written["itm_score"] == pytest.approx(scores["itm"], abs=1e-5)
