"""capfilt against the plain transformers loop, on the same random-weight BLIP models and the same images.

    python benchmarks/bench.py --size tiny|base|large [--device cpu|cuda] [--dtype auto|fp32|bf16|fp16]
        [--images-small N --images-large M] [--num-beams 3] [--batch-size B] [--image-size 384] [--models-dir DIR]
        [--threads T] [--seed S]

In one process: (a) the loop a transformers user writes, one image at a time in fp32: ITM of the web caption,
a beam-search caption primed with "a picture of ", ITM of that caption (three vision passes per image);
(b) on GPU only, the same loop batched in --dtype, as LAVIS-style scripts do; (c) `capfilt caption`, `filter`
and `bootstrap` through the entry point `capfilt.run` on a webdataset shard of the same images. Each is timed on
N and on M images and costs (t_M - t_N) / (M - N) per image, so start-up cancels out (capfilt's model loading
is not timed: it varies by seconds from run to run; capfilt's time starts when its observer hears the run start).
capfilt's parts are timed by wrapping its stage, format and model classes for the length of a run.

Threads: by default each method runs as a user runs it, the plain loop with torch's default thread count and
capfilt with its own default (on CPU, the cores split between its model stages); `--threads T` gives the plain
loop T torch threads and each of capfilt's model stages T.

Exits 1 when capfilt ran in fp32 and its beam captions differ from the plain loop's or an ITM score differs
from the plain loop's by more than 1e-4 (in bf16/fp16 agreement is reported, not checked).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import random
import resource
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import webdataset
from PIL import Image
from transformers import (
    AutoProcessor,
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
)
from transformers.utils import logging as transformers_logging

import capfilt
from capfilt import stages
from capfilt.config import DTYPES, Command, FilterMode
from capfilt.demo import shapes, tiny_blip
from capfilt.formats.webdataset import WebDatasetFormat
from capfilt.models.image_input import ProcessorImageInput
from capfilt.observer import Observer
from capfilt.sample import Sample
from capfilt.threads import model_stage_threads

PROMPT = "a picture of "
MAX_LENGTH, MIN_LENGTH = 30, 10
ITM_TOKENS = 35  # BLIP's ITM text length, capfilt's BlipFilter.text_max_tokens
# The commands timed (select runs no model).
MODEL_COMMANDS = (Command.caption, Command.filter, Command.bootstrap)
BERT_VOCAB = 30524  # BERT's 30522 tokens + BLIP's [DEC] and [ENC]
ITM_TOLERANCE = 1e-4
BACKGROUND_PARTS = ("read", "decode", "resize")  # in capfilt, overlapping the models
# Dense datasheet peaks (FLOP/s): bf16/fp16 tensor cores, and fp32 without TF32 (torch's default for matmuls).
# The first name contained in torch.cuda.get_device_name wins; other devices get a measured matmul.
GPU_PEAKS = (("H200", 989e12, 67e12), ("H100 PCIe", 756e12, 51e12), ("H100", 989e12, 67e12),
             ("A100", 312e12, 19.5e12), ("L4", 121e12, 30e12))


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- models -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    """A BLIP checkpoint's vision tower (ViT); its text towers are always BERT-base cross-attending to it."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int = 384
    patch_size: int = 16


# Salesforce/blip-*-base and blip-*-large; "tiny" is tiny_blip.Architecture(), the demo models' size.
SIZES = {"base": Size(768, 12, 12), "large": Size(1024, 24, 16)}


def bert_size_tokenizer() -> BertTokenizerFast:
    """A word-level BERT tokenizer of BLIP's vocabulary size (tiny_blip's specials, [DEC] and words, then
    fillers), so that the embeddings and the LM head, and so their cost, are BLIP's."""
    tokens = tiny_blip.vocabulary()
    tokens += [f"tok{i:05d}" for i in range(1, BERT_VOCAB - len(tokens) + 1)]
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, bos_token="[DEC]", model_max_length=512)


