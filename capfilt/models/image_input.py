"""The image side every transformers family shares: preprocessing as the checkpoint's own image processor does
it (one image at a time, in the decode workers; through capfilt's exact table-driven path where it covers the
processor's settings), the copy to the device, and the probe picture the fast-path checks use."""

from __future__ import annotations

import functools
import json

import torch
import transformers
from PIL import Image

from capfilt.errors import ModelLoadError, one_line
from capfilt.models.base import ImageModel
from capfilt.models.fast_paths import probe_picture
from capfilt.models.preprocess import Preprocess, choose_preprocess, processor_preprocess


class ProcessorImageInput(ImageModel):
    """Preprocessing as the checkpoint's own image processor does it, one image at a time (in the decode
    workers); through capfilt's exact table-driven path where it covers the processor's settings."""

    role: str
    processor: transformers.ProcessorMixin
    device: torch.device
    dtype: torch.dtype

    @functools.cached_property
    def preprocessing(self) -> str:
        return json.dumps(self.processor.image_processor.to_dict(), sort_keys=True, default=str)

    @functools.cached_property
    def _preprocess(self) -> Preprocess:
        return choose_preprocess(self.processor.image_processor, self.role, self.model_id)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)

    def to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned, so that the copy overlaps work already queued on the GPU
            pixels = pixels.pin_memory()
        return pixels.to(self.device, non_blocking=True).to(self.dtype)

    def probe_pixels(self) -> torch.Tensor:
        """The probe picture as the library's processor prepares it, a batch of one, on the CPU."""
        return processor_preprocess(self.processor.image_processor)(probe_picture())[None]

    def unusable(self, error: Exception) -> ModelLoadError:
        """The library's own path failed on the probe: nothing capfilt can fall back to."""
        return ModelLoadError(f"the {self.role} {self.model_id} fails on a probe picture with transformers "
                              f"{transformers.__version__}: {one_line(error)}")
