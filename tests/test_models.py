"""The captioner and filter give what plain per-image / per-pair transformers calls give."""

from __future__ import annotations

import time

import pytest
import torch

from capfilt.demo import shapes
from capfilt.demo.tiny_blip import build_tiny_pair
from capfilt.errors import ModelLoadError
from capfilt.models import DecodingSettings, load_captioner, load_filter, loading
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


@pytest.mark.parametrize("sdpa", [True, False], ids=["capfilt-decoder", "generate"])
@pytest.mark.parametrize("num_beams,num_captions,extra", [
    (3, 1, {}), (3, 2, {}), (4, 1, {"repetition_penalty": 1.3, "prompt": ""}),
])
def test_beam_captions_equal_per_image_generate(tiny_pair, images, num_beams, num_captions, extra, sdpa):
    settings = DecodingSettings(num_beams=num_beams, num_captions=num_captions, max_length=12, min_length=5, **extra)
    captioner = load_captioner(str(tiny_pair[0]), settings, "cpu", torch.float32, sdpa=sdpa)
    assert (captioner.decoder is not None) == sdpa  # capfilt's own decoding loop, or the library's generate()
    keys = [f"{i:09d}" for i in range(len(images))]
    captions = captioner.caption(images, keys)
    assert captions == [reference.beam_captions(tiny_pair[0], image, settings) for image in images]
    assert captioner.caption(images[:2], keys[:2]) + captioner.caption(images[2:], keys[2:]) == captions


def test_nucleus_sampling_is_seeded_per_sample_not_per_batch(tiny_pair, images):
    settings = DecodingSettings(num_captions=3, max_length=12, min_length=5, seed=11)
    captioner = load_captioner(str(tiny_pair[0]), settings, "cpu", torch.float32)
    keys = [f"key{i}" for i in range(len(images))]
    together = captioner.caption(images, keys)
    assert [len(c) for c in together] == [3] * len(images)
    alone = [captioner.caption([image], [key])[0] for image, key in zip(images, keys)]
    reversed_batch = captioner.caption(images[::-1], keys[::-1])[::-1]
    assert together == alone == reversed_batch
    assert all(not text.startswith("a picture of") for texts in together for text in texts)
    renamed = captioner.caption(images, [f"other{i}" for i in range(len(images))])
    assert renamed != together  # the key, not the position, seeds the caption


def test_nucleus_path_equals_generate_when_top_p_keeps_one_token(tiny_pair, images):
    """Our decoding call (image encoded once, keyed noise) is BLIP's generate: with a nucleus of one token
    sampling is greedy, and must equal `model.generate(do_sample=False)` per image."""
    settings = DecodingSettings(num_captions=2, top_p=1e-9, max_length=12, min_length=5, repetition_penalty=1.1)
    captioner = load_captioner(str(tiny_pair[0]), settings, "cpu", torch.float32)
    greedy = DecodingSettings(num_beams=1, max_length=12, min_length=5, repetition_penalty=1.1)
    captions = captioner.caption(images, [str(i) for i in range(len(images))])
    assert captions == [reference.beam_captions(tiny_pair[0], image, greedy) * 2 for image in images]


def test_nucleus_captions_are_the_same_through_generate_and_capfilt_decoder(tiny_pair, images):
    settings = DecodingSettings(num_captions=3, max_length=12, min_length=5, seed=4)
    keys = [f"key{i}" for i in range(len(images))]
    fast = load_captioner(str(tiny_pair[0]), settings, "cpu", torch.float32)
    library = load_captioner(str(tiny_pair[0]), settings, "cpu", torch.float32, sdpa=False)
    assert fast.decoder is not None and library.decoder is None
    assert fast.caption(images, keys) == library.caption(images, keys)


def test_decoder_leaves_settings_it_does_not_cover_to_generate(tiny_pair):
    from transformers import BlipForConditionalGeneration

    from capfilt.models.blip_decoding import BlipDecoder

    text_decoder = BlipForConditionalGeneration.from_pretrained(tiny_pair[0]).text_decoder
    assert BlipDecoder.covers(text_decoder)
    text_decoder.generation_config.no_repeat_ngram_size = 2  # a checkpoint asking for n-gram blocking
    assert not BlipDecoder.covers(text_decoder)


def test_keyed_gumbel_noise_samples_the_softmax():
    from capfilt.models.sampling import KeyedGumbelNoise

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -float("inf")])
    rows = 20000
    noise = KeyedGumbelNoise(list(range(rows)))
    picks = noise(torch.zeros(rows, 3, dtype=torch.long), logits.repeat(rows, 1)).argmax(dim=-1)
    frequencies = torch.bincount(picks, minlength=5).double() / rows
    assert torch.allclose(frequencies, logits.softmax(dim=0).double(), atol=0.015)
    assert frequencies[4] == 0


