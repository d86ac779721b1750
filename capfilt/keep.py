"""Keep rules: which captions of an image a run keeps, from the scores its filters computed.

- `itm>=0.5`: a rule on one score (>=, >, <= or <); a caption is kept when every rule holds.
- keep-best K: at most the K best captions of an image among those every rule keeps, ranked by the first
  rule's score (LAION-COCO's rerank: 40 captions, the best 1 by CLIP).
- keep-top NAME:FRACTION (`capfilt select`): the captions whose score is in the top FRACTION over the whole
  input (DataComp's CLIP-score baselines); the driver turns it into a rule `NAME>=value` after one pass over
  the scores.
A caption lacking a rule's score fails it, as does a NaN score. Nothing here knows any score's name.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from capfilt.errors import ConfigError
from capfilt.scores import Score

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt
}
_RULE = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*(\S+)\s*")
_TOP = re.compile(r"\s*([A-Za-z][A-Za-z0-9_]*)\s*:\s*(\S+)\s*")


@dataclass(frozen=True)
class KeepRule:
    score: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> KeepRule:
        match = _RULE.fullmatch(text)
        value = _number(match.group(3)) if match else None
        if match is None or value is None:
            raise ConfigError(f"malformed keep rule {text!r}: write SCORE>=VALUE (or >, <=, <), e.g. 'itm>=0.5'")
        return cls(match.group(1), match.group(2), value)

    def holds(self, value: float | None) -> bool:
        return value is not None and not math.isnan(value) and OPERATORS[self.op](value, self.value)

    @property
    def higher_is_better(self) -> bool:
        return self.op in (">=", ">")

    def __str__(self) -> str:
        return f"{self.score}{self.op}{self.value!r}"


@dataclass(frozen=True)
class KeepTop:
    """`NAME:FRACTION`: keep the captions whose NAME score is in the top FRACTION over the whole input."""

    score: str
    fraction: float

    @classmethod
    def parse(cls, text: str) -> KeepTop:
        match = _TOP.fullmatch(text)
        fraction = _number(match.group(2)) if match else None
        if match is None or fraction is None or not 0.0 < fraction <= 1.0:
            raise ConfigError(f"malformed --keep-top {text!r}: write SCORE:FRACTION with FRACTION in (0, 1], "
                              "e.g. 'clip:0.3'")
        return cls(match.group(1), fraction)

    def __str__(self) -> str:
        return f"{self.score}:{self.fraction!r}"

    def described(self) -> str:
        return f"the top {self.fraction * 100:g}% by {self.score}"


def top_threshold(values: Sequence[float], fraction: float) -> float | None:
    """The lowest score among the `round(fraction * len(values))` highest (at least one): keeping the scores
    at or above it keeps that top fraction exactly when no two scores tie. None without any score."""
    finite = sorted((v for v in values if not math.isnan(v)), reverse=True)
    if not finite:
        return None
    count = min(len(finite), max(1, round(fraction * len(finite))))
    return finite[count - 1]


@dataclass(frozen=True)
class KeepRules:
    """The rules of a run, checked against the scores it has, and their verdict on one image's captions."""

    rules: tuple[KeepRule, ...]
    best: int | None = None

    @classmethod
    def parse(cls, rules: Sequence[str], best: int | None = None) -> KeepRules:
        if best is not None and best < 1:
            raise ConfigError("--keep-best must be at least 1")
        parsed = tuple(KeepRule.parse(rule) for rule in rules)
        if best is not None and not parsed:
            raise ConfigError("--keep-best ranks by the first --keep rule's score; give a --keep rule")
        return cls(parsed, best)

    def check(self, scores: Mapping[str, Score], what: str = "the run computes") -> None:
        """Refuse, in one line, a rule on a score not in `scores` or with a value outside the score's range."""
        available = ", ".join(scores) or "none"
        for rule in self.rules:
            score = scores.get(rule.score)
            if score is None:
                raise ConfigError(f"keep rule '{rule}' uses the score '{rule.score}', which is not among the "
                                  f"scores {what}: {available}")
            if not score.low <= rule.value <= score.high:
                raise ConfigError(f"keep rule '{rule}' is outside the range of '{rule.score}' "
                                  f"({score.low:g} to {score.high:g}: {score.description})")

    def record(self) -> dict[str, object]:
        return {"keep": [str(rule) for rule in self.rules], "keep_best": self.best}

    def judge(self, captions: Sequence[tuple[str, Mapping[str, float]]]) -> tuple[dict[str, bool], list[str]]:
        """For one image's distinct captions (text, scores), in their order: whether each is kept, and the
        texts ranked best first by the first rule's score (ties and unranked runs keep their order)."""
        kept = {text: all(rule.holds(scores.get(rule.score)) for rule in self.rules) for text, scores in captions}
        ranking = [text for text, _ in captions]
        if self.rules:
            first = self.rules[0]
            sign = 1.0 if first.higher_is_better else -1.0

            def rank(item: tuple[str, Mapping[str, float]]) -> float:
                value = item[1].get(first.score)
                return -math.inf if value is None or math.isnan(value) else sign * value

            ranking = [text for text, _ in sorted(captions, key=rank, reverse=True)]
        if self.best is not None:
            best = [text for text in ranking if kept[text]][: self.best]
            kept = {text: text in best for text in kept}
        return kept, ranking


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
