"""The image-text-to-text captioner families against plain `model.generate(**processor(images=..., text=...,
padding=True))` calls, on tiny random checkpoints built by capfilt.demo.tiny_vlm and tiny_vlms: SmolVLM
(Idefics3), PaliGemma, Florence-2, Qwen2-VL and Qwen2.5-VL. The Qwen ones need torchvision (their processor
holds a video processor) and are skipped without it; CI runs them in a venv with torchvision."""

from __future__ import annotations

import importlib.util
import json
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LogitsProcessorList,
    TopPLogitsWarper,
)

import capfilt
from capfilt.decode import decode_image
from capfilt.demo.tiny_vlm import build_tiny_idefics3
from capfilt.demo.tiny_vlms import build_tiny_florence2, build_tiny_paligemma, build_tiny_qwen2_vl
from capfilt.errors import ModelLoadError
from capfilt.models import captioner_family, load_captioner, load_filter
from capfilt.models.base import DecodingSettings
from capfilt.models.sampling import sample_seed
from capfilt.models.vlm import (
    DEFAULT_INSTRUCTION,
    Florence2Captioner,
    NewTokenNoise,
    PaliGemmaCaptioner,
    QwenVlCaptioner,
    VlmCaptioner,
)
from tests.conftest import shape_items
from tests.datasets import write_webdataset_shards


@dataclass(frozen=True)
class Family:
    model_type: str
    build: Callable[[Path, int], Path]
    captioner: type[VlmCaptioner]
    prompt: str  # the instruction the tests ask with
    default_prompt: str  # what BLIP's default prompt becomes
    fitted_sizes: tuple[tuple[int, int], ...]  # the pictures' (width, height) on the canvas
    # Whether every picture is resized to one size (else a picture is kept, shrunk only if larger than the canvas).
    fixed_size: bool = False
    needs_torchvision: bool = False
    # Whether the processor takes a list of pictures per text, as SmolVLM's model card passes them.
    nested_images: bool = False

    @property
    def decoder_only(self) -> bool:
        return self.model_type != "florence2"

    def text(self, processor, prompt: str) -> str:
        """The processor's text as the family's model card writes it."""
        if self.model_type == "paligemma":
            return "<image>" + prompt
        if self.model_type == "florence2":
            return prompt
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)

    def __str__(self) -> str:
        return self.model_type


INSTRUCTION = "Describe this image in one sentence."
# Fitted into SmolVLM's 56-pixel longest side, and into Qwen's 56-pixel square of max_pixels 56 * 56.
KEPT_SIZES = ((30, 40), (56, 14), (56, 56))
FAMILIES = [
    Family("idefics3", build_tiny_idefics3, VlmCaptioner, INSTRUCTION, DEFAULT_INSTRUCTION, KEPT_SIZES,
           nested_images=True),
    Family("paligemma", build_tiny_paligemma, PaliGemmaCaptioner, "caption en", "caption en", ((28, 28),) * 3,
           fixed_size=True),
    Family("florence2", build_tiny_florence2, Florence2Captioner, "<CAPTION>", "<CAPTION>", ((64, 64),) * 3,
           fixed_size=True),
    Family("qwen2_vl", lambda path, seed: build_tiny_qwen2_vl(path, seed, version="qwen2_vl"), QwenVlCaptioner,
           INSTRUCTION, INSTRUCTION, KEPT_SIZES, needs_torchvision=True),
    Family("qwen2_5_vl", lambda path, seed: build_tiny_qwen2_vl(path, seed, version="qwen2_5_vl"),
           QwenVlCaptioner, INSTRUCTION, INSTRUCTION, KEPT_SIZES, needs_torchvision=True),
]
KEYS = ["key0", "key1", "key2"]


