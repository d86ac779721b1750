"""transformers' PIL image processors by family, across the releases capfilt supports.

The tiny demo checkpoints save PIL image processors, which load without torchvision. From transformers 5.24 a
family's PIL processor is `{Family}ImageProcessorPil` (`{Family}ImageProcessor` became the torchvision one);
before, `{Family}ImageProcessor` is the PIL one.
"""

from __future__ import annotations

import transformers
from transformers.image_processing_utils import BaseImageProcessor


def pil_image_processor(family: str) -> type[BaseImageProcessor]:
    """The PIL image processor class of `family` (the class-name prefix: "Blip", "CLIP", "Siglip2", ...)."""
    return getattr(transformers, f"{family}ImageProcessorPil", None) or getattr(transformers, f"{family}ImageProcessor")
