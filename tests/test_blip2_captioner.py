"""The BLIP-2 captioner family against plain `Blip2ForConditionalGeneration.generate(...)` calls, on tiny random
BLIP-2 captioners with an OPT and a Flan-T5 language model (capfilt.demo.tiny_blip2)."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import replace

import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    Blip2ForConditionalGeneration,
    LogitsProcessorList,
    TopPLogitsWarper,
)

import capfilt
from capfilt.decode import decode_image
from capfilt.demo.tiny_blip2 import build_tiny_blip2, build_tiny_blip2_captioner
from capfilt.errors import ModelLoadError
from capfilt.models import captioner_family, filter_family, load_captioner
from capfilt.models.base import DecodingSettings
from capfilt.models.blip import strip_prompt
from capfilt.models.blip2 import Blip2Captioner, Blip2Filter
from capfilt.models.sampling import KeyedGumbelNoise, sample_seed
from tests.conftest import shape_items
from tests.datasets import write_webdataset_shards
from tests.scoring import pictures

LANGUAGES = ("opt", "t5")
PROMPT = "a photo of"
BEAM = DecodingSettings(num_beams=3, num_captions=2, max_length=12, min_length=6, prompt=PROMPT)
NUCLEUS = DecodingSettings(num_captions=2, max_length=12, min_length=4, prompt=PROMPT, seed=11)
KEYS = ["key0", "key1", "key2"]
# The tiny captioners' query tokens, which an OPT input holds as image tokens before its bos and prompt.
QUERIES = 4


@pytest.fixture(scope="module", params=LANGUAGES)
def tiny_captioner(request, tmp_path_factory) -> str:
    return str(build_tiny_blip2_captioner(tmp_path_factory.mktemp("tiny-blip2") / request.param, seed=3,
                                          language=request.param, num_query_tokens=QUERIES))


def is_opt(model_dir: str) -> bool:
    return not AutoConfig.from_pretrained(model_dir).text_config.is_encoder_decoder


@torch.inference_mode()
def plain_captions(model_dir: str, images: list[Image.Image], settings: DecodingSettings, rows: int = 1,
                   **generate: object) -> list[list[str]]:
    """As the model card calls it: the processor on the pictures and the prompt, then `model.generate`, decoded,
    with the prompt stripped where the output holds it (OPT's does, after the image tokens and bos; Flan-T5 reads
    it in its encoder). The lengths are capfilt's: generate() also counts an OPT input's image tokens. `rows`
    repeats each picture's inputs, one row per sampled caption."""
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(images=images, text=[settings.prompt] * len(images), return_tensors="pt")
    inputs = {name: values.repeat_interleave(rows, dim=0) for name, values in inputs.items()}
    assert inputs["input_ids"][0, :QUERIES].tolist() == [model.config.image_token_index] * QUERIES
    uncounted = QUERIES if is_opt(model_dir) else 0
    output = model.generate(**inputs, max_length=settings.max_length + uncounted,
                            min_length=settings.min_length + uncounted,
                            repetition_penalty=settings.effective_repetition_penalty, **generate)
    texts = processor.batch_decode(output, skip_special_tokens=True)
    if is_opt(model_dir):
        assert all(text.startswith(settings.prompt) for text in texts)  # the prompt is honoured, then stripped
        texts = [strip_prompt(text, settings.prompt) for text in texts]
    n = len(texts) // len(images)
    return [[text.strip() for text in texts[i * n : (i + 1) * n]] for i in range(len(images))]


def test_beam_search_equals_generate(tiny_captioner):
    captioner = load_captioner(tiny_captioner, BEAM, "cpu", torch.float32)
    assert isinstance(captioner, Blip2Captioner) and captioner.own_passes
    images = pictures(3)
    ours = captioner.caption(images, KEYS)
    theirs = plain_captions(tiny_captioner, images, BEAM, num_beams=3, num_return_sequences=2)
    assert ours == theirs
    assert [len(texts) for texts in ours] == [2, 2, 2]
    assert len({texts[0] for texts in ours}) == 3  # each picture its own caption: a mix-up would show