def blip_config(size: Size, tokenizer: BertTokenizerFast) -> BlipConfig:
    text = BlipTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=512, encoder_hidden_size=size.vision_hidden,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    vision = BlipVisionConfig(
        hidden_size=size.vision_hidden, intermediate_size=4 * size.vision_hidden,
        num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
        image_size=size.image_size, patch_size=size.patch_size,
    )
    return BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), image_text_hidden_size=256,
                      projection_dim=512)


def build_models(size_name: str, directory: Path, seed: int) -> tuple[Path, Path]:
    """Save a seeded random-weight captioner and filter of `size_name` under `directory`, or reuse saved ones."""
    captioner_dir, filter_dir = directory / size_name / "captioner", directory / size_name / "filter"
    if (captioner_dir / "config.json").exists() and (filter_dir / "config.json").exists():
        log(f"reusing the models in {directory / size_name}")
        return captioner_dir, filter_dir
    log(f"building random-weight {size_name} models in {directory / size_name}")
    if size_name == "tiny":
        tiny_blip.save(*tiny_blip.new_captioner(tiny_blip.Architecture(), seed), captioner_dir)
        tiny_blip.save(*tiny_blip.new_filter(tiny_blip.Architecture(), seed + 1), filter_dir)
        return captioner_dir, filter_dir
    size = SIZES[size_name]
    image_processor = tiny_blip.build_processor(tiny_blip.Architecture(image_size=size.image_size)).image_processor
    processor = BlipProcessor(image_processor=image_processor, tokenizer=bert_size_tokenizer())
    config = blip_config(size, processor.tokenizer)
    roles = ((BlipForConditionalGeneration, captioner_dir, 0), (BlipForImageTextRetrieval, filter_dir, 1))
    for cls, path, offset in roles:
        with torch.random.fork_rng():
            torch.manual_seed(seed + offset)
            model = cls(config)
        tiny_blip.save(model.eval(), processor, path)
        del model
    return captioner_dir, filter_dir


# --- data ---------------------------------------------------------------------------------------------------

Item = tuple[str, bytes, str]  # key, JPEG bytes, web caption


def make_items(count: int, side: int, seed: int) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for index in range(count):
        scene = shapes.random_scene(rng)
        buffer = io.BytesIO()
        shapes.render(scene, side).save(buffer, "JPEG", quality=90)
        items.append((f"{index:09d}", buffer.getvalue(), shapes.describe(scene)))
    return items


def write_shard(directory: Path, items: list[Item]) -> Path:
    directory.mkdir(parents=True)
    with webdataset.TarWriter(str(directory / "00000.tar")) as tar:
        for key, data, caption in items:
            meta = json.dumps({"key": key, "caption": caption, "status": "success"}).encode()
            tar.write({"__key__": key, "jpg": data, "txt": caption.encode(), "json": meta})
    return directory


# --- timing -------------------------------------------------------------------------------------------------


class Timers:
    """Seconds per named part. Parts nest: a model stage's seconds include its resizing and vision passes."""

    def __init__(self, cuda: bool) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = cuda
        self.lock = threading.Lock()  # capfilt's decode workers time their resizing from several threads

    def sync(self) -> None:
        if self.cuda:  # GPU work is asynchronous: wait for it, or its time lands in whatever syncs next
            torch.cuda.synchronize()

    def wrap(self, name: str, fn: Callable, sync: bool = True) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if sync:
                    self.sync()
                with self.lock:
                    self.seconds[name] += time.perf_counter() - start

        return timed

    def iterate(self, name: str, items: Iterable) -> Iterator:
        """`items`, timing only the time spent producing each one."""
        iterator = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                self.seconds[name] += time.perf_counter() - start
            yield item

    def hook(self, name: str, module: torch.nn.Module) -> None:
        """Time every forward of `module` (hooks must return None, or they would replace its inputs/outputs)."""
        starts: list[float] = []

        def before(*_: Any) -> None:
            self.sync()
            starts.append(time.perf_counter())

        def after(*_: Any) -> None:
            self.sync()
            self.seconds[name] += time.perf_counter() - starts.pop()

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def time_preprocess(self, name: str, processor: Any) -> None:
        """Time the image processor's resize + normalise: `image_processor(...)` calls `self.preprocess`."""
        image_processor = processor.image_processor
        image_processor.preprocess = self.wrap(name, image_processor.preprocess, sync=False)


