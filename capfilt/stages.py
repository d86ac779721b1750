"""Pipeline steps. Each takes a `Batch` and returns it with its work done and what fell out moved aside.

caption, filter and bootstrap are the same pipeline with steps left out: decode → caption → filter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from capfilt.config import FilterMode, FilterSettings
from capfilt.decode import DecodeError, decode_image
from capfilt.models.base import Captioner, CaptionScores, Filter, ImageModel
from capfilt.sample import Caption, Reject, Sample
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


def stack_pixels(samples: list[Sample], model: ImageModel) -> torch.Tensor:
    return torch.stack([sample.pixels[model.preprocessing] for sample in samples])


class CaptionStage(Stage):
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
                    Caption(
                        text, "synthetic", captioner=self.captioner.model_id, decoding=dict(self.decoding), count=count
                    )
                )
            stats.synthetic_captions_added += len(counts)
            stats.duplicate_captions += len(texts) - len(counts)
        return batch


class FilterStage(Stage):
    """Scores every caption, web and synthetic, marks which pass, and drops images with no passing caption
    (in `drop` mode). An image with no caption at all cannot be filtered and is rejected. A text an image has
    twice (a synthetic caption equal to the web caption) is scored once."""

    name = "filter"

    def __init__(self, filter_: Filter, settings: FilterSettings) -> None:
        self.filter = filter_
        self.settings = settings

    def process(self, batch: Batch, stats: ShardStats) -> Batch:
        result = Batch([], batch.rejects, batch.dropped)
        scorable = []
        for sample in batch.samples:
            if sample.captions():
                scorable.append(sample)
            else:
                result.rejects.append(Reject(sample.key, "missing_caption", "no web or synthetic caption to filter"))
        if not scorable:
            return result
        texts = [list(dict.fromkeys(c.text for c in s.captions())) for s in scorable]
        scores = self.filter.score_pixels(
            stack_pixels(scorable, self.filter), texts, self.settings.itm, self.settings.itc
        )
        for kind in ("itm", "itc"):
            values = [getattr(score, kind) for pairs in scores for score in pairs if getattr(score, kind) is not None]
            if values:
                stats.add_scores(kind, values)
        for sample, sample_texts, sample_scores in zip(scorable, texts, scores):
            self._apply(sample, dict(zip(sample_texts, sample_scores)), stats)
            sample.keeps_every_caption = self.settings.mode is FilterMode.annotate
            if self.settings.mode is FilterMode.drop and not any(c.kept for c in sample.captions()):
                result.dropped.append(sample)
            else:
                result.samples.append(sample)
        return result

    def _apply(self, sample: Sample, scores_by_text: dict[str, CaptionScores], stats: ShardStats) -> None:
        if sample.web_caption is not None:
            web = scores_by_text[sample.web_caption]
            kept = self.settings.passes(web.itm, web.itc)
            sample.set_web_scores(web.itm, web.itc, kept)
            stats.web_captions_kept += kept
        for caption in sample.synthetic_captions:
            score = scores_by_text[caption.text]
            caption.itm_score, caption.itc_score = score.itm, score.itc
            caption.kept = self.settings.passes(score.itm, score.itc)
        stats.captions_scored += len(scores_by_text)
        stats.captions_kept += len({c.text for c in sample.captions() if c.kept})
