"""What a VLM captioner's batch of pictures costs before the model: preprocess and collate, bytes and time.

    python benchmarks/vlm_batch.py [--batch-size 32] [--repeats 5]

A VLM's pictures keep their own size (`VlmCaptioner.preprocess`), and `collate` pads a batch to its largest
picture. The baseline pads every picture to the family's whole canvas, as capfilt did before: for Qwen2-VL at
its default max_pixels (12845056) a 3584-pixel square. Both run on the same pictures of img2dataset's usual
sizes, through a tiny random Qwen2.5-VL whose processor has Qwen's default max_pixels (the canvas depends on the
processor alone, not the model's size). Needs torchvision (Qwen's processor holds a video processor).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from capfilt.demo.tiny_vlms import build_tiny_qwen2_vl
from capfilt.models import load_captioner
from capfilt.models.base import DecodingSettings
from capfilt.models.vlm import VlmCaptioner

QWEN_DEFAULT_MAX_PIXELS = 12845056
# img2dataset's usual output sizes (--image_size 256, 384, 512; resize_mode keep_ratio), landscape and portrait.
SIZES = [(256, 384), (384, 256), (384, 512), (512, 384), (256, 256), (512, 512)]


def whole_canvas(captioner: VlmCaptioner, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The baseline: every picture top-left in a canvas of the family's whole size."""
    canvases = torch.zeros(len(tensors), 4, captioner.height, captioner.width, dtype=torch.uint8)
    for canvas, picture in zip(canvases, tensors):
        canvas[:, : picture.shape[1], : picture.shape[2]] = picture
    return canvases


def timed(make: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    make()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        batch = make()
        times.append(time.perf_counter() - start)
    return statistics.median(times), batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        model = build_tiny_qwen2_vl(Path(folder) / "qwen", 0, version="qwen2_5_vl", max_pixels=QWEN_DEFAULT_MAX_PIXELS)
        captioner = load_captioner(str(model), DecodingSettings(num_beams=1), "cpu", torch.float32)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
                for height, width in (SIZES[i % len(SIZES)] for i in range(args.batch_size))]
    runs = {
        "whole canvas (before)": lambda: whole_canvas(captioner, [captioner.preprocess(p) for p in pictures]),
        "batch's largest picture": lambda: captioner.preprocess_all(pictures),
    }
    print(f"{args.batch_size} pictures of {sorted(set(SIZES))}, Qwen2.5-VL canvas {captioner.height} x "
          f"{captioner.width}, median of {args.repeats}, one thread")
    results = {}
    for name, make in runs.items():
        seconds, batch = timed(make, args.repeats)
        results[name] = seconds, batch.numel() * batch.element_size()
        print(f"{name:>24}: {tuple(batch.shape)}, {results[name][1] / 1e6:8.1f} MB, {seconds * 1000:7.1f} ms")
        assert [picture.size for picture in captioner.pictures(batch)] == [picture.size for picture in pictures]
    (before_s, before_b), (after_s, after_b) = results.values()
    print(f"{'ratio':>24}: {before_b / after_b:.0f}x fewer bytes, {before_s / after_s:.0f}x faster")


if __name__ == "__main__":
    main()