@pytest.fixture(scope="module", params=FAMILIES, ids=str)
def family(request, tmp_path_factory) -> tuple[Family, str]:
    spec: Family = request.param
    if spec.needs_torchvision:
        pytest.importorskip("torchvision", reason=f"{spec.model_type}'s processor holds a video processor, which "
                                                  "needs torchvision")
    return spec, str(spec.build(tmp_path_factory.mktemp(f"tiny-{spec.model_type}"), 3))


def beam(spec: Family) -> DecodingSettings:
    return DecodingSettings(num_beams=3, num_captions=2, max_length=8, min_length=3, prompt=spec.prompt)


def nucleus(spec: Family) -> DecodingSettings:
    return DecodingSettings(num_captions=2, max_length=8, min_length=3, prompt=spec.prompt, seed=11)


def pictures() -> list[Image.Image]:
    """Three pictures of different shapes (one larger than every canvas)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            for height, width in [(40, 30), (30, 120), (100, 100)]]


def plain_generate(spec: Family, model_id: str, images: list[Image.Image], settings: DecodingSettings,
                   rows: int = 1, noise_seeds: list[int] | None = None, **generate: object):
    """generate() on the processor's batch (each picture `rows` times, a flat list of pictures as the model cards
    pass them), left-padded; with `noise_seeds`, greedy over top-p-filtered logits plus that keyed noise counted
    from the first new token. Returns the processor, the inputs and generate()'s sequences."""
    processor = AutoProcessor.from_pretrained(model_id)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(model_id).eval()
    repeated = [[image] if spec.nested_images else image for image in images for _ in range(rows)]
    text = spec.text(processor, settings.prompt)
    inputs = processor(images=repeated, text=[text] * len(repeated), padding=True, return_tensors="pt")
    if noise_seeds is not None:
        prefix = inputs["input_ids"].shape[1] if spec.decoder_only else 1  # after the decoder's start token
        noise = NewTokenNoise(noise_seeds, prefix)
        generate["logits_processor"] = LogitsProcessorList([TopPLogitsWarper(settings.top_p), noise])
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=settings.max_length, min_new_tokens=settings.min_length,
                             repetition_penalty=settings.effective_repetition_penalty, **generate)
    return processor, inputs, out


def plain_captions(spec: Family, model_id: str, images: list[Image.Image], settings: DecodingSettings,
                   **kwargs: object) -> list[list[str]]:
    """`plain_generate`'s new tokens decoded without special tokens, stripped, grouped per picture (an
    encoder-decoder's output is all new tokens)."""
    processor, inputs, out = plain_generate(spec, model_id, images, settings, **kwargs)
    new = out[:, inputs["input_ids"].shape[1] :] if spec.decoder_only else out
    texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    n = settings.num_captions
    return [[t.strip() for t in texts[i * n : (i + 1) * n]] for i in range(len(images))]


def fitted(captioner: VlmCaptioner, images: list[Image.Image]) -> list[Image.Image]:
    """The pictures as the captioner sees them: through its preprocessing and back."""
    return captioner.pictures(captioner.preprocess_all(images))


def read_records(directory) -> dict[str, dict]:
    records = {}
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    records[member.name.removesuffix(".json")] = json.loads(tar.extractfile(member).read())
    return records


def test_the_family_is_chosen_by_model_type(family):
    spec, model_id = family
    assert AutoConfig.from_pretrained(model_id).model_type == spec.model_type
    assert captioner_family(model_id) is spec.captioner


def test_qwen_is_registered_and_without_torchvision_refused_in_one_line(tmp_path):
    """Runs in either venv: the family is chosen from the config alone; loading needs torchvision."""
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    assert captioner_family(str(tmp_path)) is QwenVlCaptioner
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ModelLoadError, match="needs torchvision"):
            load_captioner(str(tmp_path), DecodingSettings(), "cpu", torch.float32)


