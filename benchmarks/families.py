"""Each model family behind capfilt's interfaces against the plain library loop a user writes, on the same
random-weight models and the same images.

    python benchmarks/families.py --size tiny|full [--families clip,siglip,siglip2,blip2,open_clip,blip2_opt,vlm]
        [--device cpu|cuda] [--dtype auto|fp32|bf16|fp16] [--images-small N --images-large M] [--captions K]
        [--batch-size B] [--num-beams 3] [--image-size 384] [--models-dir DIR] [--no-run] [--threads T] [--seed S]

Filters (CLIP, SigLIP, SigLIP 2 NaFlex, BLIP-2 ITM and ITC, open_clip where it imports) score each image's web
caption and K synthetic-like captions (shapes captions, distinct per image); captioners (BLIP-2 OPT, SmolVLM =
idefics3) write one beam-search caption per image. Per family, in one process:
(a) the plain loop: one image at a time, the model's own call as its model card writes it: `model(**processor(
    text=texts, images=image, padding=True))` for CLIP (`padding="max_length"` for SigLIP and SigLIP 2, and
    `max_num_patches` passed to SigLIP 2's processor as its model card does: its call otherwise resizes to 256
    patches, whatever the saved image processor says), BLIP-2's ITM call on the image repeated per caption and
    its ITC call on the image and its captions,
    `encode_image(preprocess(image))` and `encode_text(tokenizer(texts))` for open_clip (the image once with all
    its captions, as open_clip's README scores pairs), `model.generate(**processor(images=..., text=prompt))` for
    the captioners;
(b) capfilt's family object (`capfilt.models.load_filter` / `load_captioner`, then `score` / `caption`) on the same
    images in batches of B;
(c) filters only (unless --no-run): `capfilt.run(shard, out, "filter", filter=[model], mode="annotate")` on a
    webdataset shard of the same images; the filter command scores the web caption alone (1 text an image where
    (a) and (b) score 1 + K), so its rate is not comparable to (a) and (b) one for one.
(a) and (b) run in --dtype (on CPU: fp32). Each is timed on N and on M images and costs (t_M - t_N) / (M - N) per
image, so start-up (and model loading, never timed) cancels out; a warm-up runs first.

Where the time goes: capfilt's parts are timed by wrapping its family objects' methods (`preprocess`, the
vision pass `_image_features` / `image_features` or a hook on the vision tower, `score_pixels` /
`caption_pixels`), the plain loop's by timing the processor call and hooking the vision tower. Parts are
exclusive (a part nested in another counts once, in the inner one): decode = JPEG → PIL; preprocess = image
processor (and tokenizer, in the plain loop; the VLM's processor call inside capfilt's caption); vision = the
vision tower's forwards; text = the filter call less its vision pass (text towers, BLIP-2's Q-Former, scoring);
generate = the caption call less its vision pass (Q-Former, language model, beam search); other = the rest. On
GPU every part boundary synchronises the device.

Agreement: filters, max |score difference| between (b) and (a) over all pairs (and between (c)'s web scores and
(a)'s); captioners, captions identical. Exits 1 when (a) and (b) ran in fp32 and a score differs by more than
1e-4 or a caption differs (in bf16/fp16 agreement is reported, not checked).

FLOPs: an ESTIMATE, 2 x parameters x tokens per forward (every weight one multiply-add per token it sees),
embedding lookups excluded and attention's tokens² term ignored: vision = 2 x vision tower params x image tokens;
text = 2 x the rest of the model's params x the tokens the plain call feeds (padded as it pads); BLIP-2 ITM
feeds the Q-Former 32 queries + text per pair; a captioner's language model sees its input and new tokens once per
beam. TFLOP/s = estimate x img/s; % peak against the datasheet's dense peak of the GPU (bench.GPU_PEAKS, by
torch.cuda.get_device_name: H100 SXM 989, H200 989, A100 312 TFLOP/s in bf16), or on CPU and unknown GPUs a
measured square matmul.

Sizes. --size tiny: the demo builders (capfilt.demo.tiny_clip, tiny_siglip, tiny_siglip2, tiny_blip2,
tiny_open_clip, tiny_vlm), a minute or two on CPU. --size full: the released architectures' dimensions written
out, with random weights: CLIP ViT-L/14 (openai/clip-vit-large-patch14), SigLIP So400m/14 at 384 px
(google/siglip-so400m-patch14-384), SigLIP 2 So400m/16 NaFlex at 256 patches (google/siglip2-so400m-patch16-naflex),
BLIP-2 ViT-g ITM (Salesforce/blip2-itm-vit-g), open_clip ViT-L-14 (`open_clip.create_model("ViT-L-14")`, no
pretrained weights), BLIP-2 ViT-g + OPT-2.7b (Salesforce/blip2-opt-2.7b), SmolVLM-Instruct (idefics3: SigLIP
So400m vision at 384 px tiles, 4x4 tiles + a global view, SmolLM2-1.7B language model); meant for a GPU with
`--device cuda --dtype bf16`. Their tokenizers are the tiny builders' (the weights are random anyway; open_clip's is
its own): the dual encoders' text vocabulary is set to the tokenizer's length (an embedding is a lookup, so this
changes memory, not compute), and the language models' tokenizers are padded with filler tokens to the released
vocabulary (OPT's 50272, SmolLM2's 49152), so that their output layers cost what the released ones cost. Images
are the same shapes JPEGs at every size (--image-size px a side), which each processor resizes to its own input.

Measured on a CPU machine (2 cores shared with other jobs, no GPU; transformers 5.24). On a shared machine a
2-thread torch run stalls whenever the other core is taken (t(N) above t(M) came out), so these used --threads 1
(plain loop and capfilt alike):

    /work/venv-vision/bin/python benchmarks/families.py --size tiny --threads 1     # torch 2.14.1, open_clip 3.3.0
    (44 s; images/s, fp32, N=8, M=24, K=4, B=8, fastest of 3)
    family      plain  capfilt  ratio  capfilt.run (web only)  agreement (max |diff| / captions)
    clip        225.3    408.1  1.81x                   407.9  2.7e-07
    siglip      242.5    477.4  1.97x                   445.2  1.8e-07
    siglip2     182.3    383.8  2.11x                   407.0  1.8e-07
    blip2        64.3    239.7  3.73x                   441.7  itm 1.2e-07, itc 8.9e-08
    open_clip   197.4    322.6  1.63x                   530.3  1.2e-07
    blip2_opt    32.1    177.0  5.51x                       -  24/24 identical
    vlm          21.4    101.8  4.76x                       -  24/24 identical
    .venv/bin/python benchmarks/families.py --size tiny --threads 1                 # torch 2.13: the same less
    open_clip, in 36 s (ratios 1.56x to 5.95x, all in agreement).

    .venv/bin/python benchmarks/families.py --size full --families clip --images-small 2 --images-large 4 --repeats 1
    (CLIP ViT-L/14, 79 s: plain 0.75 img/s, capfilt 0.76, ratio 1.01x, capfilt.run 0.81; |diff| 3.7e-08; 180 GFLOP
    per image estimated, 0.14 TFLOP/s, 73% of the measured 2048² matmul; vision 1.1 s of the 1.3 s per image.)
The other full-size families were not run on CPU here (SigLIP and BLIP-2 ITM would fit in fp32; BLIP-2 OPT-2.7b,
15 GB in fp32, and SmolVLM, 17 tiles of 729 patches an image, are for a GPU); their configs were instantiated on
the meta device: 390M (CLIP), 841M (SigLIP), 841M (SigLIP 2), 1149M (BLIP-2 ITM), 3745M (BLIP-2 OPT-2.7b), 2246M
(SmolVLM) parameters, the released counts less the dual encoders' smaller vocabularies.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import json
import random
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Run, log, make_items, peak_flops, release_memory, settle_device_and_sizes, write_shard

import capfilt
from capfilt.config import DTYPES, DecodingSettings
from capfilt.demo import shapes
from capfilt.demo.pil_processors import pil_image_processor
from capfilt.models import load_captioner, load_filter
from capfilt.models.vlm import DEFAULT_INSTRUCTION

CHECK_TOLERANCE = 1e-4
BLIP2_PROMPT = "a photo of"  # no trailing space: capfilt strips it (OPT's BPE would make a token of it)
PARTS = ("decode", "preprocess", "vision", "text", "generate")


# --- timing -------------------------------------------------------------------------------------------------


class Parts:
    """Seconds per named part, exclusive: a part entered inside another is not counted in the outer one."""

    def __init__(self, cuda: bool) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = cuda
        self.stack: list[list[float]] = []  # [start, seconds of parts inside]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def enter(self, *_: Any) -> None:
        self.sync()
        self.stack.append([time.perf_counter(), 0.0])

    def exit(self, name: str) -> None:
        self.sync()
        start, inner = self.stack.pop()
        elapsed = time.perf_counter() - start
        self.seconds[name] += elapsed - inner
        if self.stack:
            self.stack[-1][1] += elapsed

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.exit(name)

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return fn(*args, **kwargs)

        return timed

    def hook(self, name: str, module: torch.nn.Module) -> None:
        module.register_forward_pre_hook(self.enter)
        module.register_forward_hook(lambda *_: self.exit(name))

    def patch(self, owner: Any, attribute: str, name: str) -> None:
        """Time `owner.attribute` (a bound method, replaced on the instance) as `name`."""
        setattr(owner, attribute, self.wrap(name, getattr(owner, attribute)))


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def dense_parameters(module: torch.nn.Module) -> int:
    """Parameters a forward multiplies by (embedding tables are lookups; a tied output layer counts once, as the
    Linear it is)."""
    return sum(p.numel() for m in module.modules() if not isinstance(m, torch.nn.Embedding)
               for p in m.parameters(recurse=False))


def to_device(inputs: Any, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in inputs.items()}


# --- (a) the plain loops ------------------------------------------------------------------------------------


class PlainFilter:
    """One image at a time through the model's own call; `score` gives {score name: [one per text]}."""

    scores: tuple[str, ...]

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype, parts: Parts) -> None:
        self.device, self.dtype, self.parts = device, dtype, parts
        self.image_tokens: list[int] = []  # per image, as the vision tower sees it
        self.text_tokens: list[int] = []  # per text, padded as the call pads it
        self.load(model_id)
        parts.hook("vision", self.vision)

    def load(self, model_id: str) -> None: ...

    def score(self, image: Image.Image, texts: list[str]) -> dict[str, list[float]]: ...

    def flops(self, texts_per_image: int) -> float:
        """Estimated FLOPs per image of `texts_per_image` texts (see the module docstring)."""
        vision = dense_parameters(self.vision)
        rest = dense_parameters(self.model) - vision
        return 2 * vision * mean(self.image_tokens) + 2 * rest * mean(self.text_tokens) * texts_per_image


