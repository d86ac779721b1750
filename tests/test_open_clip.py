"""The open_clip filter family against open_clip's own `encode_image` / `encode_text`, on a tiny random open_clip
model in open_clip's own folder format (capfilt.demo.tiny_open_clip). open_clip needs torchvision, so these run
where `capfilt[open_clip]` is installed (`.ci/run`'s third environment); the family's naming errors run everywhere.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image

from capfilt.errors import ModelLoadError
from capfilt.models import filter_family, load_filter
from capfilt.models.openclip import OpenClipFilter
from tests.scoring import bootstrap_with_filter, max_difference, pictures, values

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None and importlib.util.find_spec("torchvision") is not None
needs_open_clip = pytest.mark.skipif(not HAS_OPEN_CLIP, reason="open_clip is not installed (pip install 'capfilt[open_clip]')")

LONG_CAPTION = " ".join(["a small red circle next to a big blue square on a white background"] * 8)  # > 77 tokens
CAPTIONS = [["a red circle", "IMG_2031.JPG", LONG_CAPTION], [], ["a blue square", "a red circle"], [LONG_CAPTION]]


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> str:
    if not HAS_OPEN_CLIP:
        pytest.skip("open_clip is not installed (pip install 'capfilt[open_clip]')")
    from capfilt.demo.tiny_open_clip import build_tiny_open_clip

    return str(build_tiny_open_clip(tmp_path_factory.mktemp("tiny-open-clip") / "open_clip", seed=3))


@torch.inference_mode()
def plain_scores(folder: str, images: list[Image.Image], captions: list[list[str]]) -> list[list[float]]:
    """As open_clip's README scores a pair: its own model, transform and tokenizer, normalised embeddings."""
    import open_clip

    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model.eval()
    result = []
    for image, texts in zip(images, captions):
        if not texts:
            result.append([])
            continue
        image_features = model.encode_image(preprocess(image)[None], normalize=True)
        text_features = model.encode_text(tokenizer(texts), normalize=True)
        result.append((image_features @ text_features.T)[0].tolist())
    return result


@needs_open_clip
def test_open_clip_scores_equal_encode_image_and_encode_text(tiny_open_clip):
    model = load_filter(f"open_clip:{tiny_open_clip}", "cpu", torch.float32)
    assert isinstance(model, OpenClipFilter)
    images = pictures(len(CAPTIONS))
    ours = values(model.score(images, CAPTIONS, ("clip",)), "clip")
    theirs = plain_scores(tiny_open_clip, images, CAPTIONS)
    assert [len(row) for row in ours] == [len(row) for row in CAPTIONS]
    assert max_difference(ours, theirs) <= 1e-5
    flat = [value for row in ours for value in row]
    assert max(flat) - min(flat) > 0.05  # random weights still tell the pairs apart


@needs_open_clip
def test_text_passes_and_bf16(tiny_open_clip):
    images = pictures(len(CAPTIONS))
    theirs = plain_scores(tiny_open_clip, images, CAPTIONS)
    # One distinct text per pass: texts split across passes still land on their pairs.
    small_passes = OpenClipFilter(f"open_clip:{tiny_open_clip}", "cpu", torch.float32, text_batch_size=1)
    assert max_difference(values(small_passes.score(images, CAPTIONS, ("clip",)), "clip"), theirs) <= 1e-5
    bf16 = OpenClipFilter(f"open_clip:{tiny_open_clip}", "cpu", torch.bfloat16)
    assert max_difference(values(bf16.score(images, CAPTIONS, ("clip",)), "clip"), theirs) <= 3e-2


@needs_open_clip
def test_an_architecture_with_a_checkpoint_file_and_the_local_dir_schema(tiny_open_clip):
    """`open_clip:ARCH/FILE` (a registered architecture and its weights) and `open_clip:local-dir:FOLDER` load
    the same model as `open_clip:FOLDER`."""
    from capfilt.demo.tiny_open_clip import ARCHITECTURE

    images, captions = pictures(2), [["a red circle"], ["a blue square", "IMG_2031.JPG"]]
    expected = values(load_filter(f"open_clip:{tiny_open_clip}", "cpu", torch.float32).score(images, captions, ["clip"]), "clip")
    for model_id in (f"open_clip:{ARCHITECTURE}/{tiny_open_clip}/open_clip_model.safetensors",
                     f"open_clip:local-dir:{tiny_open_clip}"):
        got = values(load_filter(model_id, "cpu", torch.float32).score(images, captions, ["clip"]), "clip")
        assert max_difference(got, expected) <= 1e-6, model_id


@needs_open_clip
def test_unusable_names_fail_in_one_line():
    for model_id, message in [
        ("open_clip:ViT-L-14", "names no weights"),
        ("open_clip:NoSuchNet/openai", "names no open_clip architecture"),
        ("open_clip:ViT-B-32/no_such_tag", "its tags: openai"),
    ]:
        with pytest.raises(ModelLoadError, match=message) as error:
            load_filter(model_id, "cpu", torch.float32)
        assert "\n" not in str(error.value)


def test_the_family_is_chosen_by_its_prefix_and_unknown_families_are_listed():
    # No model file is read to choose a family by its prefix, so this holds without open_clip.
    assert filter_family("open_clip:ViT-L-14/datacomp_xl_s13b_b90k") is OpenClipFilter
    assert [score.name for score in OpenClipFilter.scores] == ["clip"]
    with pytest.raises(ModelLoadError, match=r"names the family 'openclip'; capfilt supports: .*open_clip"):
        filter_family("openclip:ViT-L-14/openai")


@pytest.mark.skipif(HAS_OPEN_CLIP, reason="open_clip is installed")
def test_without_the_extra_the_error_says_how_to_install_it():
    with pytest.raises(ModelLoadError, match=r"pip install 'capfilt\[open_clip\]'"):
        load_filter("open_clip:ViT-B-32/openai", "cpu", torch.float32)


@needs_open_clip
def test_bootstrap_with_a_blip_captioner_and_an_open_clip_filter(tiny_models, tiny_open_clip, tmp_path):
    summary, run, records = bootstrap_with_filter(tiny_models[0], f"open_clip:{tiny_open_clip}", tmp_path)
    assert summary.read == summary.written == 8
    assert run["keep"] == ["clip>=0.28"] and set(run["scores"]) == {"clip"}
    assert all(-1 <= caption["clip_score"] <= 1 for record in records for caption in record["synthetic_captions"])
    assert any(record.get("web_clip_score") is not None for record in records)