def test_pictures_come_back_whole_from_the_canvas(family):
    spec, model_id = family
    captioner = load_captioner(model_id, beam(spec), "cpu", torch.float32)
    images = pictures()
    back = fitted(captioner, images)
    assert tuple(image.size for image in back) == spec.fitted_sizes
    if not spec.fixed_size:  # a small picture is kept as decoded
        assert np.array_equal(np.asarray(back[0]), np.asarray(images[0]))
        # A batch is only as large as its largest picture, not the family's canvas (Qwen's default: 3584 square).
        assert captioner.preprocess_all(images[:1]).shape == (1, 4, 40, 30)


def test_the_batch_is_left_padded_where_rows_differ(family):
    """SmolVLM's and Qwen's pictures of different shapes give different numbers of image tokens, so the batch is
    padded, on the left; PaliGemma's and Florence-2's give one number (a fixed size), so with one prompt no row
    is."""
    spec, model_id = family
    captioner = load_captioner(model_id, beam(spec), "cpu", torch.float32)
    mask = captioner.inputs(fitted(captioner, pictures()))["attention_mask"]
    if not spec.fixed_size:
        assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()
    else:
        assert (mask == 1).all()


def test_beam_captions_equal_generate(family):
    spec, model_id = family
    settings = beam(spec)
    captioner = load_captioner(model_id, settings, "cpu", torch.float32)
    images = fitted(captioner, pictures())
    captions = captioner.caption(images, KEYS)
    assert [len(texts) for texts in captions] == [2, 2, 2]
    assert len({text for texts in captions for text in texts}) > 1  # the tiny model says different things
    assert captions == plain_captions(spec, model_id, images, settings, num_beams=3, num_return_sequences=2,
                                      do_sample=False)


def test_nucleus_sampling_is_keyed_and_equals_generate_with_the_same_noise(family):
    spec, model_id = family
    settings = nucleus(spec)
    captioner = load_captioner(model_id, settings, "cpu", torch.float32)
    generation = captioner.model.generation_config
    assert generation.temperature in (None, 1.0) and not generation.top_k  # the warpers: top-p alone
    images = fitted(captioner, pictures())
    together = captioner.caption(images, KEYS)
    alone = [captioner.caption([image], [key])[0] for image, key in zip(images, KEYS)]
    reversed_batch = captioner.caption(images[::-1], KEYS[::-1])[::-1]
    assert together == alone == reversed_batch
    assert captioner.caption(images, ["other0", "other1", "other2"]) != together  # the key seeds them
    seeds = [sample_seed(settings.seed, key, j) for key in KEYS for j in range(settings.num_captions)]
    assert together == plain_captions(spec, model_id, images, settings, rows=2, noise_seeds=seeds, do_sample=False)


def test_a_fixed_size_family_captions_the_decoded_picture_itself(family):
    """PaliGemma and Florence-2 resize every picture to one size; the canvas makes that resize as their PIL
    image processor does, so the caption is generate() on the picture as decoded, of any size."""
    spec, model_id = family
    if not spec.fixed_size:
        pytest.skip("the canvas keeps the picture (shrunk only if larger than the canvas)")
    settings = beam(spec)
    captioner = load_captioner(model_id, settings, "cpu", torch.float32)
    if not type(captioner.processor.image_processor).__name__.endswith("Pil"):
        pytest.skip("torchvision's resize is not PIL's: the caption equals generate() on the fitted picture")
    images = pictures()
    assert captioner.caption(images, KEYS) == plain_captions(spec, model_id, images, settings, num_beams=3,
                                                             num_return_sequences=2, do_sample=False)


def test_florence2_captions_are_what_its_post_processing_returns(family):
    spec, model_id = family
    if spec.model_type != "florence2":
        pytest.skip("Florence-2 alone has a post_process_generation")
    settings = beam(spec)
    captioner = load_captioner(model_id, settings, "cpu", torch.float32)
    images = fitted(captioner, pictures())
    processor, _, out = plain_generate(spec, model_id, images, settings, num_beams=3, num_return_sequences=2,
                                       do_sample=False)
    # post_process_generation's own usage: decoded with special tokens (a batch's shorter rows end in <pad>)
    raw = [text.replace(processor.tokenizer.pad_token, "") for text in processor.batch_decode(out)]
    parsed = [processor.post_process_generation(text, task=spec.prompt, image_size=(64, 64))[spec.prompt]
              for text in raw]
    assert [text for texts in captioner.caption(images, KEYS) for text in texts] == parsed
    with pytest.raises(ValueError, match="does not answer text"):
        load_captioner(model_id, replace(settings, prompt="<OD>"), "cpu", torch.float32)


