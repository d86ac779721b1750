"""Per-shard counts and the run summary merged from them (`NAME_stats.json`, `capfilt_summary.json`).

Scores are kept as fixed-bin histograms, so shard stats merge exactly into the run's histograms and quantiles
however the shards were spread over processes or machines. Three histograms per score: every caption's, the web
captions' alone (the synthetic captions' is the difference), and each image's best caption's, which tells how
many images a threshold keeps.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from capfilt.keep import KeepTop

HISTOGRAM_BINS = 1000
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass
class Counts:
    """What happened to the samples and captions, per shard and summed over a run."""

    read: int = 0
    written: int = 0
    dropped: int = 0
    rejected: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    synthetic_captions_added: int = 0  # distinct texts per image
    duplicate_captions: int = 0  # synthetic captions that repeated one the captioner had given the image
    captions_scored: int = 0
    # By score: captions longer than the filter's text limit (CLIP: 77 tokens), scored on their start.
    captions_truncated: dict[str, int] = field(default_factory=dict)
    captions_kept: int = 0
    web_captions_kept: int = 0


COUNT_FIELDS = [f.name for f in fields(Counts) if f.name not in ("reject_reasons", "captions_truncated")]


@dataclass
class ShardStats(Counts):
    shard: str = ""
    # Sparse histograms of the scores, {name: {bin index: count}}, over each score's declared range
    # {name: [low, high]}, recorded so that stats merge without knowing the models that computed them.
    histograms: dict[str, dict[str, int]] = field(default_factory=dict)
    web_histograms: dict[str, dict[str, int]] = field(default_factory=dict)
    best_histograms: dict[str, dict[str, int]] = field(default_factory=dict)
    score_ranges: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    # Why the shard failed, in one line: a read error (the samples read before it are processed and counted),
    # or an exception processing it, which abandons the shard (nothing of it is written or counted) and sets
    # `traceback`. Either way the shard is not complete: a rerun redoes it.
    error: str | None = None
    traceback: str | None = None

    @property
    def abandoned(self) -> bool:
        """Whether the shard failed on an exception processing it, not on its input."""
        return self.traceback is not None

    def count_reject(self, reason: str) -> None:
        self.rejected += 1
        self.reject_reasons[reason] = self.reject_reasons.get(reason, 0) + 1

    def add_scores(self, name: str, scores: list[float], low: float, high: float, web: list[float] = (),
                   best: list[float] = ()) -> None:
        """Every caption's `scores`, the `web` captions' among them, and each image's `best` caption's."""
        self.score_ranges[name] = [low, high]
        for histograms, values in ((self.histograms, scores), (self.web_histograms, web), (self.best_histograms, best)):
            add_to_histogram(histograms.setdefault(name, {}), values, low, high)

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ShardStats:
        return cls(**record)


def add_to_histogram(histogram: dict[str, int], values: list[float], low: float, high: float) -> None:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[~np.isnan(finite)]
    counts, _ = np.histogram(np.clip(finite, low, high), bins=HISTOGRAM_BINS, range=(low, high))
    for index in np.flatnonzero(counts):
        histogram[str(index)] = histogram.get(str(index), 0) + int(counts[index])


def occupied_range(counts: np.ndarray, low: float, high: float, marks: list[float] = ()) -> tuple[int, int]:
    """The fine bins [first, last) a plot of `counts` spans: those with counts and those of the `marks` (keep
    rules' thresholds) within [low, high], widened to at least 5% of the range."""
    width = (high - low) / HISTOGRAM_BINS
    marked = [int(min((mark - low) / width, HISTOGRAM_BINS - 1)) for mark in marks if low <= mark <= high]
    occupied = list(np.flatnonzero(counts)) + marked
    if not occupied:
        return 0, HISTOGRAM_BINS
    first, last = int(min(occupied)), int(max(occupied)) + 1
    short = HISTOGRAM_BINS // 20 - (last - first)
    if short > 0:
        first, last = max(0, first - short // 2), min(HISTOGRAM_BINS, last + short - short // 2)
    return first, last


def histogram_top_threshold(counts: np.ndarray, low: float, high: float, fraction: float) -> float | None:
    """Where the top `fraction` of the counted scores begins, to the bin width: the lower edge of the bin in
    which the `round(fraction * total)`-th highest score falls (`capfilt select --keep-top` finds it exactly).
    None without any count."""
    total = int(counts.sum())
    if total == 0:
        return None
    wanted = min(total, max(1, round(fraction * total)))
    from_top = np.cumsum(counts[::-1])
    index = HISTOGRAM_BINS - 1 - int(np.searchsorted(from_top, wanted, side="left"))
    return low + index * (high - low) / HISTOGRAM_BINS


def rebinned(counts: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The fine bins summed into columns: column i holds the bins [edges[i], edges[i + 1])."""
    return np.array([counts[start:end].sum() for start, end in itertools.pairwise(edges)])


def dense(sparse: dict[str, int]) -> np.ndarray:
    counts = np.zeros(HISTOGRAM_BINS, dtype=np.int64)
    for index, count in sparse.items():
        counts[int(index)] += count
    return counts


@dataclass
class RunSummary(Counts):
    shards: int = 0
    score_quantiles: dict[str, dict[str, float]] = field(default_factory=dict)
    # The shards' histograms summed (sparse, as in ShardStats), and the range of each score.
    histograms: dict[str, dict[str, int]] = field(default_factory=dict)
    web_histograms: dict[str, dict[str, int]] = field(default_factory=dict)
    best_histograms: dict[str, dict[str, int]] = field(default_factory=dict)
    score_ranges: dict[str, list[float]] = field(default_factory=dict)
    # Each shard's [read, written, dropped, rejected], so that a report needs no pass over the shards' stats.
    shard_counts: dict[str, list[int]] = field(default_factory=dict)
    failed_shards: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    # The keep rules the counts follow.
    keep: list[str] = field(default_factory=list)
    # The top fractions (NAME:FRACTION) the output is scored for, judging nothing: `capfilt select` keeps them.
    select_top: list[str] = field(default_factory=list)

    @classmethod
    def merge(cls, shard_stats: list[ShardStats], seconds: float, keep: Sequence[str] = (),
              select_top: Sequence[str] = ()) -> RunSummary:
        """The shards' stats summed, for a run whose keep rules were `keep` (or that was scored for the top
        fractions `select_top`)."""
        summary = cls(shards=len(shard_stats), seconds=round(seconds, 3), keep=list(keep), select_top=list(select_top))
        reasons: Counter[str] = Counter()
        truncated: Counter[str] = Counter()
        merged: dict[str, dict[str, Counter[str]]] = {"histograms": {}, "web_histograms": {}, "best_histograms": {}}
        for stats in shard_stats:
            for name in COUNT_FIELDS:
                setattr(summary, name, getattr(summary, name) + getattr(stats, name))
            reasons.update(stats.reject_reasons)
            truncated.update(stats.captions_truncated)
            summary.score_ranges.update(stats.score_ranges)
            for kind, by_score in merged.items():
                for name, sparse in getattr(stats, kind).items():
                    by_score.setdefault(name, Counter()).update(sparse)
            summary.shard_counts[stats.shard] = [stats.read, stats.written, stats.dropped, stats.rejected]
            if stats.error:
                summary.failed_shards[stats.shard] = stats.error
        summary.reject_reasons = dict(sorted(reasons.items()))
        summary.captions_truncated = dict(truncated)
        for kind, by_score in merged.items():
            setattr(summary, kind, {name: dict(sorted(counts.items(), key=lambda item: int(item[0])))
                                    for name, counts in by_score.items()})
        summary.score_quantiles = {name: histogram_quantiles(dense(sparse), *summary.score_ranges[name])
                                   for name, sparse in summary.histograms.items() if name in summary.score_ranges}
        return summary

    def marked_rules(self) -> list[str]:
        """The rules a plot of the run's scores marks: its keep rules, else, for a run scored for top fractions,
        `NAME>=value` where each begins (to the histogram's bin)."""
        if self.keep:
            return list(self.keep)
        rules = []
        for top in map(KeepTop.parse, self.select_top):
            if top.score in self.histograms and top.score in self.score_ranges:
                low, high = self.score_ranges[top.score]
                value = histogram_top_threshold(dense(self.histograms[top.score]), low, high, top.fraction)
                if value is not None:
                    rules.append(f"{top.score}>={value:.4g}")
        return rules

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RunSummary:
        """A summary as written; one of an older capfilt lacks the histograms and shard counts."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})

    def record(self) -> dict[str, Any]:
        return asdict(self)


def histogram_quantiles(counts: np.ndarray, low: float, high: float) -> dict[str, float]:
    """Quantiles to the bin width (1/1000 of the score range)."""
    total = int(counts.sum())
    if total == 0:
        return {}
    cumulative = np.cumsum(counts)
    width = (high - low) / HISTOGRAM_BINS
    result = {}
    for q in QUANTILES:
        index = int(np.searchsorted(cumulative, q * total, side="left"))
        result[f"p{round(q * 100):02d}"] = round(low + (index + 0.5) * width, 4)
    return result