@dataclass
class Run:
    seconds: float
    parts: dict[str, float]


@dataclass
class Method:
    name: str
    dtype: torch.dtype
    small: Run
    large: Run
    flops: float  # per image, estimated
    memory: str
    background_io: bool  # read and decode run in a background thread, overlapping the models

    def per_image(self, count: int) -> float:
        return (self.large.seconds - self.small.seconds) / count

    def rate(self, count: int) -> float:
        """Images per second; nan when noise made the large run no slower than the small one."""
        per_image = self.per_image(count)
        return 1 / per_image if per_image > 0 else float("nan")

    def split(self, count: int) -> dict[str, float]:
        """Seconds per image by part; model stages less the resizing (plain loop) and vision passes inside them."""
        p = defaultdict(float, {k: (self.large.parts.get(k, 0.0) - self.small.parts.get(k, 0.0)) / count
                                for k in {*self.large.parts, *self.small.parts}})
        inline_resize = 0.0 if self.background_io else 1.0  # capfilt resizes in its decode workers
        split = {
            "read": p["read"],
            "decode": p["decode"],
            "resize": sum(seconds for part, seconds in p.items() if part.startswith("resize")),
            "vision": p["vision:caption"] + p["vision:filter"],
            "decoding": p["caption"] - p["vision:caption"] - inline_resize * p["resize:caption"],
            "ITM": p["filter"] - p["vision:filter"] - inline_resize * p["resize:filter"],
            "write": p["write"],
        }
        inline = [k for k in split if not (self.background_io and k in BACKGROUND_PARTS)]
        split["other"] = self.per_image(count) - sum(split[k] for k in inline)
        return split


# --- (a) and (b): the plain loop ----------------------------------------------------------------------------


@dataclass
class LoopResult:
    captions: dict[str, str]
    web_itm: dict[str, float]
    synthetic_itm: dict[str, float]


class PlainLoop:
    """What a transformers user writes: processor + BlipForImageTextRetrieval for ITM, processor +
    BlipForConditionalGeneration.generate for the caption. batch_size 1 is the one-image-at-a-time loop."""

    def __init__(self, captioner_dir: Path, filter_dir: Path, device: torch.device, dtype: torch.dtype,
                 num_beams: int) -> None:
        self.device, self.dtype, self.num_beams = device, dtype, num_beams
        self.caption_processor = AutoProcessor.from_pretrained(captioner_dir)
        self.captioner = BlipForConditionalGeneration.from_pretrained(captioner_dir, dtype=dtype).to(device).eval()
        self.itm_processor = AutoProcessor.from_pretrained(filter_dir)
        self.itm_model = BlipForImageTextRetrieval.from_pretrained(filter_dir, dtype=dtype).to(device).eval()
        self.timers = Timers(device.type == "cuda")
        # The same part names as capfilt's stages ("caption", "filter"), so that both split alike.
        self.timers.hook("vision:caption", self.captioner.vision_model)
        self.timers.hook("vision:filter", self.itm_model.vision_model)
        self.timers.time_preprocess("resize:caption", self.caption_processor)
        self.timers.time_preprocess("resize:filter", self.itm_processor)
        self.caption = self.timers.wrap("caption", self._caption)
        self.itm = self.timers.wrap("filter", self._itm)
        self.decode = self.timers.wrap("decode", lambda data: Image.open(io.BytesIO(data)).convert("RGB"), sync=False)
        self.sequence_lengths: list[int] = []  # generated sequences, prompt included, for the FLOP estimate
        self.text_lengths: list[int] = []  # ITM texts, in tokens

    def _inputs(self, processor: BlipProcessor, images: list[Image.Image], texts: list[str], **kwargs: Any) -> dict:
        inputs = processor(images=images, text=texts, return_tensors="pt", **kwargs).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    @torch.no_grad()
    def _caption(self, images: list[Image.Image]) -> list[str]:
        inputs = self._inputs(self.caption_processor, images, [PROMPT] * len(images))
        out = self.captioner.generate(**inputs, num_beams=self.num_beams, max_length=MAX_LENGTH,
                                      min_length=MIN_LENGTH, repetition_penalty=1.0)
        self.sequence_lengths += [out.shape[1]] * len(images)
        texts = self.caption_processor.batch_decode(out, skip_special_tokens=True)
        return [t[len(PROMPT.strip()):].strip() for t in texts]  # BLIP strips the prompt so

    @torch.no_grad()
    def _itm(self, images: list[Image.Image], texts: list[str]) -> list[float]:
        inputs = self._inputs(self.itm_processor, images, texts, padding=True, truncation=True, max_length=ITM_TOKENS)
        self.text_lengths += inputs["attention_mask"].sum(dim=1).tolist()
        logits = self.itm_model(**inputs, use_itm_head=True).itm_score
        return logits.float().softmax(dim=-1)[:, 1].tolist()

    def run(self, items: list[Item], batch_size: int) -> tuple[Run, LoopResult]:
        self.timers.seconds.clear()
        result = LoopResult({}, {}, {})
        start = time.perf_counter()
        for first in range(0, len(items), batch_size):
            chunk = items[first : first + batch_size]
            keys = [key for key, _, _ in chunk]
            images = [self.decode(data) for _, data, _ in chunk]
            web = self.itm(images, [caption for _, _, caption in chunk])
            captions = self.caption(images)
            synthetic = self.itm(images, captions)
            result.captions.update(zip(keys, captions))
            result.web_itm.update(zip(keys, web))
            result.synthetic_itm.update(zip(keys, synthetic))
        return Run(time.perf_counter() - start, dict(self.timers.seconds)), result


