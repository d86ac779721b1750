"""Scores by name: what a filter model family declares it computes, and how a run names them.

A family declares each score it computes (BLIP: `itm` and `itc`; CLIP: `clip`) with its range, so that output
fields, stats histograms, the summary, `show` and keep rules all follow the declarations and nothing outside
the family knows a score's name. A run may rename a model's scores (`--filter clipL=openai/clip-vit-large-patch14`)
so that two models of one family can run side by side. Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from capfilt.errors import ConfigError

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Score:
    """A score a filter computes for an image-caption pair: its name, range and what it measures."""

    name: str
    low: float
    high: float
    description: str

    def renamed(self, name: str) -> Score:
        return Score(name, self.low, self.high, self.description)

    def record(self) -> dict[str, object]:
        return {"low": self.low, "high": self.high, "description": self.description}

    @classmethod
    def from_record(cls, name: str, record: dict) -> Score:
        return cls(name, float(record["low"]), float(record["high"]), str(record.get("description", "")))


def check_score_name(name: str, what: str = "score name") -> str:
    """`name` when it can name a score: a letter, then letters, digits or underscores (it becomes part of the
    output's field names, `web_NAME_score`)."""
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{what} {name!r} must start with a letter and hold only letters, digits and '_'")
    return name


def run_scores(scores: Sequence[Score], rename: str | None) -> dict[str, Score]:
    """A family's scores as a run names them, by the family's own name: the family's names; with
    `NAME=MODEL`, NAME for a family of one score and `NAME_score` (e.g. `blipL_itm`) for a family of several."""
    if rename is None:
        return {score.name: score for score in scores}
    if len(scores) == 1:
        return {scores[0].name: scores[0].renamed(rename)}
    return {score.name: score.renamed(f"{rename}_{score.name}") for score in scores}
