"""CLIP filter: the cosine of CLIP's projected image and text embeddings, for any transformers `CLIPModel`
checkpoint (openai/clip-vit-base-patch32, openai/clip-vit-large-patch14, laion/CLIP-ViT-H-14-laion2B-s32B-b79K,
a local directory) with its own processor.

The score equals `(image_embeds * text_embeds).sum(-1)` of the plain `CLIPModel(input_ids=..., attention_mask=...,
pixel_values=...)` call, tested to 1e-5 in fp32. Work is shared where the plain call cannot share it: each image
of a batch is encoded once for all its captions (one vision pass per batch), and each distinct text of the batch
once, in text passes grouped by length. Only public, long-standing pieces of the model are used
(`vision_model(...).pooler_output`, `visual_projection`, `text_model(...).pooler_output`, `text_projection`):
`get_image_features`' return type changed between transformers 5.x releases. When a model loads, these passes
are checked against the plain call on a probe; a release where they differ gets the plain call instead.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoProcessor, CLIPModel

from capfilt.errors import ModelLoadError
from capfilt.models.base import Filter
from capfilt.models.fast_paths import checked, close
from capfilt.models.image_input import ProcessorImageInput
from capfilt.models.loading import load_pretrained
from capfilt.models.registry import register_filter
from capfilt.scores import Score

# Captions of the load-time probe: one short, one past CLIP's 77 tokens (it must be truncated as the tokenizer does).
PROBE_CAPTIONS = [
    "a dog",
    " ".join(["a red circle and a small blue square on a grey background next to a green star"] * 8),
]


@register_filter("clip")
class ClipFilter(ProcessorImageInput, Filter):
    """CLIP's image-text cosine (`clip`), in [-1, 1]; LAION-400M kept pairs at 0.28 and above (ViT-B/32)."""

    role = "filter"
    scores = (Score("clip", -1.0, 1.0, "CLIP cosine of the projected image and text embeddings"),)
    default_scores = ("clip",)
    default_keep = ("clip>=0.28",)  # LAION-400M's threshold (for ViT-B/32)

    def __init__(
        self,
        model_id: str,
        device: str,
        dtype: torch.dtype,
        sdpa: bool = True,
        text_batch_size: int | None = None,
    ) -> None:
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        # Distinct texts per text pass: a batch's texts are sorted by token count and cut into passes of this many.
        self.text_batch_size = text_batch_size or (64 if self.device.type == "cpu" else 256)
        config = load_pretrained(AutoConfig, model_id, self.role)
        if config.model_type != "clip":
            raise ModelLoadError(f"the {self.role} {model_id} is a '{config.model_type}' model, not a CLIP one "
                                 f"(model_type 'clip', loaded as CLIPModel)")
        self.processor = load_pretrained(AutoProcessor, model_id, self.role)
        if getattr(self.processor, "image_processor", None) is None or getattr(self.processor, "tokenizer", None) is None:
            raise ModelLoadError(f"the {self.role} {model_id} has no image processor and tokenizer "
                                 f"(preprocessor_config.json or processor_config.json, tokenizer files)")
        # The library's default attention (SDPA for CLIP) is the plain call's; --eager-attention asks for its
        # matmul-softmax attention instead.
        attention = {} if sdpa else {"attn_implementation": "eager"}
        self.model = load_pretrained(CLIPModel, model_id, self.role, config=config, dtype=dtype, **attention)
        self.model.to(self.device).eval()
        tokenizer = self.processor.tokenizer
        # What `tokenizer(..., truncation=True)` keeps, bounded by the text tower's positions (77).
        self.text_max_tokens = min(tokenizer.model_max_length, config.text_config.max_position_embeddings)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.own_passes = True  # each image and each distinct text encoded once; else the plain call per pass
        self._check_passes()

    def _check_passes(self) -> None:
        """Our passes against the plain call on a probe: two pictures (the probe and its mirror image), one with
        both captions, one with the long one, so that a caption scored against the wrong picture shows."""
        probe = self.probe_pixels()
        images = torch.cat([probe, probe.flip(-1)])
        captions = [PROBE_CAPTIONS, PROBE_CAPTIONS[1:]]
        with torch.inference_mode():
            try:
                token_ids = self.tokenize(PROBE_CAPTIONS)
                output = self.model(**self.padded(token_ids), pixel_values=self.to_device(images))
                cosines = output.image_embeds.float() @ output.text_embeds.float().T  # (images, texts)
            except Exception as error:
                raise self.unusable(error) from error
        expected = cosines[[0, 0, 1], [0, 1, 1]]

        def check() -> None:
            scores = [pair["clip"] for pairs in self.score_pixels(images, captions, ("clip",)) for pair in pairs]
            close(torch.tensor(scores), expected, self.dtype, "scores")

        self.own_passes = checked("capfilt's own CLIP passes", self.role, self.model_id, check)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the plain call makes them: `truncation=True`, to the model's 77 positions."""
        return self.processor.tokenizer(texts, truncation=True, max_length=self.text_max_tokens)["input_ids"]

    def padded(self, token_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """`token_ids` padded on the right to the longest of them, with their attention mask, on the device."""
        length = max(len(ids) for ids in token_ids)
        input_ids = torch.tensor([ids + [self.pad_token_id] * (length - len(ids)) for ids in token_ids])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in token_ids])
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}

    def text_passes(self, token_ids: list[list[int]]) -> list[list[int]]:
        """Indices into `token_ids` for each text pass: by token count, `text_batch_size` texts a pass."""
        order = sorted(range(len(token_ids)), key=lambda index: len(token_ids[index]))
        return [order[start : start + self.text_batch_size] for start in range(0, len(order), self.text_batch_size)]

    @torch.inference_mode()
    def score_pixels(
        self, pixels: torch.Tensor, captions: list[list[str]], names: Collection[str]
    ) -> list[list[dict[str, float]]]:
        pair_texts = [text for image_texts in captions for text in image_texts]
        if not pair_texts or "clip" not in names:
            return [[{} for _ in image_texts] for image_texts in captions]
        texts = list(dict.fromkeys(pair_texts))  # each distinct text once, in order of first use
        text_index = {text: index for index, text in enumerate(texts)}
        pair_text = torch.tensor([text_index[text] for text in pair_texts], device=self.device)
        pair_image = torch.tensor([i for i, image_texts in enumerate(captions) for _ in image_texts], device=self.device)
        pixels = self.to_device(pixels)
        token_ids = self.tokenize(texts)
        if self.own_passes:
            image_feat = self._image_features(pixels)
            text_feat = torch.empty(len(texts), image_feat.shape[-1], device=self.device)
            for rows in self.text_passes(token_ids):
                text_feat[rows] = self._text_features(self.padded([token_ids[row] for row in rows]))
            cosines = (image_feat[pair_image] * text_feat[pair_text]).sum(dim=-1)
        else:
            cosines = self._library_cosines(pixels, token_ids, pair_image, pair_text)
        values = cosines.tolist()  # one copy to the host for the whole batch
        result, offset = [], 0
        for image_texts in captions:
            result.append([{"clip": value} for value in values[offset : offset + len(image_texts)]])
            offset += len(image_texts)
        return result

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected, L2-normalised image embeddings, in float32: one vision pass for the batch."""
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def _text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected, L2-normalised text embeddings, in float32."""
        pooled = self.model.text_model(**tokens).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def _library_cosines(
        self, pixels: torch.Tensor, token_ids: list[list[int]], pair_image: torch.Tensor, pair_text: torch.Tensor
    ) -> torch.Tensor:
        """The pairs' cosines from the plain call, one per text pass (which encodes the batch's images again)."""
        image_embeds, text_embeds = None, torch.empty(0)
        for rows in self.text_passes(token_ids):
            output = self.model(**self.padded([token_ids[row] for row in rows]), pixel_values=pixels)
            image_embeds = output.image_embeds.float()
            if text_embeds.numel() == 0:
                text_embeds = torch.empty(len(token_ids), image_embeds.shape[-1], device=self.device)
            text_embeds[rows] = output.text_embeds.float()
        return (image_embeds[pair_image] * text_embeds[pair_text]).sum(dim=-1)
