"""Image preprocessing equal to a checkpoint's Hugging Face image processor, bit for bit, at a fraction of its cost.

transformers' PIL image processor turns each picture into a numpy array, back into a PIL image to resize it,
then into float64 and float32 arrays to rescale and normalise it: most of its time is conversions, under the
GIL. Rescaling and normalising map each 8-bit channel value to one float, so they are a 256-entry table per
channel, built with the processor's own arithmetic; resizing is the same PIL call on the decoded picture.
`fast_preprocess` returns this path only for the settings it covers, and checks it on a probe picture
against the processor; `choose_preprocess` keeps the processor wherever the table is not exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from capfilt.models.fast_paths import FastPathMismatch, checked, probe_picture

Preprocess = Callable[[Image.Image], torch.Tensor]


def processor_preprocess(image_processor) -> Preprocess:
    """The processor itself, one picture at a time."""
    return lambda image: image_processor(images=[image], return_tensors="pt")["pixel_values"][0]


def choose_preprocess(image_processor, role: str, model_id: str) -> Preprocess:
    """The table-driven path where it covers the processor and gives its tensor on the probe, else the processor."""
    fast: Preprocess | None = None

    def check() -> None:
        nonlocal fast
        fast = fast_preprocess(image_processor)

    checked("table-driven preprocessing", role, model_id, check)
    return fast or processor_preprocess(image_processor)


def is_pil_blip_processor(image_processor) -> bool:
    """BLIP's PIL image processor: `BlipImageProcessorPil` from transformers 5.24 on, `BlipImageProcessor`
    before; not the torchvision one (its resize differs from PIL's, so the table would never match it)."""
    classes = [cls.__name__ for cls in type(image_processor).__mro__]
    torchvision = {"TorchvisionBackend", "BaseImageProcessorFast"} & set(classes)
    return classes[0] in ("BlipImageProcessorPil", "BlipImageProcessor") and not torchvision


def fast_preprocess(image_processor) -> Preprocess | None:
    """A table-driven equivalent of `image_processor` for RGB pictures; None for settings it does not cover.
    Raises `FastPathMismatch` where it covers them but does not give the processor's tensor on a probe."""
    # Imported here: a release that moves them turns this fast path off instead of breaking capfilt's import.
    from transformers.image_transforms import normalize, rescale
    from transformers.image_utils import ChannelDimension

    p = image_processor
    size = getattr(p, "size", None) or {}
    covered = (
        is_pil_blip_processor(p)
        and p.do_resize
        and p.do_rescale
        and p.do_normalize
        and not getattr(p, "do_center_crop", False)
        and not getattr(p, "do_pad", False)
        and size.get("height")
        and size.get("width")
    )
    if not covered:
        return None
    values = np.arange(256, dtype=np.uint8).reshape(1, 1, 256).repeat(3, axis=0)  # (channel, 1, value)
    scaled = rescale(values, p.rescale_factor, input_data_format=ChannelDimension.FIRST)
    table = normalize(scaled, p.image_mean, p.image_std, input_data_format=ChannelDimension.FIRST)
    table = torch.from_numpy(np.ascontiguousarray(table.reshape(3, 256)))
    width, height, resample = size["width"], size["height"], p.resample

    def preprocess(image: Image.Image) -> torch.Tensor:
        resized = torch.from_numpy(np.array(image.resize((width, height), resample=resample)))
        channels = resized.permute(2, 0, 1).reshape(3, -1).long()
        return table.gather(1, channels).view(3, height, width)

    probe = probe_picture()
    if not torch.equal(preprocess(probe), processor_preprocess(p)(probe)):
        raise FastPathMismatch("its pixels differ from the image processor's on a probe picture")
    return preprocess
