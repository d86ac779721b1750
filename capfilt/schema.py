"""The documented names under which capfilt writes captions and scores (README: "Output schema").

Scores are named by the filter families that compute them (BLIP: `itm`, `itc`; CLIP: `clip`), and each
becomes a flat field: `web_NAME_score` for the web caption, `NAME_score` in each synthetic caption's record.
Webdataset and files outputs put these fields in each sample's `.json` and the primary caption in `.txt`;
Parquet outputs (and the metadata Parquet beside tar and folder shards) put them in columns of the same names
and the primary caption in `primary_caption`. Reading them back (a `caption` run's output fed to `filter`, an
annotated output fed to `select`) restores the same `Sample`.

Loaders that infer types from the first samples (Hugging Face `datasets` reads five) need each field to have
the same JSON type in every sample: `kept_captions` is never empty in a written sample, and every other field
is null or empty in all samples of a run or in none, except where the input itself has no caption.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

from capfilt.sample import Caption, Sample

WEB_CAPTION = "web_caption"
WEB_KEPT = "web_kept"
SYNTHETIC = "synthetic_captions"
KEPT = "kept_captions"
# Parquet only: what `.txt` holds in the other formats, beside the input's caption column kept as it came.
PRIMARY = "primary_caption"
_FIXED_FIELDS = frozenset((WEB_CAPTION, WEB_KEPT, SYNTHETIC, KEPT, PRIMARY))
_WEB_SCORE = re.compile(r"web_([A-Za-z][A-Za-z0-9_]*)_score")
_SCORE = re.compile(r"([A-Za-z][A-Za-z0-9_]*)_score")


def web_score_field(name: str) -> str:
    return f"web_{name}_score"


def score_field(name: str) -> str:
    return f"{name}_score"


def score_names(sample: Sample) -> list[str]:
    """The names of the scores the sample's captions have, in the order they were computed."""
    names = dict.fromkeys(sample.web_scores)
    for caption in sample.synthetic_captions:
        names.update(dict.fromkeys(caption.scores))
    return list(names)


def is_capfilt_field(name: str) -> bool:
    """Whether a JSON field or column is one capfilt writes (rewritten on output, never kept as metadata)."""
    return name in _FIXED_FIELDS or (name.endswith("_score") and _WEB_SCORE.fullmatch(name) is not None)


def synthetic_type(scores: list[str]) -> pa.DataType:
    """Parquet type of a synthetic caption's record; `decoding` is a JSON string so that runs with other
    settings share one schema."""
    return pa.struct(
        [("text", pa.string()), ("count", pa.int64())]
        + [(score_field(name), pa.float64()) for name in scores]
        + [("kept", pa.bool_()), ("captioner", pa.string()), ("decoding", pa.string())]
    )


def arrow_fields(scores: list[str]) -> list[pa.Field]:
    """The Parquet columns capfilt adds, for a run whose captions have the scores `scores`."""
    return [
        pa.field(PRIMARY, pa.string()),
        pa.field(WEB_CAPTION, pa.string()),
        *(pa.field(web_score_field(name), pa.float64()) for name in scores),
        pa.field(WEB_KEPT, pa.bool_()),
        pa.field(SYNTHETIC, pa.list_(synthetic_type(scores))),
        pa.field(KEPT, pa.list_(pa.string())),
    ]


def kept_captions(sample: Sample) -> list[str]:
    """The captions the output keeps, each text once: those the keep rules kept (best first), then those no
    rule judged (in their order, web first); every caption when the run drops none (annotate mode). Never
    empty for a written sample, so that its JSON type is the same in every sample."""
    captions = sample.captions()
    rank = {text: index for index, text in enumerate(sample.ranking)}
    judged = sorted((c for c in captions if c.kept is not None), key=lambda c: rank.get(c.text, len(rank)))
    chosen = [c for c in judged if sample.keeps_every_caption or c.kept] + [c for c in captions if c.kept is None]
    return list(dict.fromkeys(c.text for c in chosen))


