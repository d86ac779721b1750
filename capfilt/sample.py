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
    """One caption of an image with the scores the filters gave it, by score name, and whether it is kept.

    `source` is "web" for the caption that came with the image, "synthetic" for one the captioner wrote.
    Synthetic captions carry the captioner's model id and decoding settings, so that captions added by several
    runs stay distinguishable, and `count`: how many of the captions asked of the captioner were this text.
    """

    text: str
    source: str
    scores: dict[str, float] = field(default_factory=dict)
    kept: bool | None = None
    captioner: str | None = None
    decoding: dict[str, Any] | None = None
    count: int = 1


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
    web_scores: dict[str, float | None] = field(default_factory=dict)  # null for an image without web caption
    web_kept: bool | None = None
    pixels: dict[str, torch.Tensor] = field(default_factory=dict)
    # The judged captions' texts, best first, as the keep rules ranked them (or as an earlier run did).
    ranking: list[str] = field(default_factory=list)
    # Set by an annotate-mode run, which drops no caption: `kept_captions` then lists every caption.
    keeps_every_caption: bool = False

    def captions(self) -> list[Caption]:
        """All captions of the sample, web first, as the filters score them."""
        web = []
        if self.web_caption is not None:
            web = [Caption(self.web_caption, "web", scores=self.web_scores, kept=self.web_kept)]
        return web + list(self.synthetic_captions)


@dataclass
class Reject:
    """A sample that could not be processed, and why (written to the shard's rejects file)."""

    key: str
    reason: str
    detail: str = ""

    def record(self) -> dict[str, str]:
        return {"key": self.key, "reason": self.reason, "detail": self.detail}
