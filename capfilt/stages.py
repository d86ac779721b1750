"""Pipeline steps. Each takes a `Batch` and returns it with its work done and what fell out moved aside.

A run is the list decode → captioner → filters (each adds its scores) → keep rules; caption, filter,
bootstrap and select are that list with parts left out (select: the keep rules alone, on scores read back).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from capfilt.config import FilterMode
from capfilt.decode import DecodeError, decode_image
from capfilt.keep import KeepRules
from capfilt.models.base import Captioner, Filter, ImageModel
from capfilt.sample import Caption, Reject, Sample
from capfilt.scores import Score
from capfilt.stats import ShardStats


@dataclass
class Batch:
    """Samples still on their way, plus the ones a step rejected or the filter dropped."""

    samples: list[Sample]
    rejects: list[Reject] = field(default_factory=list)
    dropped: list[Sample] = field(default_factory=list)


class Stage(ABC):
    name: str

    @abstractmethod
    def process(self, batch: Batch, stats: ShardStats) -> Batch: ...


class DecodeStage(Stage):
    """Image bytes → each model's input tensor (decode, resize, normalise), in worker threads; undecodable,
    empty or oversized images become rejects. Models with the same preprocessing share one tensor."""

    name = "decode"

    def __init__(self, executor: Executor, max_pixels: int, models: list[ImageModel]) -> None:
        self.executor = executor
        self.max_pixels = max_pixels
        self.preprocessors = {model.preprocessing: model.preprocess for model in models}

    def _decode(self, sample: Sample) -> Sample | Reject:
        if not sample.image_bytes:
            return Reject(sample.key, "missing_image" if sample.image_bytes is None else "empty_image")
        try:
            image = decode_image(sample.image_bytes, self.max_pixels)
        except DecodeError as error:
            return Reject(sample.key, error.reason, error.detail)
        try:
            sample.pixels = {name: preprocess(image) for name, preprocess in self.preprocessors.items()}
        except (ValueError, OSError) as error:  # an image the model's processor cannot take
            return Reject(sample.key, "preprocess_error", f"{type(error).__name__}: {error}")
        return sample

    def process(self, batch: Batch, stats: ShardStats) -> Batch:
        decoded = Batch([], batch.rejects, batch.dropped)
        for result in self.executor.map(self._decode, batch.samples):
            if isinstance(result, Reject):
                decoded.rejects.append(result)
            else:
                decoded.samples.append(result)
        return decoded


class ModelStage(Stage):
    """A stage that runs a model: it gets a thread of its own, with its share of the CPU cores."""


def stack_pixels(samples: list[Sample], model: ImageModel) -> torch.Tensor:
    return model.collate([sample.pixels[model.preprocessing] for sample in samples])


class CaptionStage(ModelStage):
    """Adds `num_captions` synthetic captions to every sample, each distinct text once with its count (sampling
    often gives one text several times), so that the filter scores it once and no loader sees it twice."""

    name = "caption"

    def __init__(self, captioner: Captioner) -> None:
        self.captioner = captioner
        self.decoding = captioner.settings.record()

    def process(self, batch: Batch, stats: ShardStats) -> Batch:
        if not batch.samples:
            return batch
        pixels = stack_pixels(batch.samples, self.captioner)
        captions = self.captioner.caption_pixels(pixels, [s.key for s in batch.samples])
        for sample, texts in zip(batch.samples, captions):
            counts = Counter(texts)  # in the order the captioner gave them
            for text, count in counts.items():
                sample.synthetic_captions.append(
                    Caption(text, "synthetic", captioner=self.captioner.model_id, decoding=dict(self.decoding),
                            count=count)
                )
            stats.synthetic_captions_added += len(counts)
            stats.duplicate_captions += len(texts) - len(counts)
        return batch


class ScoreStage(ModelStage):
    """Adds one filter's scores to every caption, web and synthetic, under the names the run gives them
    (`scores`: the family's name of each score computed → the run's `Score`). A text an image has twice (a
    synthetic caption equal to the web caption) is scored once."""

    def __init__(self, filter_: Filter, scores: dict[str, Score]) -> None:
        self.filter = filter_
        self.scores = scores
        self.name = f"score-{'-'.join(score.name for score in scores.values())}"

    def process(self, batch: Batch, stats: ShardStats) -> Batch:
        scorable = [sample for sample in batch.samples if sample.captions()]
        if not scorable:
            return batch
        texts = [list(dict.fromkeys(c.text for c in s.captions())) for s in scorable]
        results = self.filter.score_pixels(stack_pixels(scorable, self.filter), texts, list(self.scores))
        truncated = sum(self.filter.truncated([text for sample_texts in texts for text in sample_texts]))
        for family_name, score in self.scores.items():
            per_image = [[pair[family_name] for pair in pairs] for pairs in results]
            web = [values[0] for sample, values in zip(scorable, per_image) if sample.web_caption is not None]
            stats.add_scores(score.name, [value for values in per_image for value in values], score.low, score.high,
                             web=web, best=[best_of(values) for values in per_image])
            if truncated:
                stats.captions_truncated[score.name] = stats.captions_truncated.get(score.name, 0) + truncated
        for sample, sample_texts, sample_scores in zip(scorable, texts, results):
            by_text = dict(zip(sample_texts, sample_scores))
            if sample.web_caption is not None:
                sample.web_scores.update(self._named(by_text[sample.web_caption]))
            else:  # null, not absent: every sample of a run has the same fields, for loaders that infer types
                sample.web_scores.update(dict.fromkeys(score.name for score in self.scores.values()))
            for caption in sample.synthetic_captions:
                caption.scores.update(self._named(by_text[caption.text]))
        return batch

    def _named(self, values: dict[str, float]) -> dict[str, float]:
        return {score.name: values[family_name] for family_name, score in self.scores.items()}


def best_of(values: list[float]) -> float:
    """The highest of an image's scores (NaN, which no rule keeps, only when all are)."""
    return max((value for value in values if not math.isnan(value)), default=math.nan)


class KeepStage(Stage):
    """Applies the keep rules to every caption's scores: marks which captions are kept, ranks them, and drops
    images with no kept caption (in `drop` mode). An image with no caption at all cannot be judged and is
    rejected. Without rules (a run scored for `capfilt select --keep-top`) it judges nothing and drops nothing:
    it counts the captions scored and rejects what select could not judge either."""

    name = "keep"

    def __init__(self, rules: KeepRules | None, mode: FilterMode) -> None:
        self.rules = rules
        self.mode = mode

    def process(self, batch: Batch, stats: ShardStats) -> Batch:
        result = Batch([], batch.rejects, batch.dropped)
        for sample in batch.samples:
            captions = sample.captions()
            if not captions:
                result.rejects.append(Reject(sample.key, "missing_caption", "no web or synthetic caption to judge"))
                continue
            distinct = {}
            for caption in captions:
                distinct.setdefault(caption.text, caption.scores)
            if self.rules is None:
                stats.captions_scored += len(distinct)
                result.samples.append(sample)
                continue
            kept, sample.ranking = self.rules.judge(list(distinct.items()))
            if sample.web_caption is not None:
                sample.web_kept = kept[sample.web_caption]
                stats.web_captions_kept += sample.web_kept
            for caption in sample.synthetic_captions:
                caption.kept = kept[caption.text]
            stats.captions_scored += len(kept)
            stats.captions_kept += sum(kept.values())
            sample.keeps_every_caption = self.mode is FilterMode.annotate
            if self.mode is FilterMode.drop and not any(kept.values()):
                result.dropped.append(sample)
            else:
                result.samples.append(sample)
        return result
