"""Which family handles a checkpoint, by its config's `model_type`; each family registers itself beside its
code (as timm's `@register_model` does), and `capfilt.models` imports the family modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from capfilt.models.base import Captioner, Filter

CAPTIONERS: dict[str, type[Captioner]] = {}
FILTERS: dict[str, type[Filter]] = {}

_Family = TypeVar("_Family", bound=type)


def register_captioner(*model_types: str) -> Callable[[_Family], _Family]:
    def register(cls: _Family) -> _Family:
        for model_type in model_types:
            CAPTIONERS[model_type] = cls
        return cls

    return register


def register_filter(*model_types: str) -> Callable[[_Family], _Family]:
    def register(cls: _Family) -> _Family:
        for model_type in model_types:
            FILTERS[model_type] = cls
        return cls

    return register
