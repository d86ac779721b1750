"""Model families behind the captioner and filter interfaces, chosen from the checkpoint's `model_type`."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from capfilt.errors import ModelLoadError
from capfilt.log import logger
from capfilt.models.base import Captioner, CaptionScores, DecodingSettings, Filter
from capfilt.models.blip import BlipCaptioner, BlipFilter
from capfilt.models.loading import load_pretrained

CAPTIONERS: dict[str, type[Captioner]] = {"blip": BlipCaptioner}
FILTERS: dict[str, type[Filter]] = {"blip": BlipFilter}

__all__ = ["CaptionScores", "Captioner", "DecodingSettings", "Filter", "check_models", "load_captioner", "load_filter"]


def model_family(model_id: str, role: str, families: dict) -> str:
    model_type = load_pretrained(AutoConfig, model_id, role).model_type
    if model_type not in families:
        raise ModelLoadError(
            f"the {role} {model_id} is a '{model_type}' model; capfilt supports: {', '.join(sorted(families))}"
        )
    return model_type


def load_captioner(
    model_id: str, settings: DecodingSettings, device: str, dtype: torch.dtype, sdpa: bool = True
) -> Captioner:
    family = model_family(model_id, "captioner", CAPTIONERS)
    logger.info("loading the captioner %s on %s (%s)", model_id, device, dtype_name(dtype))
    return CAPTIONERS[family](model_id, settings, device, dtype, sdpa=sdpa)


def load_filter(model_id: str, device: str, dtype: torch.dtype, text_max_tokens: int, sdpa: bool = True) -> Filter:
    family = model_family(model_id, "filter", FILTERS)
    logger.info("loading the filter %s on %s (%s)", model_id, device, dtype_name(dtype))
    return FILTERS[family](model_id, device, dtype, text_max_tokens, sdpa=sdpa)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_models(captioner: str | None, filter_: str | None) -> None:
    """That the models exist and are of a supported family (their configs only), for a process that will
    not load them itself but hand them to workers."""
    if captioner:
        model_family(captioner, "captioner", CAPTIONERS)
    if filter_:
        model_family(filter_, "filter", FILTERS)
