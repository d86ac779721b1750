"""Model families behind the captioner and filter interfaces, chosen from the checkpoint's `model_type`, or
from a `FAMILY:` prefix where the checkpoint has none (`open_clip:ViT-L-14/datacomp_xl_s13b_b90k`).

Importing a family module registers it (`capfilt.models.registry`); a new family is one module here and
one import below.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from capfilt.errors import ModelLoadError
from capfilt.log import logger
from capfilt.models import blip, blip2, clip, openclip, siglip, siglip2, vlm  # noqa: F401  (each registers its family)
from capfilt.models.base import Captioner, DecodingSettings, Filter
from capfilt.models.loading import load_pretrained
from capfilt.models.registry import CAPTIONERS, FILTERS

__all__ = ["Captioner", "DecodingSettings", "Filter", "captioner_family", "filter_family", "load_captioner",
           "load_filter"]


def _family(model_id: str, role: str, families: dict[str, type]) -> type:
    supported = ", ".join(sorted(families))
    prefix, separator, _ = model_id.partition(":")
    # Hub ids never hold a colon; a local path may, so a folder of that name wins.
    if separator and not Path(model_id).expanduser().exists():
        if prefix not in families:
            raise ModelLoadError(f"the {role} {model_id} names the family '{prefix}'; capfilt supports: {supported}")
        return families[prefix]
    model_type = load_pretrained(AutoConfig, model_id, role).model_type
    if model_type not in families:
        raise ModelLoadError(f"the {role} {model_id} is a '{model_type}' model; capfilt supports: {supported}")
    return families[model_type]


def captioner_family(model_id: str) -> type[Captioner]:
    """The family class of a captioner checkpoint, from its config alone (no weights load)."""
    return _family(model_id, "captioner", CAPTIONERS)


def filter_family(model_id: str) -> type[Filter]:
    """The family class of a filter checkpoint, from its config alone: its declared scores and defaults."""
    return _family(model_id, "filter", FILTERS)


def load_captioner(
    model_id: str, settings: DecodingSettings, device: str, dtype: torch.dtype, sdpa: bool = True
) -> Captioner:
    family = captioner_family(model_id)
    logger.info("loading the captioner %s on %s (%s)", model_id, device, dtype_name(dtype))
    return family(model_id, settings, device, dtype, sdpa=sdpa)


def load_filter(model_id: str, device: str, dtype: torch.dtype, sdpa: bool = True) -> Filter:
    family = filter_family(model_id)
    logger.info("loading the filter %s on %s (%s)", model_id, device, dtype_name(dtype))
    return family(model_id, device, dtype, sdpa=sdpa)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