def test_blips_default_prompt_becomes_the_familys_instruction(family):
    spec, model_id = family
    captioner = load_captioner(model_id, replace(beam(spec), prompt=DecodingSettings.prompt), "cpu", torch.float32)
    assert captioner.settings.prompt == spec.default_prompt  # and the record beside each caption says so
    assert captioner.text == spec.text(captioner.processor, spec.default_prompt)


def test_bootstrap_with_the_family_as_captioner_and_a_blip_filter(family, tiny_models, tmp_path):
    spec, model_id = family
    items = shape_items(5)
    write_webdataset_shards(tmp_path / "in", items, samples_per_shard=3)
    settings = replace(nucleus(spec), seed=5)
    summary = capfilt.run(str(tmp_path / "in"), str(tmp_path / "out"), "bootstrap", captioner=model_id,
                          filter=[tiny_models[1]], batch_size=4, device="cpu", dtype="fp32", num_captions=2,
                          num_beams=1, top_p=settings.top_p, max_length=8, min_length=3, prompt=spec.prompt,
                          seed=5, mode="annotate")
    assert summary.read == summary.written == 5
    records = read_records(tmp_path / "out")
    assert sorted(records) == [key for key, *_ in items]
    captioner = load_captioner(model_id, settings, "cpu", torch.float32)
    expected = captioner.caption([decode_image(image) for _, image, *_ in items], [key for key, *_ in items])
    for (key, *_), texts in zip(items, expected):
        written = records[key]["synthetic_captions"]
        assert {caption["text"]: caption["count"] for caption in written} == Counter(texts)
        assert all(0 <= caption["itm_score"] <= 1 and caption["decoding"]["prompt"] == spec.prompt
                   for caption in written)


def test_a_long_caption_is_kept_whole_and_truncated_only_for_scoring(family, tiny_models, tmp_path):
    """400 new tokens, past BLIP's 35-token text limit: the output keeps the caption as written; the BLIP filter
    scores what its tokenizer keeps of it. One family is enough: the VLM side is shared."""
    spec, model_id = family
    if spec.model_type != "idefics3":
        pytest.skip("shown on SmolVLM")
    items = shape_items(2)
    write_webdataset_shards(tmp_path / "in", items)
    summary = capfilt.run(str(tmp_path / "in"), str(tmp_path / "out"), "bootstrap", captioner=model_id,
                          filter=[tiny_models[1]], batch_size=2, device="cpu", dtype="fp32", num_beams=2,
                          max_length=400, min_length=400, prompt=spec.prompt, mode="annotate")
    records = read_records(tmp_path / "out")
    settings = DecodingSettings(num_beams=2, max_length=400, min_length=400, prompt=spec.prompt)
    captioner = load_captioner(model_id, settings, "cpu", torch.float32)
    blip = load_filter(tiny_models[1], "cpu", torch.float32)
    for key, image, *_ in items:
        [[caption]] = captioner.caption([decode_image(image)], [key])
        [written] = records[key]["synthetic_captions"]
        assert written["text"] == caption  # whole
        full = blip.processor.tokenizer(caption)["input_ids"]
        assert len(full) > blip.text_max_tokens == len(blip.tokenize([caption])[0]) == 35
        [[scores]] = blip.score([decode_image(image)], [[caption]], ["itm"])
        assert written["itm_score"] == pytest.approx(scores["itm"], abs=1e-5)
    assert summary.captions_truncated == {"itm": 2}  # and the run says so