def test_nucleus_sampling_is_keyed_and_equals_generate_with_the_same_noise(tiny_captioner):
    """Each caption is the argmax of its top-p-filtered logits plus Gumbel noise keyed by (seed, sample key,
    caption index): whatever batch its picture comes in, and equal to generate() given the same processors."""
    captioner = load_captioner(tiny_captioner, NUCLEUS, "cpu", torch.float32)
    assert captioner.own_passes
    generation = captioner.model.language_model.generation_config
    assert generation.temperature is None and generation.top_k is None  # the warpers: top-p alone
    images = pictures(3)
    together = captioner.caption(images, KEYS)
    alone = [captioner.caption([image], [key])[0] for image, key in zip(images, KEYS)]
    reversed_batch = captioner.caption(images[::-1], KEYS[::-1])[::-1]
    assert together == alone == reversed_batch
    assert any(len(set(texts)) > 1 for texts in together)  # two draws of a picture differ: they are samples
    assert captioner.caption(images, ["other0", "other1", "other2"]) != together  # the key seeds them
    seeds = [sample_seed(NUCLEUS.seed, key, j) for key in KEYS for j in range(NUCLEUS.num_captions)]
    noise = LogitsProcessorList([TopPLogitsWarper(NUCLEUS.top_p), KeyedGumbelNoise(seeds)])
    assert together == plain_captions(tiny_captioner, images, NUCLEUS, rows=2, do_sample=False,
                                      logits_processor=noise)


@pytest.mark.parametrize("settings", [BEAM, NUCLEUS], ids=["beam", "nucleus"])
def test_one_vision_pass_per_batch(tiny_captioner, settings):
    captioner = load_captioner(tiny_captioner, settings, "cpu", torch.float32)
    calls = Counter()
    captioner.model.vision_model.register_forward_hook(lambda *_: calls.update(["vision"]))
    captioner.model.qformer.register_forward_hook(lambda *_: calls.update(["qformer"]))
    captions = captioner.caption(pictures(3), KEYS)
    assert [len(texts) for texts in captions] == [2, 2, 2]
    assert calls == {"vision": 1, "qformer": 1}


def test_lengths_count_like_blips(tiny_captioner):
    """`max_length` counts the language model's own sequence, BLIP-2's image tokens not: OPT's bos, prompt and
    caption; Flan-T5's decoder start and caption (its prompt goes to the encoder). With `min_length` equal, every
    caption has just the tokens left."""
    settings = replace(BEAM, min_length=BEAM.max_length)
    captioner = load_captioner(tiny_captioner, settings, "cpu", torch.float32)
    tokenizer = captioner.processor.tokenizer
    before_caption = len(tokenizer(PROMPT)["input_ids"]) if is_opt(tiny_captioner) else 1
    pixels = captioner.to_device(captioner.preprocess_all(pictures(3)))
    sequences = captioner._sequences(pixels, KEYS, settings, own_passes=True)
    caption_tokens = sequences[:, captioner.caption_start :]
    assert caption_tokens.shape[1] == settings.max_length - before_caption
    assert not (caption_tokens == tokenizer.eos_token_id).any()
    assert captioner.caption(pictures(3), KEYS) == plain_captions(tiny_captioner, pictures(3), settings, num_beams=3,
                                                                  num_return_sequences=2)


def test_a_prompt_is_honoured_and_stripped(tiny_captioner):
    images = pictures(3)
    prompted = load_captioner(tiny_captioner, BEAM, "cpu", torch.float32).caption(images, KEYS)
    assert all(not text.startswith(PROMPT) for texts in prompted for text in texts)
    bare = load_captioner(tiny_captioner, replace(BEAM, prompt=""), "cpu", torch.float32).caption(images, KEYS)
    assert bare != prompted  # the prompt conditions the captions
    # BLIP's prompts end in a space, which BERT ignores; it is dropped here too, not made a token of its own.
    spaced = load_captioner(tiny_captioner, replace(BEAM, prompt=PROMPT + " "), "cpu", torch.float32)
    assert spaced.caption(images, KEYS) == prompted
    if is_opt(tiny_captioner):
        # Without a prompt, generate() builds the input itself: image tokens and bos, as capfilt does.
        model = Blip2ForConditionalGeneration.from_pretrained(tiny_captioner).eval()
        processor = AutoProcessor.from_pretrained(tiny_captioner)
        with torch.inference_mode():
            output = model.generate(**processor(images=images, return_tensors="pt"), num_beams=3,
                                    num_return_sequences=2, max_length=BEAM.max_length + QUERIES,
                                    min_length=BEAM.min_length + QUERIES)
        texts = [text.strip() for text in processor.batch_decode(output, skip_special_tokens=True)]
        assert bare == [texts[i * 2 : i * 2 + 2] for i in range(3)]