class HfDualEncoder(PlainFilter):
    model_class: Any
    score_name: str
    padding: str | bool = True

    def load(self, model_id: str) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_id)
        self.model = self.model_class.from_pretrained(model_id, dtype=self.dtype).to(self.device).eval()
        self.vision = self.model.vision_model
        self.scores = (self.score_name,)
        config = self.model.config.vision_config
        self.patches = (config.image_size // config.patch_size) ** 2 if hasattr(config, "image_size") else 0

    @torch.inference_mode()
    def score(self, image: Image.Image, texts: list[str]) -> dict[str, list[float]]:
        with self.parts.part("preprocess"):
            inputs = self.processor(text=texts, images=[image], padding=self.padding, truncation=True,
                                    max_length=self.max_length(), return_tensors="pt", **self.image_kwargs())
        self.count_tokens(inputs, len(texts))
        with self.parts.part("text"):
            output = self.model(**to_device(inputs, self.device, self.dtype))
            return {self.score_name: self.plain_scores(output)[0].tolist()}

    def image_kwargs(self) -> dict:
        return {}

    def max_length(self) -> int:
        return min(self.processor.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)

    def count_tokens(self, inputs: Any, texts: int) -> None:
        self.text_tokens += [inputs["input_ids"].shape[1]] * texts
        self.image_tokens.append(self.patches + self.class_tokens)

    class_tokens = 0

    def plain_scores(self, output: Any) -> torch.Tensor: ...


class PlainClip(HfDualEncoder):
    score_name, class_tokens = "clip", 1

    @property
    def model_class(self) -> Any:
        from transformers import CLIPModel

        return CLIPModel

    def plain_scores(self, output: Any) -> torch.Tensor:
        return output.image_embeds.float() @ output.text_embeds.float().T


class PlainSiglip(HfDualEncoder):
    score_name, padding = "siglip", "max_length"

    @property
    def model_class(self) -> Any:
        from transformers import SiglipModel

        return SiglipModel

    def plain_scores(self, output: Any) -> torch.Tensor:
        return torch.sigmoid(output.logits_per_image.float())


class PlainSiglip2(PlainSiglip):
    def image_kwargs(self) -> dict:
        """As the model card passes it: the processor's call otherwise resizes to its own default of 256 patches,
        whatever the saved image processor's `max_num_patches`."""
        return {"max_num_patches": self.processor.image_processor.max_num_patches}

    @property
    def model_class(self) -> Any:
        from transformers import Siglip2Model

        return Siglip2Model

    def count_tokens(self, inputs: Any, texts: int) -> None:
        self.text_tokens += [inputs["input_ids"].shape[1]] * texts
        self.image_tokens.append(int(inputs["pixel_attention_mask"].sum()))  # the picture's real patches


class Blip2Loading:
    """Loads a BLIP-2 checkpoint of class `model_class` as its model card does, with what the FLOP estimate
    counts: the vision tower, the Q-Former's queries and the vision tokens."""

    model_class: str

    def load(self, model_id: str) -> None:
        import transformers

        self.processor = transformers.AutoProcessor.from_pretrained(model_id)
        model_class = getattr(transformers, self.model_class)
        self.model = model_class.from_pretrained(model_id, dtype=self.dtype).to(self.device).eval()
        self.vision = self.model.vision_model
        config = self.model.config
        self.queries = config.num_query_tokens
        self.patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1


class PlainBlip2Filter(Blip2Loading, PlainFilter):
    """The model card's calls: ITM on the image repeated once per caption, ITC on the image and its captions."""

    scores = ("blip2_itm", "blip2_itc")
    model_class = "Blip2ForImageTextRetrieval"

    @torch.inference_mode()
    def score(self, image: Image.Image, texts: list[str]) -> dict[str, list[float]]:
        with self.parts.part("preprocess"):
            pairs = self.processor(images=[image] * len(texts), text=texts, padding=True, truncation=True,
                                   return_tensors="pt")
            inputs = self.processor(images=[image], text=texts, padding=True, truncation=True, return_tensors="pt")
        # The processor puts the query tokens' image tokens before each text, which the model drops again.
        self.text_tokens += [pairs["input_ids"].shape[1] - self.queries] * len(texts)
        self.image_tokens += [self.patches] * (len(texts) + 1)  # len(texts) vision passes for ITM, one for ITC
        with self.parts.part("text"):
            itm = self.model(**to_device(pairs, self.device, self.dtype), use_image_text_matching_head=True)
            itc = self.model(**to_device(inputs, self.device, self.dtype), use_image_text_matching_head=False)
            return {"blip2_itm": itm.logits_per_image.float().softmax(dim=-1)[:, 1].tolist(),
                    "blip2_itc": itc.logits_per_image.float()[0].tolist()}

    def flops(self, texts_per_image: int) -> float:
        """One vision pass (what capfilt runs; the plain call runs 1 + texts); ITM: the Q-Former on the queries and
        the text, per pair; ITC: on the queries once, and on each text."""
        vision, text = dense_parameters(self.vision), mean(self.text_tokens)
        qformer = dense_parameters(self.model) - vision
        itm = texts_per_image * (self.queries + text)
        itc = self.queries + texts_per_image * text
        return 2 * vision * self.patches + 2 * qformer * (itm + itc)


class PlainOpenClip(PlainFilter):
    scores = ("clip",)

    def load(self, model_id: str) -> None:
        import open_clip

        from capfilt.models.openclip import PRECISIONS, open_clip_source

        name, pretrained = open_clip_source(model_id)
        self.model, self.transform = open_clip.create_model_from_pretrained(
            name, pretrained=pretrained, precision=PRECISIONS[self.dtype], device=self.device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.vision = self.model.visual
        grid = self.vision.grid_size
        self.patches = grid[0] * grid[1] + 1

    @torch.inference_mode()
    def score(self, image: Image.Image, texts: list[str]) -> dict[str, list[float]]:
        with self.parts.part("preprocess"):
            pixels = self.transform(image)[None]
            tokens = self.tokenizer(texts)
        self.text_tokens += [tokens.shape[1]] * len(texts)
        self.image_tokens.append(self.patches)
        with self.parts.part("text"):
            image_features = self.model.encode_image(pixels.to(self.device, self.dtype), normalize=True)
            text_features = self.model.encode_text(tokens.to(self.device), normalize=True)
            return {"clip": (image_features.float() @ text_features.float().T)[0].tolist()}


class PlainCaptioner:
    """One image at a time through `model.generate(**processor(...))`, beam search, one caption."""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype, parts: Parts,
                 settings: DecodingSettings) -> None:
        self.device, self.dtype, self.parts, self.settings = device, dtype, parts, settings
        self.image_tokens: list[int] = []  # vision tower tokens per image
        self.sequence_tokens: list[int] = []  # the language model's sequence per image: input + new tokens
        self.load(model_id)
        parts.hook("vision", self.vision)

    def load(self, model_id: str) -> None: ...

    def caption(self, image: Image.Image) -> str: ...

    def flops(self) -> float:
        vision = dense_parameters(self.vision)
        rest = dense_parameters(self.model) - vision
        return 2 * vision * mean(self.image_tokens) + 2 * rest * mean(self.sequence_tokens) * self.settings.num_beams


class PlainBlip2Captioner(Blip2Loading, PlainCaptioner):
    model_class = "Blip2ForConditionalGeneration"

    @torch.inference_mode()
    def caption(self, image: Image.Image) -> str:
        from capfilt.models.blip import strip_prompt

        s = self.settings
        with self.parts.part("preprocess"):
            inputs = self.processor(images=[image], text=[s.prompt], return_tensors="pt")
        # generate() counts OPT's image tokens in its lengths; capfilt's lengths (BLIP's) do not.
        with self.parts.part("generate"):
            out = self.model.generate(**to_device(inputs, self.device, self.dtype), num_beams=s.num_beams,
                                      max_length=s.max_length + self.queries, min_length=s.min_length + self.queries,
                                      repetition_penalty=s.effective_repetition_penalty)
        self.image_tokens.append(self.patches)
        self.sequence_tokens.append(out.shape[1])
        return strip_prompt(self.processor.batch_decode(out, skip_special_tokens=True)[0], s.prompt).strip()

    def flops(self) -> float:
        """Vision, the Q-Former on the queries once, the language model on its sequence per beam."""
        vision, qformer = dense_parameters(self.vision), dense_parameters(self.model.qformer)
        language = dense_parameters(self.model) - vision - qformer
        return (2 * vision * self.patches + 2 * qformer * self.queries
                + 2 * language * mean(self.sequence_tokens) * self.settings.num_beams)


class PlainVlm(PlainCaptioner):
    def load(self, model_id: str) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_id)
        self.model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=self.dtype).to(self.device).eval()
        self.vision = self.model.model.vision_model
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.settings.prompt}]}]
        self.text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        config = self.model.config.vision_config
        self.patches = (config.image_size // config.patch_size) ** 2

    @torch.inference_mode()
    def caption(self, image: Image.Image) -> str:
        s = self.settings
        with self.parts.part("preprocess"):
            inputs = self.processor(images=[[image]], text=[self.text], return_tensors="pt")
        with self.parts.part("generate"):
            out = self.model.generate(**to_device(inputs, self.device, self.dtype), num_beams=s.num_beams,
                                      max_new_tokens=s.max_length, min_new_tokens=s.min_length,
                                      repetition_penalty=s.effective_repetition_penalty)
        self.image_tokens.append(self.patches * inputs["pixel_values"].shape[1])  # patches x tiles
        self.sequence_tokens.append(out.shape[1])
        new = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)[0].strip()


