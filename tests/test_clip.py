"""The CLIP filter family against plain `CLIPModel(...)` calls, on a tiny random CLIP built by capfilt.demo.tiny_clip."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, BertConfig, CLIPModel, CLIPTokenizer, CLIPTokenizerFast

from capfilt.demo.tiny_clip import END, START, build_tiny_clip
from capfilt.errors import ModelLoadError
from capfilt.models.clip import ClipFilter
from tests.scoring import max_difference, pictures, values

LONG_CAPTION = " ".join(["a small red circle next to a big blue square on a white background"] * 10)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return str(build_tiny_clip(tmp_path_factory.mktemp("tiny-clip") / "clip", seed=3))


@pytest.fixture(scope="module")
def clip_filter(tiny_clip) -> ClipFilter:
    return ClipFilter(tiny_clip, "cpu", torch.float32)


@pytest.fixture(scope="module")
def plain(tiny_clip) -> tuple[CLIPModel, object]:
    """The checkpoint loaded the plain way, as its model card shows it."""
    return CLIPModel.from_pretrained(tiny_clip).eval(), AutoProcessor.from_pretrained(tiny_clip)


@torch.inference_mode()
def plain_scores(plain, images: list[Image.Image], captions: list[list[str]]) -> list[list[float]]:
    """Each image with its captions through `CLIPModel(input_ids, attention_mask, pixel_values)`: one row per pair."""
    model, processor = plain
    result = []
    for image, texts in zip(images, captions):
        if not texts:
            result.append([])
            continue
        inputs = processor(text=texts, images=[image] * len(texts), return_tensors="pt", padding=True, truncation=True)
        output = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"])
        result.append((output.image_embeds * output.text_embeds).sum(-1).tolist())
    return result


CAPTIONS = [
    ["a photo of a dog"],
    ["a red circle", "a photo of a dog", "IMG_2031.JPG with some words, and 42 digits!"],
    [],
    ["", "a cat"],
]


def test_scores_equal_the_plain_call(clip_filter, plain):
    images = pictures(len(CAPTIONS))
    scores = clip_filter.score(images, CAPTIONS, ("clip",))
    assert [len(pairs) for pairs in scores] == [1, 3, 0, 2]
    assert all(set(pair) == {"clip"} and -1.0 <= pair["clip"] <= 1.0 for pairs in scores for pair in pairs)
    difference = max_difference(values(scores, "clip"), plain_scores(plain, images, CAPTIONS))
    print(f"max |capfilt - CLIPModel(...)| = {difference:.3g}")
    assert difference <= 1e-5


def test_scores_do_not_depend_on_the_batch(clip_filter, tiny_clip):
    images = pictures(len(CAPTIONS))
    together = values(clip_filter.score(images, CAPTIONS, ("clip",)), "clip")
    alone = [values(clip_filter.score([image], [texts], ("clip",)), "clip")[0] for image, texts in zip(images, CAPTIONS)]
    assert max_difference(alone, together) <= 1e-6
    reversed_ = values(clip_filter.score(images[::-1], CAPTIONS[::-1], ("clip",)), "clip")[::-1]
    assert max_difference(reversed_, together) <= 1e-6
    one_text_a_pass = ClipFilter(tiny_clip, "cpu", torch.float32, text_batch_size=1)
    assert max_difference(values(one_text_a_pass.score(images, CAPTIONS, ("clip",)), "clip"), together) <= 1e-6


def test_each_image_and_each_distinct_text_is_encoded_once(clip_filter):
    images = pictures(3)
    captions = [["a dog", "a cat"], ["a dog", LONG_CAPTION], ["a cat"]]
    vision_rows, text_rows = [], []
    hooks = [
        clip_filter.model.vision_model.register_forward_hook(
            lambda module, args, kwargs, output: vision_rows.append(kwargs["pixel_values"].shape[0]), with_kwargs=True),
        clip_filter.model.text_model.register_forward_hook(
            lambda module, args, kwargs, output: text_rows.append(kwargs["input_ids"].shape), with_kwargs=True),
    ]
    try:
        clip_filter.score(images, captions, ("clip",))
    finally:
        for hook in hooks:
            hook.remove()
    assert vision_rows == [3]  # one vision pass for the batch
    assert [shape[0] for shape in text_rows] == [3]  # "a dog", "a cat", the long one: once each
    assert text_rows[0][1] == 77  # padded to the longest text of the pass, truncated to the model's positions


def test_a_caption_longer_than_77_tokens_is_truncated_as_the_tokenizer_does(clip_filter, plain):
    tokenizer = plain[1].tokenizer
    assert len(tokenizer(LONG_CAPTION)["input_ids"]) > 77
    assert len(clip_filter.tokenize([LONG_CAPTION])[0]) == 77
    assert clip_filter.tokenize([LONG_CAPTION]) == tokenizer([LONG_CAPTION], truncation=True)["input_ids"]
    images = pictures(2)
    captions = [[LONG_CAPTION, "a dog"], [LONG_CAPTION + " and more words"]]
    scores = values(clip_filter.score(images, captions, ("clip",)), "clip")
    assert max_difference(scores, plain_scores(plain, images, captions)) <= 1e-5
    # Both long captions agree on their first 77 tokens, so they are one text for the model.
    assert clip_filter.tokenize(captions[1]) == clip_filter.tokenize(captions[0][:1])


def test_preprocess_is_the_processors(clip_filter, plain):
    processor = plain[1]
    for image in pictures(3):
        expected = processor(images=image, return_tensors="pt").pixel_values[0]
        actual = clip_filter.preprocess(image)
        assert actual.dtype == expected.dtype and torch.equal(actual, expected)
    assert ClipFilter(clip_filter.model_id, "cpu", torch.float32).preprocessing == clip_filter.preprocessing
    assert '"crop_size"' in clip_filter.preprocessing  # the processor's settings, not just its name


def test_preprocessing_differs_with_the_processors_settings(tmp_path, clip_filter):
    other = ClipFilter(str(build_tiny_clip(tmp_path / "clip48", image_size=48)), "cpu", torch.float32)
    assert other.preprocessing != clip_filter.preprocessing
    assert other.preprocess(pictures(1)[0]).shape == (3, 48, 48)


def test_bfloat16_is_close_to_float32(tiny_clip, clip_filter):
    images = pictures(len(CAPTIONS))
    expected = values(clip_filter.score(images, CAPTIONS, ("clip",)), "clip")
    bf16 = ClipFilter(tiny_clip, "cpu", torch.bfloat16)
    assert bf16.model.dtype == torch.bfloat16
    assert max_difference(values(bf16.score(images, CAPTIONS, ("clip",)), "clip"), expected) <= 3e-2


def test_library_path_and_eager_attention_give_the_same_scores(tiny_clip, clip_filter, plain):
    images = pictures(len(CAPTIONS))
    expected = plain_scores(plain, images, CAPTIONS)
    eager = ClipFilter(tiny_clip, "cpu", torch.float32, sdpa=False)
    assert eager.model.config._attn_implementation == "eager"
    assert max_difference(values(eager.score(images, CAPTIONS, ("clip",)), "clip"), expected) <= 1e-5
    eager.own_passes = False  # the fallback a release whose passes differ from the plain call would get
    assert max_difference(values(eager.score(images, CAPTIONS, ("clip",)), "clip"), expected) <= 1e-5


def test_passes_that_differ_from_the_plain_call_are_replaced_by_it(tiny_clip, plain, monkeypatch, caplog):
    """A release whose pooling or projections our passes get wrong costs speed, never a score."""
    wrong = ClipFilter._image_features
    monkeypatch.setattr(ClipFilter, "_image_features", lambda self, pixels: -wrong(self, pixels))
    fallback = ClipFilter(tiny_clip, "cpu", torch.float32)
    assert not fallback.own_passes
    images = pictures(len(CAPTIONS))
    assert max_difference(values(fallback.score(images, CAPTIONS, ("clip",)), "clip"), plain_scores(plain, images, CAPTIONS)) <= 1e-5


def test_legacy_configs_pool_at_the_highest_token_id(tiny_clip, tmp_path):
    """OpenAI's hub configs still say eos_token_id 2: the text tower then pools at the highest id (the end token),
    which right padding must not move."""
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for file in Path(tiny_clip).iterdir():
        (legacy / file.name).write_bytes(file.read_bytes())
    config = json.loads((legacy / "config.json").read_text())
    config["text_config"].update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    (legacy / "config.json").write_text(json.dumps(config))
    legacy_filter = ClipFilter(str(legacy), "cpu", torch.float32)
    assert legacy_filter.model.text_model.eos_token_id == 2 and legacy_filter.own_passes
    plain_legacy = CLIPModel.from_pretrained(legacy).eval(), AutoProcessor.from_pretrained(legacy)
    images = pictures(len(CAPTIONS))
    together = values(legacy_filter.score(images, CAPTIONS, ("clip",)), "clip")
    alone = [values(legacy_filter.score([image], [texts], ("clip",)), "clip")[0] for image, texts in zip(images, CAPTIONS)]
    assert max_difference(together, plain_scores(plain_legacy, images, CAPTIONS)) <= 1e-5
    assert max_difference(alone, together) <= 1e-6


def test_the_family_is_registered(tiny_clip):
    from capfilt.models import filter_family
    from capfilt.models.registry import FILTERS

    assert FILTERS["clip"] is ClipFilter
    assert filter_family(tiny_clip) is ClipFilter
    assert ClipFilter.default_scores == ("clip",) and ClipFilter.default_keep == ("clip>=0.28",)
    assert [score.name for score in ClipFilter.scores] == ["clip"]


def test_non_clip_checkpoints_are_refused_in_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    for directory, words in ((empty, "no config.json"), (bert, "'bert' model")):
        with pytest.raises(ModelLoadError) as error:
            ClipFilter(str(directory), "cpu", torch.float32)
        message = str(error.value)
        assert words in message and "\n" not in message


# Reading vocab.json and merges.txt by path goes through tokenizers' deprecated BPE(files) on transformers 5.0.
@pytest.mark.filterwarnings("ignore:Deprecated in 0.9.0:DeprecationWarning")
def test_the_tiny_tokenizer_is_a_real_clip_tokenizer(tiny_clip):
    directory = Path(tiny_clip)
    from_files = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    saved, fast = CLIPTokenizer.from_pretrained(directory), CLIPTokenizerFast.from_pretrained(directory)
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    start, end = vocab[START], vocab[END]
    assert end == len(vocab) - 1  # <|endoftext|> has the highest id, as in OpenAI's vocabulary
    rng = np.random.default_rng(1)
    alphabet = string.ascii_lowercase + string.digits + " .,!?'-_/"
    texts = ["a photo of a dog", "the quick brown fox jumps over the lazy dog"]
    texts += ["".join(rng.choice(list(alphabet), size=60)) for _ in range(20)]
    for text in texts:
        ids = saved(text)["input_ids"]
        assert ids[0] == start and ids[-1] == end and end not in ids[1:-1]  # no unknown token (CLIP's unk is END)
        assert from_files(text)["input_ids"] == ids == fast(text)["input_ids"]
        assert saved.decode(ids, skip_special_tokens=True).replace(" ", "") == text.replace(" ", "")
    assert saved.model_max_length == 77
    assert len(saved("a dog")["input_ids"]) == 4  # words of the vocabulary are single tokens
