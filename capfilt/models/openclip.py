"""open_clip filter: the cosine of open_clip's own `encode_image` and `encode_text` embeddings, for any open_clip
model (OpenAI, LAION and DataComp CLIPs, SigLIP and CoCa towers built with timm), in the optional extra
`capfilt[open_clip]`.

open_clip checkpoints carry no transformers `model_type`, so the family is named with a prefix:
- `open_clip:ARCH/TAG`: a built-in architecture and one of its pretrained tags (`open_clip.list_pretrained()`),
  e.g. `open_clip:ViT-L-14/datacomp_xl_s13b_b90k` (DataComp-1B's filter);
- `open_clip:ARCH/PATH`: that architecture with the weights in a local checkpoint file;
- `open_clip:hf-hub:ORG/NAME`, `open_clip:local-dir:PATH` or `open_clip:PATH` (a folder holding
  `open_clip_config.json` and weights, as `open_clip.push_to_hf_hub` writes them).

Everything model-specific (weights, preprocessing, tokenizer) comes from `open_clip.create_model_from_pretrained`
and `open_clip.get_tokenizer`. capfilt shares work the way the plain per-pair call cannot: each image of a
batch is encoded once for all its captions, each distinct text once, in text passes of `text_batch_size`. The
score equals `encode_image(...) @ encode_text(...).T` of L2-normalised embeddings, tested to 1e-5 in fp32.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from capfilt.errors import ModelLoadError
from capfilt.models.base import Filter, Pairs, longer_than, no_scores, per_image
from capfilt.models.loading import first_line, offline_unless_hub_reachable
from capfilt.models.registry import register_filter
from capfilt.scores import Score

PREFIX = "open_clip:"
# open_clip's names for the model's precision: weights in half precision with LayerNorm kept in float32, as
# OpenAI's CLIP runs.
PRECISIONS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def open_clip_source(model_id: str) -> tuple[str, str | None]:
    """`open_clip:...` → (model_name, pretrained) for `open_clip.create_model_from_pretrained`."""
    spec = model_id.removeprefix(PREFIX)
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    if Path(spec).expanduser().is_dir():
        return f"local-dir:{Path(spec).expanduser()}", None
    architecture, _, pretrained = spec.partition("/")
    if not pretrained:
        raise ModelLoadError(
            f"the filter {model_id} names no weights: write open_clip:{architecture}/TAG (a pretrained tag such "
            f"as open_clip:ViT-L-14/datacomp_xl_s13b_b90k), open_clip:{architecture}/PATH (a checkpoint file), "
            f"open_clip:hf-hub:ORG/NAME or open_clip:DIRECTORY"
        )
    return architecture, pretrained


def check_known(open_clip: Any, model_id: str, model_name: str, pretrained: str | None) -> None:
    """A built-in architecture and, unless a file, one of its tags: checked before anything is fetched."""
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    if model_name not in open_clip.list_models():
        raise ModelLoadError(f"the filter {model_id} names no open_clip architecture '{model_name}' (see "
                             f"open_clip.list_models(): ViT-B-32, ViT-L-14, ViT-SO400M-14-SigLIP, ...)")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags and not Path(pretrained or "").expanduser().is_file():
        raise ModelLoadError(f"the filter {model_id} names neither a checkpoint file nor a pretrained tag of "
                             f"{model_name}; its tags: {', '.join(tags) or 'none'}")


def import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as error:
        raise ModelLoadError(
            f"open_clip filters need the open_clip extra: pip install 'capfilt[open_clip]' ({first_line(error)})"
        ) from error
    return open_clip


@register_filter("open_clip")
class OpenClipFilter(Filter):
    """CLIP's image-text cosine (`clip`, as the transformers CLIP family names it, so that a rule such as LAION's
    `clip>=0.28` reads the same with either), in [-1, 1]."""

    scores = (Score("clip", -1.0, 1.0, "CLIP cosine of open_clip's image and text embeddings"),)
    default_scores = ("clip",)
    # LAION-400M's threshold (for ViT-B/32); DataComp keeps a top fraction instead (the `datacomp` preset).
    default_keep = ("clip>=0.28",)

    def __init__(
        self,
        model_id: str,
        device: str,
        dtype: torch.dtype,
        sdpa: bool = True,  # open_clip chooses its own attention
        text_batch_size: int | None = None,
    ) -> None:
        open_clip = import_open_clip()
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        self.text_batch_size = text_batch_size or (64 if self.device.type == "cpu" else 256)
        model_name, pretrained = open_clip_source(model_id)
        check_known(open_clip, model_id, model_name, pretrained)
        local = model_name.startswith("local-dir:") or Path(pretrained or "").expanduser().is_file()
        with contextlib.nullcontext(True) if local else offline_unless_hub_reachable() as hub:
            try:
                # Raises when no weights load: a filter with random weights would score nothing.
                model, self.transform = open_clip.create_model_from_pretrained(
                    model_name, pretrained=pretrained, precision=PRECISIONS[dtype], device=self.device
                )
                self.tokenizer = open_clip.get_tokenizer(model_name)
            except (OSError, RuntimeError, ValueError, KeyError) as error:
                offline = "" if hub else ("the Hugging Face Hub is unreachable and the weights are not in the local "
                                          "cache; download them where there is a network, or pass a local folder: ")
                raise ModelLoadError(f"cannot load the filter {model_id}: {offline}{first_line(error)}") from error
        self.model = model.eval()
        self.preprocess_settings = json.dumps(open_clip.get_model_preprocess_cfg(self.model), sort_keys=True)

    @property
    def preprocessing(self) -> str:
        return f"open_clip:{self.preprocess_settings}"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    @torch.inference_mode()
    def score_pixels(
        self, pixels: torch.Tensor, captions: list[list[str]], names: Collection[str]
    ) -> list[list[dict[str, float]]]:
        name = self.scores[0].name
        if not any(captions) or name not in names:
            return no_scores(captions)
        pairs = Pairs.of(captions, self.device)
        image_features = self.image_features(pixels)
        text_features = torch.cat([self.text_features(pairs.texts[start : start + self.text_batch_size])
                                   for start in range(0, len(pairs.texts), self.text_batch_size)])
        values = (image_features[pairs.image] * text_features[pairs.text]).sum(dim=-1).tolist()
        return per_image([{name: value} for value in values], captions)

    def truncated(self, texts: list[str]) -> list[bool]:
        """Texts longer than the text tower's context (77 tokens for CLIPs), which the tokenizer cuts."""
        limit = self.tokenizer.context_length
        wrapped = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
        if wrapped is not None:
            return longer_than(wrapped, texts, limit)
        return [len(self.tokenizer.encode(text)) + 2 > limit for text in texts]  # CLIP's BPE: + start and end

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised `encode_image` embeddings in float32: one vision pass for the batch."""
        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised `encode_text` embeddings in float32 of texts tokenized (and truncated) by the model's
        own tokenizer."""
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)