# --- (c): capfilt -------------------------------------------------------------------------------------------


class RunClock(Observer):
    """When the run starts: after its models have loaded and its output is prepared."""

    def __init__(self) -> None:
        self.started: float | None = None

    def run_started(self, total_shards: int) -> None:
        self.started = time.perf_counter()


def run_capfilt(command: Command, input: Path, output: Path, **options: Any) -> tuple[Run, dict[str, Sample]]:
    """One `capfilt.run` with its parts timed, model loading not included (it varies by seconds from run to run
    on a busy machine, and would not cancel out in t_M - t_N); returns what it wrote."""
    timers = Timers(str(options.get("device", "")).startswith("cuda"))
    written: dict[str, Sample] = {}
    clock = RunClock()
    with instrumented(timers, written):
        capfilt.run(str(input), str(output), command=command.value, observer=clock, **options)
    seconds = time.perf_counter() - clock.started
    release_memory()
    return Run(seconds, dict(timers.seconds)), written


def wrapped(timers: Timers, name: str, method: Callable, sync: bool = True) -> Callable:
    """`method` (a function defined on a class) timed under `name`."""

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        return timers.wrap(name, functools.partial(method, self), sync=sync)(*args, **kwargs)

    return timed


@contextlib.contextmanager
def instrumented(timers: Timers, written: dict[str, Sample]) -> Iterator[None]:
    """For the length of a run: time capfilt's parts by wrapping the classes it runs (stages, the webdataset
    format, the BLIP models' preprocessing), and keep every sample it writes in `written`. Model stages are
    named as the plain loop's parts: "caption", and "filter" for the scores and the keep rules."""
    read_shard, open_writer = WebDatasetFormat.read_shard, WebDatasetFormat.open_writer

    def timed_read(self: WebDatasetFormat, *args: Any, **kwargs: Any) -> Iterator:
        return timers.iterate("read", read_shard(self, *args, **kwargs))

    def timed_writer(self: WebDatasetFormat, *args: Any, **kwargs: Any) -> Any:
        writer = open_writer(self, *args, **kwargs)
        write = timers.wrap("write", writer.write, sync=False)

        def keep_and_write(sample: Sample) -> None:
            written[sample.key] = sample
            write(sample)

        writer.write = keep_and_write
        return writer

    def hooking(init: Callable, name: str, model_of: Callable[[Any], Any]) -> Callable:
        """A stage's `__init__` that also times its model's vision passes."""

        def init_and_hook(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            timers.hook(f"vision:{name}", model_of(self).model.vision_model)

        return init_and_hook

    patches = [
        (WebDatasetFormat, "read_shard", timed_read),
        (WebDatasetFormat, "open_writer", timed_writer),
        # in the decode workers, one call per distinct preprocessing
        (ProcessorImageInput, "preprocess", wrapped(timers, "resize", ProcessorImageInput.preprocess, sync=False)),
        (stages.DecodeStage, "process", wrapped(timers, "decode", stages.DecodeStage.process, sync=False)),
        (stages.CaptionStage, "process", wrapped(timers, "caption", stages.CaptionStage.process)),
        (stages.ScoreStage, "process", wrapped(timers, "filter", stages.ScoreStage.process)),
        (stages.KeepStage, "process", wrapped(timers, "filter", stages.KeepStage.process)),
        (stages.CaptionStage, "__init__", hooking(stages.CaptionStage.__init__, "caption", lambda s: s.captioner)),
        (stages.ScoreStage, "__init__", hooking(stages.ScoreStage.__init__, "filter", lambda s: s.filter)),
    ]
    with contextlib.ExitStack() as stack:
        for owner, name, replacement in patches:
            stack.enter_context(mock.patch.object(owner, name, replacement))
        yield


# --- FLOPs and peaks ----------------------------------------------------------------------------------------


def parameters(module: torch.nn.Module, keep: Callable[[str], bool] = lambda name: True) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if keep(name))


