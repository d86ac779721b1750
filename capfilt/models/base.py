"""The two model interfaces the pipeline sees: a captioner and a filter.

A new model family (BLIP-2, CLIP, ...) is one module implementing these, registered in `capfilt.models`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from PIL import Image

# Defined with the run's other settings, which must not import torch; models take it from here.
from capfilt.config import DecodingSettings


@dataclass(frozen=True)
class CaptionScores:
    """The filter's scores for one image-caption pair; a score not asked for is None."""

    itm: float | None
    itc: float | None


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

    def preprocess_all(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.preprocess(image) for image in images])


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
    """Scores image-caption pairs: ITM match probability and/or ITC cosine."""

    @abstractmethod
    def score_pixels(
        self, pixels: torch.Tensor, captions: list[list[str]], itm: bool, itc: bool
    ) -> list[list[CaptionScores]]:
        """Scores for every caption of every image (stacked `preprocess` outputs); each image is encoded once
        for all its captions."""

    def score(
        self, images: list[Image.Image], captions: list[list[str]], itm: bool, itc: bool
    ) -> list[list[CaptionScores]]:
        return self.score_pixels(self.preprocess_all(images), captions, itm, itc)