def primary_caption(sample: Sample, kept: list[str] | None = None) -> str | None:
    """The caption a `(jpg, txt)` loader sees: the first kept caption (the best one, or the web caption when
    nothing was judged); for a sample none of whose captions is kept, the web caption, else the first
    synthetic one. `kept` is `kept_captions(sample)` when the caller has it."""
    kept = kept_captions(sample) if kept is None else kept
    if kept:
        return kept[0]
    if sample.web_caption is not None:
        return sample.web_caption
    return sample.synthetic_captions[0].text if sample.synthetic_captions else None


def synthetic_record(caption: Caption) -> dict[str, Any]:
    """The documented JSON form of a synthetic caption (`synthetic_captions[i]`)."""
    return {
        "text": caption.text,
        "count": caption.count,
        **{score_field(name): value for name, value in caption.scores.items()},
        "kept": caption.kept,
        "captioner": caption.captioner,
        "decoding": caption.decoding,
    }


def capfilt_fields(sample: Sample, kept: list[str] | None = None) -> dict[str, Any]:
    """The fields capfilt adds to a sample's JSON (and Parquet columns), with `decoding` as a dict; `kept` is
    `kept_captions(sample)` when the caller has it."""
    return {
        WEB_CAPTION: sample.web_caption,
        **{web_score_field(name): value for name, value in sample.web_scores.items()},
        WEB_KEPT: sample.web_kept,
        SYNTHETIC: [synthetic_record(c) for c in sample.synthetic_captions],
        KEPT: kept_captions(sample) if kept is None else kept,
    }


def arrow_values(sample: Sample, scores: list[str]) -> dict[str, Any]:
    """`capfilt_fields` shaped for `arrow_fields(scores)`: every score column (null where the sample lacks the
    score), decoding settings as a JSON string, and the primary caption."""
    kept = kept_captions(sample)
    fields = {PRIMARY: primary_caption(sample, kept), **capfilt_fields(sample, kept)}
    for name in scores:
        fields.setdefault(web_score_field(name), None)
    fields[SYNTHETIC] = [
        {**{score_field(name): None for name in scores}, **record,
         "decoding": json.dumps(record["decoding"]) if record["decoding"] else None}
        for record in fields[SYNTHETIC]
    ]
    return fields


def restore_capfilt_fields(sample: Sample) -> None:
    """Move capfilt fields found in `sample.metadata` (output of an earlier run) back into the sample.

    The web caption recorded there wins over the reader's caption, since an earlier run may have replaced
    `.txt` with its primary caption. A score recorded as null is one the caption does not have (a Parquet
    column another sample filled), but for an image without web caption, where a run writes its scores null.
    """
    # Taken out of the metadata either way: the output writes capfilt's own fields under these names, so an
    # input's field that merely looks like one (`web_itm_score: "x"`) would otherwise be read back as a score.
    meta = {name: sample.metadata.pop(name) for name in [name for name in sample.metadata if is_capfilt_field(name)]}
    if WEB_CAPTION not in meta and SYNTHETIC not in meta:
        return  # not written by capfilt
    sample.web_caption = meta.get(WEB_CAPTION, sample.web_caption)
    sample.web_kept = meta.get(WEB_KEPT)
    for field, value in meta.items():
        match = _WEB_SCORE.fullmatch(field) if field.endswith("_score") else None
        if match and (value is not None or sample.web_caption is None):
            sample.web_scores[match.group(1)] = value
    for record in meta.get(SYNTHETIC) or []:
        decoding = record.get("decoding")
        if isinstance(decoding, str):
            decoding = json.loads(decoding)
        scores = {}
        for field, value in record.items():
            match = _SCORE.fullmatch(field) if field.endswith("_score") else None
            if match and value is not None:
                scores[match.group(1)] = value
        sample.synthetic_captions.append(Caption(
            text=record["text"], source="synthetic", scores=scores, kept=record.get("kept"),
            captioner=record.get("captioner"), decoding=decoding,
            count=record.get("count", 1),  # outputs written before captions were counted hold each text once
        ))
    ranking = meta.get(KEPT)
    sample.ranking = [text for text in ranking if isinstance(text, str)] if isinstance(ranking, list) else []


def sample_from_dropped_record(record: dict[str, Any]) -> Sample:
    """A dropped sample's captions and scores, as `NAME_dropped.jsonl` records them (no image)."""
    sample = Sample(record["key"], None, None, None, metadata=dict(record))
    restore_capfilt_fields(sample)
    sample.metadata.pop("key")
    return sample
