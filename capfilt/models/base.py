"""The two model interfaces the pipeline sees: a captioner and a filter.

A new model family (BLIP-2, CLIP, ...) is one module implementing these, registered in `capfilt.models`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

from PIL import Image


@dataclass(frozen=True)
class DecodingSettings:
    """How the captioner decodes. Lengths count tokens the way Hugging Face does: prompt included.

    `repetition_penalty=None` means BLIP's own choice: 1.1 for nucleus sampling, 1.0 for beam search.
    """

    num_beams: int = 1
    num_captions: int = 1
    top_p: float = 0.9
    max_length: int = 30
    min_length: int = 10
    repetition_penalty: float | None = None
    prompt: str = "a picture of "
    seed: int = 0

    @property
    def method(self) -> str:
        return "beam" if self.num_beams > 1 else "nucleus"

    @property
    def effective_repetition_penalty(self) -> float:
        if self.repetition_penalty is not None:
            return self.repetition_penalty
        return 1.0 if self.method == "beam" else 1.1

    def record(self) -> dict:
        """The settings written beside each synthetic caption."""
        record = asdict(self)
        record["method"] = self.method
        record["repetition_penalty"] = self.effective_repetition_penalty
        if self.method == "beam":
            record.pop("top_p")
            record.pop("seed")
        else:
            record.pop("num_beams")
        return record


@dataclass(frozen=True)
class CaptionScores:
    """The filter's scores for one image-caption pair; a score not asked for is None."""

    itm: float | None
    itc: float | None


class Captioner(ABC):
    """Writes synthetic captions for a batch of images."""

    model_id: str
    settings: DecodingSettings

    @abstractmethod
    def caption(self, images: list[Image.Image], keys: list[str]) -> list[list[str]]:
        """`settings.num_captions` captions per image, prompt stripped, in image order. Sampling is seeded by
        `settings.seed` and each image's sample key, so a caption does not depend on the batch."""


class Filter(ABC):
    """Scores image-caption pairs: ITM match probability and/or ITC cosine."""

    model_id: str

    @abstractmethod
    def score(
        self, images: list[Image.Image], captions: list[list[str]], itm: bool, itc: bool
    ) -> list[list[CaptionScores]]:
        """Scores for every caption of every image; each image is encoded once for all its captions."""
