"""The two model interfaces the pipeline sees: a captioner and a filter.

A new model family (BLIP-2, CLIP, ...) is one module implementing these, registered beside its code with
`capfilt.models.registry.register_captioner` / `register_filter` under its checkpoints' `model_type`.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from PIL import Image

# Defined with the run's other settings, which must not import torch; models take it from here.
from capfilt.config import DecodingSettings
from capfilt.scores import Score

T = TypeVar("T")


class ImageModel(ABC):
    """A model that sees images through its own preprocessing (resize, normalise), which the pipeline runs in
    its decode workers, once per distinct `preprocessing` when two models share it."""

    model_id: str

    @property
    @abstractmethod
    def preprocessing(self) -> str:
        """Equal for two models exactly when `preprocess` gives both the same tensor."""

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB picture → the model's input tensor, on the CPU; called from worker threads."""

    def collate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """`preprocess` outputs as one batch tensor (a family whose pictures keep their own size pads them)."""
        return torch.stack(tensors)

    def preprocess_all(self, images: list[Image.Image]) -> torch.Tensor:
        return self.collate([self.preprocess(image) for image in images])


class Captioner(ImageModel):
    """Writes synthetic captions for a batch of images."""

    settings: DecodingSettings

    @abstractmethod
    def caption_pixels(self, pixels: torch.Tensor, keys: list[str]) -> list[list[str]]:
        """`settings.num_captions` captions per image (stacked `preprocess` outputs), prompt stripped, in image
        order. Sampling is seeded by `settings.seed` and each image's sample key, so a caption does not depend
        on the batch."""

    def caption(self, images: list[Image.Image], keys: list[str]) -> list[list[str]]:
        return self.caption_pixels(self.preprocess_all(images), keys)


class Filter(ImageModel):
    """Scores image-caption pairs. A family declares the scores it can compute; only it knows their names."""

    # Every score the family can compute, the ones it computes when no rule asks for others, and the keep rules
    # a run uses when none are given (in the family's own score names).
    scores: ClassVar[tuple[Score, ...]]
    default_scores: ClassVar[tuple[str, ...]]
    default_keep: ClassVar[tuple[str, ...]]

    @abstractmethod
    def __init__(self, model_id: str, device: str, dtype: torch.dtype, sdpa: bool = True) -> None: ...

    @abstractmethod
    def score_pixels(
        self, pixels: torch.Tensor, captions: list[list[str]], names: Collection[str]
    ) -> list[list[dict[str, float]]]:
        """The scores `names` (of `scores`) of every caption of every image (stacked `preprocess` outputs), as
        {name: value} in caption order; each image is encoded once for all its captions."""

    def score(
        self, images: list[Image.Image], captions: list[list[str]], names: Collection[str]
    ) -> list[list[dict[str, float]]]:
        return self.score_pixels(self.preprocess_all(images), captions, names)

    def truncated(self, texts: list[str]) -> list[bool]:
        """Whether each text is longer than the family's text limit, so that it is scored on its start, cut as
        the family's tokenizer cuts it. A family with no limit truncates nothing."""
        return [False] * len(texts)


def distinct_texts(pair_texts: list[str]) -> tuple[list[str], list[int]]:
    """Each distinct text of the pairs once, in order of first use, and each pair's index into them: a text that
    several captions share is encoded once."""
    texts = list(dict.fromkeys(pair_texts))
    index = {text: position for position, text in enumerate(texts)}
    return texts, [index[text] for text in pair_texts]


def no_scores(captions: list[list[str]]) -> list[list[dict[str, float]]]:
    """`score_pixels`'s answer when it computes nothing: an empty dict per caption."""
    return [[{} for _ in image_texts] for image_texts in captions]


@dataclass(frozen=True)
class Pairs:
    """A batch's image-caption pairs (its captions in order): each distinct text once (`texts`), and each pair's
    index into them (`text`) and its image (`image`), on the device."""

    texts: list[str]
    text: torch.Tensor
    image: torch.Tensor

    @classmethod
    def of(cls, captions: list[list[str]], device: torch.device) -> Pairs:
        texts, text_of_pair = distinct_texts([text for image_texts in captions for text in image_texts])
        return cls(texts, torch.tensor(text_of_pair, device=device), torch.tensor(pair_images(captions), device=device))


def pair_images(captions: list[list[str]]) -> list[int]:
    """For each caption of the batch, in order, the index of its image."""
    return [image for image, image_texts in enumerate(captions) for _ in image_texts]


def per_image(pair_values: list[T], captions: list[list[str]]) -> list[list[T]]:
    """One value per caption of the batch, in order, cut back into one list per image."""
    ends = list(itertools.accumulate(len(image_texts) for image_texts in captions))
    return [pair_values[end - len(image_texts) : end] for end, image_texts in zip(ends, captions)]


def longer_than(tokenizer: Any, texts: list[str], limit: int) -> list[bool]:
    """Whether each text is more than `limit` tokens (special tokens included) for a transformers tokenizer."""
    return [len(ids) > limit for ids in tokenizer(texts, verbose=False)["input_ids"]]