def test_the_library_path_and_bf16(tiny_captioner):
    images = pictures(3)
    fallback = Blip2Captioner(tiny_captioner, NUCLEUS, "cpu", torch.float32)
    expected = fallback.caption(images, KEYS)
    fallback.own_passes = False  # what a release whose generate() differs from our pass gets
    assert fallback.caption(images, KEYS) == expected
    bf16 = Blip2Captioner(tiny_captioner, BEAM, "cpu", torch.bfloat16)
    assert bf16.own_passes
    assert [len(texts) for texts in bf16.caption(images, KEYS)] == [2, 2, 2]


def test_a_pass_that_differs_from_generate_is_switched_off(tiny_captioner, monkeypatch):
    """As a release whose generate() no longer matches our pass would be: here each picture gets the other's
    queries, which the probe's two pictures show; the run then goes through the library's call."""
    language_inputs = Blip2Captioner._language_inputs
    monkeypatch.setattr(Blip2Captioner, "_language_inputs",
                        lambda self, pixels: language_inputs(self, pixels.flip(0)))
    captioner = load_captioner(tiny_captioner, BEAM, "cpu", torch.float32)
    assert not captioner.own_passes
    images = pictures(3)
    assert captioner.caption(images, KEYS) == plain_captions(tiny_captioner, images, BEAM, num_beams=3,
                                                             num_return_sequences=2)


def test_both_blip2_halves_share_the_model_type(tiny_captioner, tmp_path):
    assert captioner_family(tiny_captioner) is Blip2Captioner
    retrieval = str(build_tiny_blip2(tmp_path / "retrieval", seed=3))
    assert filter_family(retrieval) is Blip2Filter


def test_a_retrieval_checkpoint_is_refused_as_a_captioner(tmp_path):
    retrieval = str(build_tiny_blip2(tmp_path / "retrieval", seed=3))
    with pytest.raises(ModelLoadError, match="lacks BLIP-2's language model weights"):
        load_captioner(retrieval, BEAM, "cpu", torch.float32)


def test_a_checkpoint_without_image_tokens_is_refused(tmp_path):
    """transformers 5 places the query outputs at the input's image tokens only; its generate() fails without."""
    old = str(build_tiny_blip2_captioner(tmp_path / "old", language="opt", image_tokens=False))
    with pytest.raises(ModelLoadError, match="names no image token"):
        load_captioner(old, BEAM, "cpu", torch.float32)


def test_bootstrap_with_a_blip2_captioner_and_a_blip_filter(tiny_captioner, tiny_models, tmp_path):
    items = shape_items(8)
    write_webdataset_shards(tmp_path / "in", items, samples_per_shard=4)
    summary = capfilt.run(str(tmp_path / "in"), str(tmp_path / "out"), "bootstrap", captioner=tiny_captioner,
                          filter=[tiny_models[1]], batch_size=3, device="cpu", dtype="fp32", num_captions=2,
                          num_beams=1, top_p=NUCLEUS.top_p, max_length=12, min_length=4, prompt=PROMPT, seed=5,
                          mode="annotate")
    assert summary.read == summary.written == 8
    records = {}
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    records[member.name.removesuffix(".json")] = json.loads(tar.extractfile(member).read())
    assert sorted(records) == [key for key, *_ in items]
    # The run's captions are the captioner's, each picture's from its key whatever its batch.
    settings = replace(NUCLEUS, seed=5)
    captioner = load_captioner(tiny_captioner, settings, "cpu", torch.float32)
    expected = captioner.caption([decode_image(image) for _, image, *_ in items], [key for key, *_ in items])
    for (key, *_), texts in zip(items, expected):
        written = records[key]["synthetic_captions"]
        assert {caption["text"]: caption["count"] for caption in written} == Counter(texts)
        assert all(0 <= caption["itm_score"] <= 1 and caption["captioner"] == tiny_captioner for caption in written)
