"""Plain transformers calls, one image or one pair at a time: what capfilt's outputs must equal."""

from __future__ import annotations

import functools

import torch
from PIL import Image
from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval

from capfilt.models import DecodingSettings


@functools.cache
def captioner(model_dir: str) -> tuple:
    return AutoProcessor.from_pretrained(model_dir), BlipForConditionalGeneration.from_pretrained(model_dir).eval()


@functools.cache
def filter_model(model_dir: str) -> tuple:
    return AutoProcessor.from_pretrained(model_dir), BlipForImageTextRetrieval.from_pretrained(model_dir).eval()


def beam_captions(model_dir: str, image: Image.Image, settings: DecodingSettings) -> list[str]:
    """`processor` + `model.generate` on one image, prompt stripped as BLIP does."""
    processor, model = captioner(str(model_dir))
    inputs = processor(images=image, text=settings.prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            num_beams=settings.num_beams,
            num_return_sequences=settings.num_captions,
            max_length=settings.max_length,
            min_length=settings.min_length,
            repetition_penalty=settings.effective_repetition_penalty,
        )
    texts = processor.batch_decode(out, skip_special_tokens=True)
    return [t[len(settings.prompt.strip()) :].strip() for t in texts]


def pair_scores(model_dir: str, image: Image.Image, text: str, max_tokens: int = 35) -> tuple[float, float]:
    """ITM match probability and ITC cosine of one pair, from the model's own forward."""
    processor, model = filter_model(str(model_dir))
    inputs = processor(images=image, text=text, truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.no_grad():
        itm = model(**inputs, use_itm_head=True).itm_score.softmax(dim=-1)[0, 1].item()
        itc = model(**inputs, use_itm_head=False).itm_score[0, 0].item()
    return itm, itc