# --- (b) capfilt's family objects: the parts timed ----------------------------------------------------------


def instrument(model: Any, parts: Parts) -> None:
    """Time a capfilt family object's parts, by replacing its methods on the instance."""
    parts.patch(model, "preprocess", "preprocess")
    if hasattr(model, "caption_pixels"):
        parts.patch(model, "caption_pixels", "generate")
        if hasattr(model, "pictures"):  # the VLM: the processor runs inside caption_pixels
            parts.patch(model, "pictures", "preprocess")
            parts.patch(model, "inputs", "preprocess")
        inner = getattr(model.model, "model", model.model)
        parts.hook("vision", inner.vision_model)
        return
    parts.patch(model, "score_pixels", "text")
    for name in ("_image_features", "image_features"):  # dual encoders, open_clip
        if hasattr(model, name):
            parts.patch(model, name, "vision")
            return
    parts.hook("vision", model.model.vision_model)  # BLIP-2: its vision pass is inline


# --- models -------------------------------------------------------------------------------------------------


def build_tiny(name: str, path: Path, seed: int) -> str:
    from capfilt.demo import tiny_blip2, tiny_clip, tiny_siglip, tiny_siglip2, tiny_vlm

    if name == "clip":
        return str(tiny_clip.build_tiny_clip(path, seed))
    if name == "siglip":
        return str(tiny_siglip.build_tiny_siglip(path, seed))
    if name == "siglip2":
        return str(tiny_siglip2.build_tiny_siglip2(path, seed))
    if name == "blip2":
        return str(tiny_blip2.build_tiny_blip2(path, seed))
    if name == "blip2_opt":
        return str(tiny_blip2.build_tiny_blip2_captioner(path, seed, language="opt"))
    if name == "vlm":
        return str(tiny_vlm.build_tiny_idefics3(path, seed))
    if name == "open_clip":
        from capfilt.demo.tiny_open_clip import build_tiny_open_clip

        return f"open_clip:{build_tiny_open_clip(path, seed)}"
    raise ValueError(name)