@pytest.mark.parametrize("sdpa", [True, False], ids=["image-keys-once", "library-attention"])
@pytest.mark.parametrize("pair_batch_size", [1, 3, 8])
def test_filter_scores_equal_per_pair_calls(tiny_pair, images, pair_batch_size, sdpa):
    captions = [
        ["a red circle on a blue background", "IMG_2031.JPG"],
        ["a small yellow triangle"],
        [],
        ["a picture of a picture of " * 20, "a green square", "a large star"],
        ["a white square on a black background"],
    ]
    filter_ = load_filter(str(tiny_pair[1]), "cpu", torch.float32, sdpa=sdpa)
    assert filter_.text_max_tokens == 35  # BLIP's ITM/ITC text length
    filter_.pair_batch_size = pair_batch_size
    scores = filter_.score(images, captions, ("itm", "itc"))
    assert [len(s) for s in scores] == [len(c) for c in captions]
    for image, texts, image_scores in zip(images, captions, scores):
        for text, score in zip(texts, image_scores):
            itm, itc = reference.pair_scores(tiny_pair[1], image, text, 35)
            assert set(score) == {"itm", "itc"}
            assert score["itm"] == pytest.approx(itm, abs=1e-5)
            assert score["itc"] == pytest.approx(itc, abs=1e-5)


def test_filter_computes_only_requested_scores(tiny_pair, images):
    filter_ = load_filter(str(tiny_pair[1]), "cpu", torch.float32)
    (score,), = filter_.score(images[:1], [["a red circle"]], ("itc",))
    assert "itm" not in score and isinstance(score["itc"], float)
    (score,), = filter_.score(images[:1], [["a red circle"]], ("itm",))
    assert "itc" not in score and isinstance(score["itm"], float)


def test_strip_prompt():
    assert strip_prompt("a picture of a red circle", "a picture of ") == "a red circle"
    assert strip_prompt("a red circle", "") == "a red circle"


def test_missing_local_model_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_filter(str(tmp_path / "nope" / "filter"), "cpu", torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="cannot load the filter"):
        load_filter(str(tmp_path / "empty"), "cpu", torch.float32)


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="Hub is unreachable.*local directory"):
        load_captioner("Salesforce/blip-image-captioning-large", DecodingSettings(), "cpu", torch.float32)
    assert time.perf_counter() - started < 5


def test_bf16_runs_and_stays_close_to_fp32(tiny_pair, images):
    captions = [["a red circle on a blue background", "IMG_2031.JPG"]] * len(images)
    exact = load_filter(str(tiny_pair[1]), "cpu", torch.float32).score(images, captions, ("itm", "itc"))
    half = load_filter(str(tiny_pair[1]), "cpu", torch.bfloat16).score(images, captions, ("itm", "itc"))
    for row_exact, row_half in zip(exact, half):
        for a, b in zip(row_exact, row_half):
            assert b["itm"] == pytest.approx(a["itm"], abs=2e-2) and b["itc"] == pytest.approx(a["itc"], abs=2e-2)
    settings = DecodingSettings(num_beams=2, max_length=10, min_length=3)
    captioner = load_captioner(str(tiny_pair[0]), settings, "cpu", torch.bfloat16)
    assert len(captioner.caption(images, [str(i) for i in range(len(images))])) == len(images)


def test_filter_scores_are_bit_identical_whatever_the_batch(tiny_pair, images):
    """Reruns with another batch size must write the same bytes, so scores may not move even by 1 ulp."""
    captions = [["a red circle on a blue background", "IMG_2031.JPG", "a large star"]] * len(images)
    filter_ = load_filter(str(tiny_pair[1]), "cpu", torch.float32)
    together = filter_.score(images, captions, ("itm", "itc"))
    alone = [filter_.score([image], [texts], ("itm", "itc"))[0] for image, texts in zip(images, captions)]
    assert together == alone


@pytest.mark.parametrize("settings", [
    DecodingSettings(num_beams=3, num_captions=2, max_length=30, min_length=5),
    DecodingSettings(num_captions=2, max_length=30, min_length=5, seed=2),
], ids=["beam", "nucleus"])
def test_images_that_finish_early_stop_computing_without_changing_captions(settings, monkeypatch):
    """The trained demo captioner writes captions of different lengths: images whose captions are final leave
    the decoding batch, and every caption stays what decoding the whole batch to the end gives."""
    import random
    from pathlib import Path

    from capfilt.models.blip_decoding import BlipDecoder

    rng = random.Random(3)
    pictures = [shapes.render(shapes.random_scene(rng), 96) for _ in range(24)]
    keys = [str(i) for i in range(len(pictures))]
    demo = Path(__file__).parent.parent / "models" / "demo" / "captioner"
    captioner = load_captioner(str(demo), settings, "cpu", torch.float32)
    retire = BlipDecoder._retire
    active_sizes: list[int] = []

    def counting_retire(self, done):
        retire(self, done)
        active_sizes.append(self.active.shape[0])

    monkeypatch.setattr(BlipDecoder, "_retire", counting_retire)
    early = captioner.caption(pictures, keys)
    assert min(active_sizes) < len(pictures)  # some images did stop early
    monkeypatch.setattr(BlipDecoder, "_retire", lambda self, done: None)
    assert early == captioner.caption(pictures, keys)
