"""Several filters in one run: BLIP's ITM and CLIP together, and two models of one family side by side under
names of their own; each image decoded once and preprocessed once per distinct preprocessing, every score
equal to the plain transformers call."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

import capfilt
from capfilt.demo.tiny_clip import build_tiny_clip
from capfilt.models import clip as clip_module
from capfilt.models.image_input import ProcessorImageInput
from tests import reference
from tests.test_pipeline import read_output


@pytest.fixture(scope="module")
def tiny_clips(tmp_path_factory) -> tuple[str, str]:
    """Two different random CLIP checkpoints with the same preprocessing."""
    root = tmp_path_factory.mktemp("tiny-clip")
    return str(build_tiny_clip(root / "a", seed=1)), str(build_tiny_clip(root / "b", seed=2))


def _plain_clip(model_dir: str, image: Image.Image, text: str) -> float:
    processor = AutoProcessor.from_pretrained(model_dir)
    model = CLIPModel.from_pretrained(model_dir).eval()
    inputs = processor(text=[text], images=[image], return_tensors="pt", padding=True, truncation=True)
    with torch.inference_mode():
        out = model(**inputs)
    return float((out.image_embeds * out.text_embeds).sum(-1)[0])


def test_blip_and_clip_in_one_run_equal_their_plain_calls(tiny_models, tiny_clips, shapes_dataset, tmp_path,
                                                          monkeypatch):
    from capfilt import stages

    decoded, preprocessed = [], []
    original_decode = stages.decode_image
    monkeypatch.setattr(stages, "decode_image", lambda data, limit: decoded.append(1) or original_decode(data, limit))
    original_preprocess = ProcessorImageInput.preprocess

    def counting(self, image):
        preprocessed.append(self.preprocessing)
        return original_preprocess(self, image)

    monkeypatch.setattr(ProcessorImageInput, "preprocess", counting)
    summary = capfilt.run(str(shapes_dataset), str(tmp_path / "out"), "filter",
                          filter=[tiny_models[1], tiny_clips[0]], keep=["itm>=0.0", "clip>=0.0"], mode="annotate",
                          batch_size=4, device="cpu", dtype="fp32")
    assert set(summary.score_quantiles) == {"itm", "clip"}
    assert len(decoded) == 20  # once per image, for both filters
    assert len(preprocessed) == 2 * 20 and len(set(preprocessed)) == 2  # 48 px BLIP, 32 px CLIP
    samples = [s for s in read_output(tmp_path / "out") if s.web_caption is not None]
    assert samples
    for sample in samples[:4]:
        image = Image.open(io.BytesIO(sample.image_bytes)).convert("RGB")
        assert set(sample.web_scores) == {"itm", "clip"}
        itm, _ = reference.pair_scores(tiny_models[1], image, sample.web_caption)
        assert sample.web_scores["itm"] == pytest.approx(itm, abs=1e-5)
        assert sample.web_scores["clip"] == pytest.approx(_plain_clip(tiny_clips[0], image, sample.web_caption), abs=1e-5)
        assert sample.web_kept == (sample.web_scores["itm"] >= 0 and sample.web_scores["clip"] >= 0)


def test_two_models_of_one_family_run_side_by_side_under_their_names(tiny_clips, shapes_dataset, tmp_path,
                                                                     monkeypatch):
    preprocessed = []
    original = clip_module.ClipFilter.preprocess

    def counting(self, image):
        preprocessed.append(self.model_id)
        return original(self, image)

    monkeypatch.setattr(clip_module.ClipFilter, "preprocess", counting)
    capfilt.run(str(shapes_dataset), str(tmp_path / "out"), "filter",
                filter=[f"clipA={tiny_clips[0]}", f"clipB={tiny_clips[1]}"], keep=["clipB>=-1"], keep_best=1,
                batch_size=4, device="cpu", dtype="fp32")
    assert len(preprocessed) == 20  # the same preprocessing: once per image for both models
    samples = read_output(tmp_path / "out")
    assert samples
    for sample in samples:
        for caption in sample.captions():
            assert set(caption.scores) == {"clipA", "clipB"}
            assert caption.scores["clipA"] != caption.scores["clipB"]
    sample = next(s for s in samples if s.web_caption is not None)
    image = Image.open(io.BytesIO(sample.image_bytes)).convert("RGB")
    assert sample.web_scores["clipB"] == pytest.approx(_plain_clip(tiny_clips[1], image, sample.web_caption), abs=1e-5)