def vision_flops(model: BlipForConditionalGeneration | BlipForImageTextRetrieval) -> tuple[float, int]:
    """FLOPs of one image's vision pass, and its token count: 2 * params * tokens (each weight is one
    multiply-add per token) + 4 * layers * tokens^2 * width (attention scores QK^T and mixing AV)."""
    c = model.config.vision_config
    tokens = (c.image_size // c.patch_size) ** 2 + 1
    return 2 * parameters(model.vision_model) * tokens + 4 * c.num_hidden_layers * tokens**2 * c.hidden_size, tokens


def text_flops(module: torch.nn.Module, text_tokens: float, image_tokens: int, lm_head: bool) -> float:
    """FLOPs of one text pass over `text_tokens` cross-attending to `image_tokens`:
    2 * (params - embeddings - cross-attention K/V) * text_tokens + 2 * cross K/V params * image_tokens
    (K/V project the image tokens, once: generate caches them) + 4 * layers * width * text * (text + image)
    attention, + 2 * vocab * width * text_tokens for the LM head (tied to the embeddings, so not in params).
    Also used for a whole beam search: tokens = the final sequence length (the KV cache makes each step one
    token), which counts self-attention twice: it is small at 30 tokens."""
    config = module.config
    cross_kv = parameters(module, lambda n: ".crossattention.self.key." in n or ".crossattention.self.value." in n)
    per_token = parameters(module) - cross_kv - parameters(module, lambda n: "embeddings" in n)
    if lm_head:
        per_token += config.vocab_size * config.hidden_size
    attention = 4 * config.num_hidden_layers * config.hidden_size * text_tokens * (text_tokens + image_tokens)
    return 2 * per_token * text_tokens + 2 * cross_kv * image_tokens + attention


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def measured_peak(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of a large square matmul: what this device's GEMM reaches, used as its peak."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(11):  # the first is a warm-up
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


@functools.cache
def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The device's peak FLOP/s in `dtype` (datasheet for known GPUs, else measured) and where it comes from."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    match = next((peaks for peaks in GPU_PEAKS if peaks[0] in name), None)
    if match:
        return (match[2] if dtype == torch.float32 else match[1]), f"{name} datasheet"
    return measured_peak(device, dtype), "measured square matmul, best of 10"


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB*"  # Linux: KiB; process-wide


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- main ---------------------------------------------------------------------------------------------------


def settle_device_and_sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The defaults that depend on the device, checked: --dtype auto (bf16 on GPU, fp32 on CPU), --batch-size
    (32 on GPU, 8 on CPU) and N, M (one and three batches). Shared by the benchmarks."""
    args.device = torch.device(args.device)
    if args.dtype == "auto":
        args.dtype = "bf16" if args.device.type == "cuda" else "fp32"
    if args.dtype not in DTYPES:
        parser.error(f"--dtype: one of auto, {', '.join(DTYPES)}")
    args.batch_size = args.batch_size or (32 if args.device.type == "cuda" else 8)
    args.images_small = args.images_small or args.batch_size
    args.images_large = args.images_large or 3 * args.batch_size
    if not 0 < args.images_small < args.images_large:
        parser.error("need 0 < --images-small < --images-large")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", *SIZES], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="of (b), (c): auto (CPU fp32, GPU bf16), fp32, bf16, fp16")
    parser.add_argument("--images-small", type=int, help="N (default: the batch size)")
    parser.add_argument("--images-large", type=int, help="M (default: 3 x the batch size)")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--batch-size", type=int, help="of (b) and (c) (default: 32 on GPU, 8 on CPU)")
    parser.add_argument("--image-size", type=int, default=384, help="side of the generated JPEGs, in pixels")
    parser.add_argument("--models-dir", type=Path, help="where to save the models, and reuse them from next time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads of the plain loop and of each capfilt model "
                        "stage (default: each one's own default)")
    args = parser.parse_args(argv)
    settle_device_and_sizes(parser, args)
    if args.images_small % args.batch_size or args.images_large % args.batch_size:
        # With a partial batch, t_M - t_N also holds the difference between two batch sizes' efficiency.
        log("note: N and M are not multiples of the batch size; batched per-image costs are then approximate")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # this thread's: the plain loop's (capfilt's stages get it as an option)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="capfilt-bench-") as workdir:  # shards, outputs, unsaved models
        return benchmark(args, Path(workdir))


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    device, dtype = args.device, DTYPES[args.dtype]
    n_small, n_large = args.images_small, args.images_large
    count = n_large - n_small
    captioner_dir, filter_dir = build_models(args.size, args.models_dir or workdir / "models", args.seed)

    items = make_items(n_large, args.image_size, args.seed)
    shards = {n: write_shard(workdir / f"input-{n}", items[:n]) for n in (n_small, n_large)}
    methods: list[Method] = []

    # (a) the plain loop, fp32, one image at a time; its models also give the FLOP estimates.
    log(f"(a) plain loop: warm-up, {n_small} and {n_large} images")
    plain = PlainLoop(captioner_dir, filter_dir, device, torch.float32, args.num_beams)
    plain.run(items[:1], 1)
    reset_peak_memory(device)
    small, _ = plain.run(items[:n_small], 1)
    large, reference = plain.run(items, 1)
    vision, image_tokens = vision_flops(plain.captioner)
    sequence = mean(plain.sequence_lengths)
    generate = args.num_beams * text_flops(plain.captioner.text_decoder, sequence, image_tokens, True)
    itm, itm_padded = (text_flops(plain.itm_model.text_encoder, tokens, image_tokens, False)
                       for tokens in (mean(plain.text_lengths), ITM_TOKENS))  # capfilt pads ITM texts to 35
    plain_flops = 3 * vision + generate + 2 * itm
    memory = peak_memory(device)
    methods.append(Method("plain loop, fp32, 1 by 1", torch.float32, small, large, plain_flops, memory, False))
    del plain
    release_memory()

    # (b) the same loop batched in --dtype: GPU only, where batching is what peer scripts do for speed.
    batched_result = None
    if device.type == "cuda":
        log(f"(b) batched loop ({args.dtype}, batch {args.batch_size}): warm-up, {n_small} and {n_large} images")
        batched = PlainLoop(captioner_dir, filter_dir, device, dtype, args.num_beams)
        batched.run(items[: args.batch_size], args.batch_size)
        reset_peak_memory(device)
        small, _ = batched.run(items[:n_small], args.batch_size)
        large, batched_result = batched.run(items, args.batch_size)
        name = f"batched loop, {args.dtype}, B={args.batch_size}"
        methods.append(Method(name, dtype, small, large, plain_flops, peak_memory(device), False))
        del batched
        release_memory()

    # (c) capfilt, with the plain loop's decoding and an ITM filter that keeps and writes everything.
    decoding = {"num_beams": args.num_beams, "num_captions": 1, "max_length": MAX_LENGTH, "min_length": MIN_LENGTH,
                "repetition_penalty": 1.0, "prompt": PROMPT}
    filtering = {"keep": ["itm>=0.0"], "mode": FilterMode.annotate}  # ITM alone, as the plain loop

    def capfilt_run(command: Command, n: int, tag: str) -> tuple[Run, dict[str, Sample]]:
        options: dict[str, Any] = {"device": str(device), "dtype": args.dtype, "batch_size": args.batch_size,
                                   "threads": args.threads}
        if command in (Command.caption, Command.bootstrap):
            options.update(captioner=str(captioner_dir), **decoding)
        if command in (Command.filter, Command.bootstrap):
            options.update(filter=[str(filter_dir)], **filtering)
        return run_capfilt(command, shards[n], workdir / f"output-{command.value}-{n}-{tag}", **options)

    log("(c) capfilt: warm-up bootstrap")
    capfilt_run(Command.bootstrap, n_small, "warmup")
    capfilt_flops = {
        Command.caption: vision + generate,
        Command.filter: vision + itm_padded,
        Command.bootstrap: 2 * vision + generate + 2 * itm_padded,
    }
    outputs: dict[Command, dict[str, Sample]] = {}
    for command in MODEL_COMMANDS:
        log(f"(c) capfilt {command.value}: {n_small} and {n_large} images")
        reset_peak_memory(device)
        small, _ = capfilt_run(command, n_small, "timed")
        large, outputs[command] = capfilt_run(command, n_large, "timed")
        methods.append(Method(f"capfilt {command.value}, {args.dtype}", dtype, small, large, capfilt_flops[command],
                              peak_memory(device), True))

    print_report(args, methods, count, image_tokens)
    return check_agreement(args, reference, outputs, batched_result)


def print_report(args: argparse.Namespace, methods: list[Method], count: int, image_tokens: int) -> None:
    device = args.device
    stage_threads = [model_stage_threads(args.threads, stages, str(device)) or "torch's default" for stages in (2, 1)]
    print(f"\nBLIP {args.size} (random weights, {image_tokens} image tokens) on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; torch threads: "
          f"plain loop {torch.get_num_threads()}, capfilt {stage_threads[0]} per model stage in bootstrap, "
          f"{stage_threads[1]} in caption and filter;\n{args.images_small} and {args.images_large} JPEGs of "
          f"{args.image_size} px; beams {args.num_beams}, length {MIN_LENGTH}..{MAX_LENGTH}; capfilt batch "
          f"{args.batch_size}")
    for dtype in sorted({m.dtype for m in methods}, key=str):
        peak, source = peak_flops(device, dtype)
        print(f"peak {str(dtype).removeprefix('torch.')}: {peak / 1e12:.3f} TFLOP/s ({source})")
    header = (f"{'method':<32}{'t(N) s':>9}{'t(M) s':>9}{'img/s':>9}{'GFLOP/img':>11}{'TFLOP/s':>10}{'% peak':>8}"
              f"{'peak mem':>12}")
    print("\n" + header + "\n" + "-" * len(header))
    for m in methods:
        rate = m.rate(count)
        achieved = m.flops * rate
        print(f"{m.name:<32}{m.small.seconds:>9.2f}{m.large.seconds:>9.2f}{rate:>9.2f}{m.flops / 1e9:>11.1f}"
              f"{achieved / 1e12:>10.3f}{100 * achieved / peak_flops(device, m.dtype)[0]:>7.1f}%{m.memory:>12}")
    by_name = {m.name.split(",")[0]: m for m in methods}
    for baseline in ("plain loop", "batched loop"):
        if baseline in by_name:
            ratio = by_name["capfilt bootstrap"].rate(count) / by_name[baseline].rate(count)
            print(f"capfilt bootstrap / {baseline}: {ratio:.2f}x images/s")
    print("GFLOP/img: estimate from parameter and token counts (see text_flops); img/s = (M - N) / (t(M) - t(N))")
    if device.type == "cpu":
        print("* CPU peak mem: the process's max RSS so far (all models loaded by then included), not per method")
    else:
        print("peak mem: torch.cuda.max_memory_allocated over the method's runs")

    parts = list(methods[0].split(count))
    header = f"{'ms per image':<32}" + "".join(f"{p + ('*' if p in BACKGROUND_PARTS else ''):>10}" for p in parts)
    print("\n" + header + "\n" + "-" * len(header))
    for m in methods:
        split = m.split(count)
        print(f"{m.name:<32}" + "".join(f"{1000 * split[p]:>10.2f}" for p in parts))
    print("* capfilt reads, decodes and resizes in background threads, overlapping the models (not in its 'other';"
          " its decode includes its resize);\n  the plain loop does them inline. resize = image processor;"
          " decoding = caption stage less its vision (and the plain loop's resize);\n  ITM = filter stage less its"
          " vision (and the plain loop's resize); other = the rest of the wall time.\n  capfilt's caption and filter"
          " stages run side by side in threads on consecutive batches: in bootstrap its parts add up to more than\n"
          "  its wall time ('other' < 0). On CPU % peak is of the matmul peak with the plain loop's threads.")
    if device.type == "cpu":
        print("(b) batched loop: skipped on CPU (GPU only)")


def check_agreement(args: argparse.Namespace, reference: LoopResult, outputs: dict[Command, dict[str, Sample]],
                    batched: LoopResult | None) -> int:
    """Compare with the plain loop; 1 when capfilt ran in fp32 and a caption differs or an ITM score is off by
    more than 1e-4 (in bf16/fp16 both differ from fp32 by nature: reported, not checked)."""
    def caption(sample: Sample | None) -> str | None:
        return sample.synthetic_captions[0].text if sample and sample.synthetic_captions else None

    def worst(got: dict[str, float | None], want: dict[str, float]) -> float:
        return max((abs(got[k] - want[k]) if got.get(k) is not None else float("inf") for k in want), default=0.0)

    total = len(reference.captions)
    same = {c: sum(caption(outputs[c].get(k)) == t for k, t in reference.captions.items())
            for c in (Command.caption, Command.bootstrap)}
    web = {c: worst({k: s.web_scores.get("itm") for k, s in outputs[c].items()}, reference.web_itm)
           for c in (Command.filter, Command.bootstrap)}
    synthetic = worst({k: s.synthetic_captions[0].scores.get("itm") if s.synthetic_captions else None
                       for k, s in outputs[Command.bootstrap].items()}, reference.synthetic_itm)
    print(f"\nagreement with the plain loop (fp32, 1 by 1), capfilt in {args.dtype}:")
    print(f"  beam captions identical: caption {same[Command.caption]}/{total}, "
          f"bootstrap {same[Command.bootstrap]}/{total}")
    print(f"  max |ITM difference|: web {web[Command.filter]:.2e} (filter), {web[Command.bootstrap]:.2e} (bootstrap);"
          f" synthetic {synthetic:.2e} (bootstrap)")
    if batched is not None:
        same_batched = sum(batched.captions[k] == t for k, t in reference.captions.items())
        web_batched = worst(batched.web_itm, reference.web_itm)
        synthetic_batched = worst(batched.synthetic_itm, reference.synthetic_itm)
        print(f"  batched loop ({args.dtype}): captions identical {same_batched}/{total}, max |ITM difference| web "
              f"{web_batched:.2e}, synthetic {synthetic_batched:.2e}")
    if DTYPES[args.dtype] != torch.float32:
        print("  not checked: capfilt ran in reduced precision (run with --dtype fp32 to check)")
        return 0
    failed = any(n != total for n in same.values()) or max(*web.values(), synthetic) > ITM_TOLERANCE
    print(f"  {'FAIL' if failed else 'OK'} (the check: all captions identical, every ITM within {ITM_TOLERANCE})")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
