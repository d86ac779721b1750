"""The records that flow through a capfilt pipeline.

A reader yields `Sample`s (or `Reject`s for members it cannot pair with an image); decoding, captioning and
filtering fill in fields; a writer turns each `Sample` back into the format's files. Every input sample ends
as exactly one of: written, dropped by the filter (`Batch.dropped`), or a `Reject` with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only a type here: reading shards (capfilt show) must not wait for torch
    import torch


@dataclass
class Caption:
    """One caption of an image with the scores the filter gave it.

    `source` is "web" for the caption that came with the image, "synthetic" for one the captioner wrote.
    Synthetic captions carry the captioner's model id and decoding settings, so that captions added by several
    runs stay distinguishable, and `count`: how many of the captions asked of the captioner were this text.
    """

    text: str
    source: str
    itm_score: float | None = None
    itc_score: float | None = None
    kept: bool | None = None
    captioner: str | None = None
    decoding: dict[str, Any] | None = None
    count: int = 1

    def synthetic_record(self) -> dict[str, Any]:
        """The documented JSON form of a synthetic caption (`synthetic_captions[i]`)."""
        return {
            "text": self.text,
            "count": self.count,
            "itm_score": self.itm_score,
            "itc_score": self.itc_score,
            "kept": self.kept,
            "captioner": self.captioner,
            "decoding": self.decoding,
        }

    @classmethod
    def from_synthetic_record(cls, record: dict[str, Any]) -> Caption:
        return cls(
            text=record["text"],
            source="synthetic",
            itm_score=record.get("itm_score"),
            itc_score=record.get("itc_score"),
            kept=record.get("kept"),
            captioner=record.get("captioner"),
            decoding=record.get("decoding"),
            count=record.get("count", 1),  # outputs written before captions were counted hold each text once
        )


@dataclass
class Sample:
    """One image with its captions, as read from a shard and as it will be written back.

    `image_bytes` are written back unchanged; `pixels` holds the decoded picture as each model's input tensor,
    keyed by `ImageModel.preprocessing`.
    `metadata` holds the sample's JSON sidecar (webdataset, files) or its other columns (Parquet); it is kept
    whole and capfilt's fields are added to it. `extra_members` are any other files of the sample (webdataset
    or files format) keyed by extension, also kept unchanged.
    """

    key: str
    image_bytes: bytes | None
    image_ext: str | None
    web_caption: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    extra_members: dict[str, bytes] = field(default_factory=dict)
    synthetic_captions: list[Caption] = field(default_factory=list)
    web_itm_score: float | None = None
    web_itc_score: float | None = None
    web_kept: bool | None = None
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)
    # Set by an annotate-mode filter, which drops no caption: `kept_captions` then lists every caption.
    keeps_every_caption: bool = False

    def captions(self) -> list[Caption]:
        """All captions of the sample, web first, as the filter scores them."""
        web = []
        if self.web_caption is not None:
            web = [
                Caption(
                    self.web_caption,
                    "web",
                    itm_score=self.web_itm_score,
                    itc_score=self.web_itc_score,
                    kept=self.web_kept,
                )
            ]
        return web + list(self.synthetic_captions)

    def set_web_scores(self, itm: float | None, itc: float | None, kept: bool | None) -> None:
        self.web_itm_score, self.web_itc_score, self.web_kept = itm, itc, kept


@dataclass
class Reject:
    """A sample that could not be processed, and why (written to the shard's rejects file)."""

    key: str
    reason: str
    detail: str = ""

    def record(self) -> dict[str, str]:
        return {"key": self.key, "reason": self.reason, "detail": self.detail}
