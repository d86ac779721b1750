"""The documented names under which capfilt writes captions and scores (README: "Schema").

Webdataset and files outputs put these fields in each sample's `.json` and the primary caption in `.txt`;
Parquet outputs put them in columns of the same names and the primary caption in `primary_caption`. Reading
them back (a `caption` run's output fed to `filter`) restores the same `Sample`.

Loaders that infer types from the first samples (Hugging Face `datasets` reads five) need each field to have
the same JSON type in every sample: `kept_captions` is never empty in a written sample, and every other field
is null or empty in all samples of a run or in none, except where the input itself has no caption.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from capfilt.sample import Caption, Sample

WEB_CAPTION = "web_caption"
WEB_ITM = "web_itm_score"
WEB_ITC = "web_itc_score"
WEB_KEPT = "web_kept"
SYNTHETIC = "synthetic_captions"
KEPT = "kept_captions"
CAPFILT_FIELDS = (WEB_CAPTION, WEB_ITM, WEB_ITC, WEB_KEPT, SYNTHETIC, KEPT)
# Parquet only: what `.txt` holds in the other formats, beside the input's caption column kept as it came.
PRIMARY = "primary_caption"

# Parquet type of each field; `decoding` is a JSON string so that runs with other settings share one schema.
SYNTHETIC_TYPE = pa.struct(
    [
        ("text", pa.string()),
        ("count", pa.int64()),
        ("itm_score", pa.float64()),
        ("itc_score", pa.float64()),
        ("kept", pa.bool_()),
        ("captioner", pa.string()),
        ("decoding", pa.string()),
    ]
)
ARROW_FIELDS = pa.schema(
    [
        (PRIMARY, pa.string()),
        (WEB_CAPTION, pa.string()),
        (WEB_ITM, pa.float64()),
        (WEB_ITC, pa.float64()),
        (WEB_KEPT, pa.bool_()),
        (SYNTHETIC, pa.list_(SYNTHETIC_TYPE)),
        (KEPT, pa.list_(pa.string())),
    ]
)


def kept_captions(sample: Sample) -> list[str]:
    """The captions the output keeps, each text once: those that passed the filter (best score first), then
    those no filter judged (in their order, web first); every caption when the filter drops none (annotate
    mode). Never empty for a written sample, so that its JSON type is the same in every sample."""
    captions = [c for c in sample.captions() if sample.keeps_every_caption or c.kept is not False]
    scored = sorted((c for c in captions if _is_scored(c)), key=_score_of, reverse=True)
    return list(dict.fromkeys(c.text for c in scored + [c for c in captions if not _is_scored(c)]))


def primary_caption(sample: Sample) -> str | None:
    """The caption a `(jpg, txt)` loader sees: the first kept caption (the best one, or the web caption when
    nothing was scored); for a sample none of whose captions is kept, the web caption, else the first
    synthetic one."""
    kept = kept_captions(sample)
    if kept:
        return kept[0]
    if sample.web_caption is not None:
        return sample.web_caption
    return sample.synthetic_captions[0].text if sample.synthetic_captions else None


def _is_scored(caption: Caption) -> bool:
    return caption.itm_score is not None or caption.itc_score is not None


def _score_of(caption: Caption) -> float:
    return caption.itm_score if caption.itm_score is not None else (caption.itc_score or 0.0)


def capfilt_fields(sample: Sample) -> dict[str, Any]:
    """The fields capfilt adds to a sample's JSON (and Parquet columns), with `decoding` as a dict."""
    return {
        WEB_CAPTION: sample.web_caption,
        WEB_ITM: sample.web_itm_score,
        WEB_ITC: sample.web_itc_score,
        WEB_KEPT: sample.web_kept,
        SYNTHETIC: [c.synthetic_record() for c in sample.synthetic_captions],
        KEPT: kept_captions(sample),
    }


def arrow_fields(sample: Sample) -> dict[str, Any]:
    """`capfilt_fields` shaped for `ARROW_FIELDS` (decoding settings as a JSON string), with the primary caption."""
    fields = {PRIMARY: primary_caption(sample), **capfilt_fields(sample)}
    fields[SYNTHETIC] = [
        {**record, "decoding": json.dumps(record["decoding"], sort_keys=True) if record["decoding"] else None}
        for record in fields[SYNTHETIC]
    ]
    return fields


def restore_capfilt_fields(sample: Sample) -> None:
    """Move capfilt fields found in `sample.metadata` (output of an earlier run) back into the sample.

    The web caption recorded there wins over the reader's caption, since an earlier run may have replaced
    `.txt` with its primary caption.
    """
    meta = sample.metadata
    if WEB_CAPTION in meta:
        sample.web_caption = meta[WEB_CAPTION]
    sample.set_web_scores(meta.get(WEB_ITM), meta.get(WEB_ITC), meta.get(WEB_KEPT))
    for record in meta.get(SYNTHETIC) or []:
        decoding = record.get("decoding")
        if isinstance(decoding, str):
            record = {**record, "decoding": json.loads(decoding)}
        sample.synthetic_captions.append(Caption.from_synthetic_record(record))
    for name in ARROW_FIELDS.names:  # the JSON fields and Parquet's `primary_caption`, rewritten on output
        meta.pop(name, None)


def sample_from_dropped_record(record: dict[str, Any]) -> Sample:
    """A dropped sample's captions and scores, as `NAME_dropped.jsonl` records them (no image)."""
    sample = Sample(record["key"], None, None, None, metadata=dict(record))
    restore_capfilt_fields(sample)
    sample.metadata.pop("key")
    return sample
