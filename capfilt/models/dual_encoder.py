"""Filters built on a dual encoder (CLIP, SigLIP): a score of the cosine of a pooled image embedding and a
pooled text embedding, each computed once.

Work is shared where the plain model call cannot share it: each image of a batch is encoded once for all its
captions (one vision pass per batch), and each distinct text of the batch once, in text passes grouped by
length. When a model loads, these passes are checked against the plain call on a probe; a release where they
differ gets the plain call instead. A family says how its checkpoints tokenize, pool and score.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Collection
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoProcessor, PreTrainedModel

from capfilt.errors import ModelLoadError
from capfilt.models.base import Filter, Pairs, longer_than, no_scores, per_image
from capfilt.models.fast_paths import checked, close
from capfilt.models.image_input import ProcessorImageInput
from capfilt.models.loading import load_pretrained

# Captions of the load-time probe: one short, one past the text towers' 64 or 77 tokens (it must be truncated as
# the tokenizer does).
PROBE_CAPTIONS = [
    "a dog",
    " ".join(["a red circle and a small blue square on a grey background next to a green star"] * 8),
]


class DualEncoderFilter(ProcessorImageInput, Filter):
    """One score per image-caption pair (the family's only one, `scores[0]`) from the cosine of their
    embeddings (`pair_scores`)."""

    role = "filter"
    model_class: ClassVar[type[PreTrainedModel]]
    model_types: ClassVar[tuple[str, ...]]
    # Whether texts are padded to the text tower's length, as the family's checkpoints were trained (SigLIP),
    # rather than to the longest of a pass.
    pad_to_max_length: ClassVar[bool] = False

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
        if config.model_type not in self.model_types:
            raise ModelLoadError(f"the {self.role} {model_id} is a '{config.model_type}' model, not a "
                                 f"{self.model_class.__name__} (model_type {', '.join(self.model_types)})")
        self.processor = load_pretrained(AutoProcessor, model_id, self.role)
        if getattr(self.processor, "image_processor", None) is None or getattr(self.processor, "tokenizer", None) is None:
            raise ModelLoadError(f"the {self.role} {model_id} has no image processor and tokenizer "
                                 f"(preprocessor_config.json or processor_config.json, tokenizer files)")
        # The library's default attention (SDPA) is the plain call's; --eager-attention asks for its matmul-softmax
        # attention instead.
        attention = {} if sdpa else {"attn_implementation": "eager"}
        self.model = load_pretrained(self.model_class, model_id, self.role, config=config, dtype=dtype, **attention)
        self.model.to(self.device).eval()
        tokenizer = self.processor.tokenizer
        # What `tokenizer(..., truncation=True)` keeps, bounded by the text tower's positions.
        self.text_max_tokens = min(tokenizer.model_max_length, config.text_config.max_position_embeddings)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.own_passes = True  # each image and each distinct text encoded once; else the plain call per pass
        self._check_passes()

    def truncated(self, texts: list[str]) -> list[bool]:
        return longer_than(self.processor.tokenizer, texts, self.text_max_tokens)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the plain call makes them, before padding: truncated to the text tower's positions."""
        return self.processor.tokenizer(texts, truncation=True, max_length=self.text_max_tokens)["input_ids"]

    # What a family defines.

    @abstractmethod
    def pair_scores(self, cosines: torch.Tensor) -> torch.Tensor:
        """The family's score from the cosines of image and text embeddings."""

    @abstractmethod
    def plain_scores(self, output) -> torch.Tensor:
        """(images, texts) scores from the plain model call's output."""

    def pooled_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixels).pooler_output

    def pooled_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.text_model(**tokens).pooler_output

    @property
    def uses_attention_mask(self) -> bool:
        return "attention_mask" in self.processor.tokenizer.model_input_names

    def _check_passes(self) -> None:
        """Our passes against the plain call on a probe: two pictures (the probe and its mirror image), one with
        both captions, one with the long one, so that a caption scored against the wrong picture shows."""
        probe = self.probe_pixels()
        images = torch.cat([probe, probe.flip(-1)])
        captions = [PROBE_CAPTIONS, PROBE_CAPTIONS[1:]]
        name = self.scores[0].name
        with torch.inference_mode():
            try:
                output = self.model(**self.padded(self.tokenize(PROBE_CAPTIONS)), pixel_values=self.to_device(images))
                expected = self.plain_scores(output).float()[[0, 0, 1], [0, 1, 1]]
            except Exception as error:
                raise self.unusable(error) from error

        def check() -> None:
            scores = [pair[name] for pairs in self.score_pixels(images, captions, (name,)) for pair in pairs]
            close(torch.tensor(scores), expected, self.dtype, "scores")

        self.own_passes = checked(f"capfilt's own {self.model_class.__name__} passes", self.role, self.model_id, check)

    def padded(self, token_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """`token_ids` padded on the right to the longest of them, or to the text tower's length (with their
        attention mask where the tokenizer gives one), on the device."""
        length = self.text_max_tokens if self.pad_to_max_length else max(len(ids) for ids in token_ids)
        input_ids = torch.tensor([ids + [self.pad_token_id] * (length - len(ids)) for ids in token_ids])
        tokens = {"input_ids": input_ids.to(self.device)}
        if self.uses_attention_mask:
            mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in token_ids])
            tokens["attention_mask"] = mask.to(self.device)
        return tokens

    def text_passes(self, token_ids: list[list[int]]) -> list[list[int]]:
        """Indices into `token_ids` for each text pass: by token count, `text_batch_size` texts a pass."""
        order = sorted(range(len(token_ids)), key=lambda index: len(token_ids[index]))
        return [order[start : start + self.text_batch_size] for start in range(0, len(order), self.text_batch_size)]

    @torch.inference_mode()
    def score_pixels(
        self, pixels: torch.Tensor, captions: list[list[str]], names: Collection[str]
    ) -> list[list[dict[str, float]]]:
        name = self.scores[0].name
        if not any(captions) or name not in names:
            return no_scores(captions)
        pairs = Pairs.of(captions, self.device)
        pixels = self.to_device(pixels)
        token_ids = self.tokenize(pairs.texts)
        if self.own_passes:
            image_feat = self._image_features(pixels)
            text_feat = torch.empty(len(pairs.texts), image_feat.shape[-1], device=self.device)
            for rows in self.text_passes(token_ids):
                text_feat[rows] = self._text_features(self.padded([token_ids[row] for row in rows]))
            scores = self.pair_scores((image_feat[pairs.image] * text_feat[pairs.text]).sum(dim=-1))
        else:
            scores = self._library_scores(pixels, token_ids, pairs.image, pairs.text)
        # One copy to the host for the whole batch.
        return per_image([{name: value} for value in scores.tolist()], captions)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled, L2-normalised image embeddings, in float32: one vision pass for the batch."""
        return F.normalize(self.pooled_image(pixels).float(), dim=-1)

    def _text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled, L2-normalised text embeddings, in float32."""
        return F.normalize(self.pooled_text(tokens).float(), dim=-1)

    def _library_scores(
        self, pixels: torch.Tensor, token_ids: list[list[int]], pair_image: torch.Tensor, pair_text: torch.Tensor
    ) -> torch.Tensor:
        """The pairs' scores from the plain call, one per text pass (which encodes the batch's images again)."""
        scores = torch.empty(len(pixels), len(token_ids), device=self.device)
        for rows in self.text_passes(token_ids):
            output = self.model(**self.padded([token_ids[row] for row in rows]), pixel_values=pixels)
            scores[:, rows] = self.plain_scores(output).float()
        return scores[pair_image, pair_text]