def save_random(model_class: Any, config: Any, processor: Any, path: Path, seed: int,
                init: Callable[[Any], None] = lambda model: None) -> str:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config).eval()
        init(model)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    del model
    release_memory()
    return str(path)


def pad_vocabulary(tokenizer: Any, size: int) -> None:
    """Filler tokens up to `size`, so that an output layer over the tokenizer has the released model's width."""
    tokenizer.add_tokens([f"tok{index:05d}" for index in range(size - len(tokenizer))])


def blip2_vision() -> dict:
    """EVA ViT-g/14 at 224 px, as Salesforce/blip2-*'s vision_config."""
    return {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
            "image_size": 224, "patch_size": 14}


def so400m_vision(**extra: Any) -> dict:
    """SigLIP So400m's vision tower (also SmolVLM's)."""
    return {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
            **extra}


def build_full(name: str, path: Path, seed: int) -> str:
    """The released architecture's dimensions, random weights, a tiny builder's tokenizer (see the docstring)."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    path.mkdir(parents=True, exist_ok=True)
    if name == "clip":  # openai/clip-vit-large-patch14
        from transformers import CLIPConfig, CLIPModel

        from capfilt.demo import tiny_clip

        processor = tiny_clip.build_processor(224, path)
        tokenizer = processor.tokenizer
        text = {"vocab_size": len(tokenizer), "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768,
                "hidden_act": "quick_gelu", "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "image_size": 224, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)
        return save_random(CLIPModel, config, processor, path, seed)
    if name == "siglip":  # google/siglip-so400m-patch14-384
        from transformers import SiglipConfig, SiglipModel, SiglipProcessor, SiglipTokenizer

        from capfilt.demo import tiny_siglip

        tiny_siglip.build_tokenizer(path)  # writes spiece.model
        tokenizer = SiglipTokenizer(vocab_file=str(path / "spiece.model"), model_max_length=64)
        image_processor = pil_image_processor("Siglip")(size={"height": 384, "width": 384})
        processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
        text = {**so400m_vision(), "vocab_size": len(tokenizer), "max_position_embeddings": 64,
                "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
        config = SiglipConfig(text_config=text, vision_config=so400m_vision(image_size=384, patch_size=14))
        return save_random(SiglipModel, config, processor, path, seed)
    if name == "siglip2":  # google/siglip2-so400m-patch16-naflex
        from transformers import Siglip2Config, Siglip2Model, Siglip2Processor

        from capfilt.demo import tiny_siglip2

        tokenizer = tiny_siglip2.build_tokenizer()
        image_processor = pil_image_processor("Siglip2")(patch_size=16, max_num_patches=256)
        processor = Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
        text = {**so400m_vision(), "vocab_size": len(tokenizer), "max_position_embeddings": 64,
                "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                "bos_token_id": tokenizer.bos_token_id}
        config = Siglip2Config(text_config=text, vision_config=so400m_vision(num_patches=256, patch_size=16))
        return save_random(Siglip2Model, config, processor, path, seed)
    if name in ("blip2", "blip2_opt"):
        from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, Blip2Processor

        from capfilt.demo import tiny_blip, tiny_blip2

        image_processor = pil_image_processor("Blip")(size={"height": 224, "width": 224},
                                                          image_mean=list(OPENAI_CLIP_MEAN),
                                                          image_std=list(OPENAI_CLIP_STD))
        qformer = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "cross_attention_frequency": 2, "encoder_hidden_size": 1408}

        def queries(model: Any) -> None:
            torch.nn.init.normal_(model.query_tokens, std=0.02)  # zero queries would all give one output

        if name == "blip2":  # Salesforce/blip2-itm-vit-g
            tokenizer = tiny_blip.build_tokenizer(512)
            processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=32)
            tokenizer = processor.tokenizer
            qformer.update(vocab_size=len(tokenizer), max_position_embeddings=512, use_qformer_text_input=True,
                           pad_token_id=tokenizer.pad_token_id)
            config = Blip2Config(vision_config=blip2_vision(), qformer_config=qformer, num_query_tokens=32,
                                 image_text_hidden_size=256,
                                 image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
            return save_random(Blip2ForImageTextRetrieval, config, processor, path, seed, queries)
        # Salesforce/blip2-opt-2.7b
        processor = Blip2Processor(image_processor=image_processor, tokenizer=tiny_blip2.opt_tokenizer(),
                                   num_query_tokens=32)
        tokenizer = processor.tokenizer
        pad_vocabulary(tokenizer, 50272)
        opt = {"model_type": "opt", "vocab_size": len(tokenizer), "hidden_size": 2560, "ffn_dim": 10240,
               "num_hidden_layers": 32, "num_attention_heads": 32, "word_embed_proj_dim": 2560,
               "max_position_embeddings": 2048, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        qformer.update(use_qformer_text_input=False)
        config = Blip2Config(vision_config=blip2_vision(), qformer_config=qformer, text_config=opt,
                             num_query_tokens=32, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
        return save_random(Blip2ForConditionalGeneration, config, processor, path, seed, queries)
    if name == "vlm":  # HuggingFaceTB/SmolVLM-Instruct
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration

        from capfilt.demo import tiny_vlm

        processor = tiny_vlm.build_processor(tile=384, longest_edge=4 * 384, image_seq_len=81)  # 27² patches / 3²
        tokenizer = processor.tokenizer
        pad_vocabulary(tokenizer, 49152)
        text = {"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 2048, "intermediate_size": 8192,
                "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
                "max_position_embeddings": 16384, "rope_theta": 273768.0, "tie_word_embeddings": False,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
        config = Idefics3Config(text_config=text, vision_config=so400m_vision(image_size=384, patch_size=14),
                                scale_factor=3, image_token_id=tokenizer.convert_tokens_to_ids(tiny_vlm.IMAGE),
                                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)

        def generation(model: Any) -> None:
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                setattr(model.generation_config, key, getattr(tokenizer, key))

        return save_random(Idefics3ForConditionalGeneration, config, processor, path, seed, generation)
    if name == "open_clip":  # open_clip ViT-L-14, saved in its own folder format as tiny_open_clip saves
        import open_clip
        from open_clip.push_to_hf_hub import save_config_for_hf
        from safetensors.torch import save_file

        torch.manual_seed(seed)
        model = open_clip.create_model("ViT-L-14")
        save_file(model.state_dict(), path / "open_clip_model.safetensors")
        save_config_for_hf(model, path / "open_clip_config.json", model_config=open_clip.get_model_config("ViT-L-14"))
        return f"open_clip:{path}"
    raise ValueError(name)


def build_model(name: str, size: str, directory: Path, seed: int) -> str:
    path = directory / size / name
    marker = path / "capfilt-bench-model.txt"  # written last: a model built to the end
    if marker.exists():
        log(f"reusing {path}")
        return marker.read_text()
    log(f"building a random-weight {size} {name} in {path}")
    model_id = (build_tiny if size == "tiny" else build_full)(name, path, seed)
    marker.write_text(model_id)
    return model_id


# --- families -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    plain: type
    captioner: bool = False
    needs: str | None = None  # a module it imports


FAMILIES = {f.name: f for f in (
    Family("clip", "CLIP (ViT-L/14 at full size)", PlainClip),
    Family("siglip", "SigLIP (So400m/14 384 px)", PlainSiglip),
    Family("siglip2", "SigLIP 2 NaFlex (So400m/16, 256 patches)", PlainSiglip2),
    Family("blip2", "BLIP-2 ITM + ITC (ViT-g)", PlainBlip2Filter),
    Family("open_clip", "open_clip (ViT-L-14)", PlainOpenClip, needs="open_clip"),
    Family("blip2_opt", "BLIP-2 OPT captioner (ViT-g + OPT-2.7b)", PlainBlip2Captioner, captioner=True),
    Family("vlm", "VLM: SmolVLM / idefics3 (SmolVLM-Instruct)", PlainVlm, captioner=True),
)}


def importable(module: str | None) -> bool:
    return module is None or (importlib.util.find_spec(module) is not None
                              and importlib.util.find_spec("torchvision") is not None)


# --- running ------------------------------------------------------------------------------------------------

Item = tuple[str, bytes, str]


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass
class Timed:
    name: str
    small: Run
    large: Run

    def rate(self, count: int) -> float:
        per_image = (self.large.seconds - self.small.seconds) / count
        return 1 / per_image if per_image > 0 else float("nan")

    def split(self, count: int) -> dict[str, float]:
        p = {k: (self.large.parts.get(k, 0.0) - self.small.parts.get(k, 0.0)) / count for k in PARTS}
        p["other"] = (self.large.seconds - self.small.seconds) / count - sum(p.values())
        return p


@dataclass
class Outcome:
    family: Family
    methods: list[Timed]
    flops: float
    agreement: str
    failed: bool
    rates: dict[str, float] = field(default_factory=dict)


def timed_twice(run: Callable[[list[Item]], tuple[Run, dict]], items: list[Item], n_small: int, warmup: int,
                repeats: int) -> tuple[Run, Run, dict]:
    """A warm-up, then the fastest of `repeats` runs on N and on M images (the machine may be shared: the
    fastest run is the one least disturbed)."""
    run(items[:warmup])
    smalls, larges = [], []
    for _ in range(repeats):  # alternately, so that a slow spell of the machine hits both alike
        smalls.append(run(items[:n_small])[0])
        larges.append(run(items))
    large, result = min(larges, key=lambda r: r[0].seconds)
    return min(smalls, key=lambda r: r.seconds), large, result


def plain_run(plain: Any, parts: Parts, captions: dict[str, list[str]]) -> Callable:
    def run(items: list[Item]) -> tuple[Run, dict]:
        parts.seconds.clear()
        result = {}
        start = time.perf_counter()
        for key, data, _ in items:
            with parts.part("decode"):
                image = decode(data)
            result[key] = plain.caption(image) if isinstance(plain, PlainCaptioner) else plain.score(image, captions[key])
        parts.sync()
        return Run(time.perf_counter() - start, dict(parts.seconds)), result

    return run


def capfilt_run(model: Any, parts: Parts, captions: dict[str, list[str]], names: tuple[str, ...],
                batch_size: int) -> Callable:
    def run(items: list[Item]) -> tuple[Run, dict]:
        parts.seconds.clear()
        result = {}
        start = time.perf_counter()
        for first in range(0, len(items), batch_size):
            chunk = items[first : first + batch_size]
            keys = [key for key, _, _ in chunk]
            with parts.part("decode"):
                images = [decode(data) for _, data, _ in chunk]
            if names:  # a filter
                scored = model.score(images, [captions[key] for key in keys], names)
                for key, pairs in zip(keys, scored):
                    result[key] = {name: [pair[name] for pair in pairs] for name in names}
            else:
                result.update(zip(keys, (texts[0] for texts in model.caption(images, keys))))
        parts.sync()
        return Run(time.perf_counter() - start, dict(parts.seconds)), result

    return run


def run_filter_command(model_id: str, names: tuple[str, ...], low: dict[str, float], shard: Path, output: Path,
                       args: argparse.Namespace) -> tuple[Run, dict[str, dict[str, float]]]:
    """`capfilt filter` on the shard, every sample kept and written; its time from the run's start (models
    loaded); returns its web scores by key."""
    from bench import RunClock

    clock = RunClock()
    capfilt.run(str(shard), str(output), "filter", observer=clock, filter=[model_id], mode="annotate",
                keep=[f"{name}>={low[name]}" for name in names], device=str(args.device), dtype=args.dtype,
                batch_size=args.batch_size, threads=args.threads)
    if args.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - clock.started
    scores = {}
    for tar_path in sorted(output.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())
                    scores[record["key"]] = {name: record.get(f"web_{name}_score") for name in names}
    release_memory()
    return Run(seconds, {}), scores


def worst(got: dict[str, dict[str, list[float]]], want: dict[str, dict[str, list[float]]], name: str) -> float:
    differences = [abs(a - b) if a is not None else float("inf")
                   for key in want for a, b in zip(got.get(key, {}).get(name, [None] * len(want[key][name])),
                                                   want[key][name])]
    return max(differences, default=0.0)


def benchmark_family(family: Family, args: argparse.Namespace, items: list[Item], captions: dict[str, list[str]],
                     shards: dict[int, Path], workdir: Path) -> Outcome:
    device, dtype = args.device, DTYPES[args.dtype]
    n_small, n_large = args.images_small, args.images_large
    count = n_large - n_small
    model_id = build_model(family.name, args.size, args.models_dir or workdir / "models", args.seed)
    cuda = device.type == "cuda"
    settings = DecodingSettings(num_beams=args.num_beams, num_captions=1, max_length=args.max_length,
                                min_length=args.min_length, repetition_penalty=1.0,
                                prompt=BLIP2_PROMPT if family.name == "blip2_opt" else DEFAULT_INSTRUCTION)

    log(f"{family.name} (a) plain loop: warm-up, {n_small} and {n_large} images")
    parts = Parts(cuda)
    if family.captioner:
        plain = family.plain(model_id, device, dtype, parts, settings)
    else:
        plain = family.plain(model_id, device, dtype, parts)
    small, large, reference = timed_twice(plain_run(plain, parts, captions), items, n_small, 1, args.repeats)
    methods = [Timed("plain loop, 1 by 1", small, large)]
    flops = plain.flops() if family.captioner else plain.flops(1 + args.captions)
    names: tuple[str, ...] = () if family.captioner else plain.scores
    del plain
    release_memory()

    log(f"{family.name} (b) capfilt's family object: warm-up, {n_small} and {n_large} images")
    parts = Parts(cuda)
    if family.captioner:
        model = load_captioner(model_id, settings, str(device), dtype)
    else:
        model = load_filter(model_id, str(device), dtype)
    instrument(model, parts)
    small, large, ours = timed_twice(capfilt_run(model, parts, captions, names, args.batch_size), items, n_small,
                                     args.batch_size, args.repeats)
    label = f"capfilt {type(model).__name__}.{'caption' if family.captioner else 'score'}, B={args.batch_size}"
    methods.append(Timed(label, small, large))
    low = {score.name: score.low for score in getattr(model, "scores", ())}
    del model
    release_memory()

    checked = dtype == torch.float32
    if family.captioner:
        same = sum(ours.get(key) == caption for key, caption in reference.items())
        agreement = f"captions identical {same}/{len(reference)}"
        failed = checked and same != len(reference)
    else:
        differences = {name: worst(ours, reference, name) for name in names}
        agreement = "max |diff| " + ", ".join(f"{name} {value:.1e}" for name, value in differences.items())
        failed = checked and max(differences.values()) > CHECK_TOLERANCE
        if args.run:
            log(f"{family.name} (c) capfilt.run filter: warm-up, {n_small} and {n_large} images")
            run_filter_command(model_id, names, low, shards[n_small], workdir / f"{family.name}-warmup", args)
            runs: dict[int, list] = defaultdict(list)
            for r in range(args.repeats):
                for n in (n_small, n_large):
                    runs[n].append(run_filter_command(model_id, names, low, shards[n],
                                                      workdir / f"{family.name}-{n}-{r}", args))
            small = min((run for run, _ in runs[n_small]), key=lambda r: r.seconds)
            large, web = min(runs[n_large], key=lambda r: r[0].seconds)
            methods.append(Timed("capfilt.run filter (web only)", small, large))
            web_reference = {key: {name: values[name][:1] for name in names} for key, values in reference.items()}
            web_got = {key: {name: [value] for name, value in values.items()} for key, values in web.items()}
            run_differences = {name: worst(web_got, web_reference, name) for name in names}
            agreement += "; capfilt.run web " + ", ".join(f"{v:.1e}" for v in run_differences.values())
            failed = failed or (checked and max(run_differences.values()) > CHECK_TOLERANCE)
    outcome = Outcome(family, methods, flops, agreement, failed)
    outcome.rates = {m.name: m.rate(count) for m in methods}
    print_family(outcome, args, count)
    return outcome


# --- report -------------------------------------------------------------------------------------------------


def print_family(outcome: Outcome, args: argparse.Namespace, count: int) -> None:
    family, device = outcome.family, args.device
    peak, source = peak_flops(device, DTYPES[args.dtype])
    work = ("one beam-search caption" if family.captioner
            else f"1 web + {args.captions} synthetic-like captions scored")
    print(f"\n{family.title}, {args.size} (random weights) on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, {args.dtype}; "
          f"{args.images_small} and {args.images_large} JPEGs of {args.image_size} px, {work} each; "
          f"peak {peak / 1e12:.2f} TFLOP/s ({source})", flush=True)
    header = f"{'method':<44}{'t(N) s':>8}{'t(M) s':>8}{'img/s':>9}{'GFLOP/img*':>12}{'TFLOP/s':>9}{'% peak':>8}"
    print(header + "\n" + "-" * len(header))
    for m in outcome.methods:
        rate = m.rate(count)
        flops = outcome.flops if not m.name.startswith("capfilt.run") else float("nan")
        print(f"{m.name:<44}{m.small.seconds:>8.2f}{m.large.seconds:>8.2f}{rate:>9.2f}{flops / 1e9:>12.2f}"
              f"{flops * rate / 1e12:>9.3f}{100 * flops * rate / peak:>7.1f}%")
    plain, ours = outcome.methods[0].rate(count), outcome.methods[1].rate(count)
    print(f"ratio capfilt / plain: {ours / plain:.2f}x images/s; agreement: {outcome.agreement}"
          f"{'  FAIL' if outcome.failed else ''}")
    header = f"{'ms per image':<44}" + "".join(f"{p:>11}" for p in (*PARTS, "other"))
    print(header + "\n" + "-" * len(header))
    for m in outcome.methods[:2]:
        split = m.split(count)
        print(f"{m.name:<44}" + "".join(f"{1000 * split[p]:>11.2f}" for p in (*PARTS, "other")), flush=True)


def print_summary(outcomes: list[Outcome], args: argparse.Namespace, count: int) -> None:
    print(f"\nsummary, --size {args.size} on {args.device} in {args.dtype}, images/s = (M - N) / (t(M) - t(N)):")
    header = f"{'family':<12}{'plain':>10}{'capfilt':>10}{'ratio':>8}{'run':>10}  agreement"
    print(header + "\n" + "-" * len(header))
    for o in outcomes:
        rates = [m.rate(count) for m in o.methods]
        run = f"{rates[2]:>10.2f}" if len(rates) > 2 else f"{'-':>10}"
        print(f"{o.family.name:<12}{rates[0]:>10.2f}{rates[1]:>10.2f}{rates[1] / rates[0]:>7.2f}x{run}  "
              f"{o.agreement}{'  FAIL' if o.failed else ''}")
    print("* GFLOP/img: an estimate, 2 x parameters x tokens per forward (see the module docstring); run = "
          "capfilt.run filter, the web caption alone.\n  Parts are exclusive; text = the filter call less its "
          "vision pass, generate = the caption call less its vision pass.")


# --- main ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--families", help=f"comma-separated, of {', '.join(FAMILIES)} (default: all that import)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", help="auto (CPU fp32, GPU bf16), fp32, bf16, fp16")
    parser.add_argument("--images-small", type=int, help="N (default: the batch size)")
    parser.add_argument("--images-large", type=int, help="M (default: 3 x the batch size)")
    parser.add_argument("--captions", type=int, default=4, help="K synthetic-like captions per image (filters)")
    parser.add_argument("--batch-size", type=int, help="capfilt's (default: 32 on GPU, 8 on CPU)")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=30, help="captioners: tokens (BLIP-2: prompt included; "
                        "VLM: new tokens)")
    parser.add_argument("--min-length", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=384, help="side of the generated JPEGs, in pixels")
    parser.add_argument("--models-dir", type=Path, help="where to save the models, and reuse them from next time")
    parser.add_argument("--no-run", dest="run", action="store_false", help="skip (c), capfilt.run filter")
    parser.add_argument("--threads", type=int, help="torch CPU threads (this process's, and capfilt.run's stage)")
    parser.add_argument("--repeats", type=int, default=3, help="runs on N and on M images; the fastest counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settle_device_and_sizes(parser, args)
    names = args.families.split(",") if args.families else list(FAMILIES)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    args.families = []
    for name in names:
        if importable(FAMILIES[name].needs):
            args.families.append(FAMILIES[name])
        else:
            log(f"skipping {name}: {FAMILIES[name].needs} (with torchvision) is not installed")
    return args


def synthetic_captions(items: list[Item], k: int, seed: int) -> dict[str, list[str]]:
    """Each image's web caption, then `k` captions of other random scenes, as a captioner's would read."""
    rng = random.Random(seed + 1)
    return {key: [web, *(shapes.describe(shapes.random_scene(rng)) for _ in range(k))] for key, _, web in items}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    items = make_items(args.images_large, args.image_size, args.seed)
    captions = synthetic_captions(items, args.captions, args.seed)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="capfilt-families-") as workdir:
        shards = {n: write_shard(Path(workdir) / f"input-{n}", items[:n])
                  for n in (args.images_small, args.images_large)}
        for family in args.families:
            outcomes.append(benchmark_family(family, args, items, captions, shards, Path(workdir)))
            release_memory()
    print_summary(outcomes, args, args.images_large - args.images_small)
    return int(any(o.failed for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
