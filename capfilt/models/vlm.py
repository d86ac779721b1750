"""Any image-text-to-text model as captioner: transformers `AutoModelForImageTextToText` checkpoints asked for a
caption by an instruction in their own chat template.

Tested family: SmolVLM (model_type idefics3, e.g. HuggingFaceTB/SmolVLM-Instruct). Qwen2-VL, PaliGemma and
Florence-2 are not registered: their processors could not be built and tested here (Qwen2-VL's needs a video
processor, which needs torchvision); registering one is one model_type in `register_captioner` once its test
runs.

Captions are the library's own `model.generate(**processor(images=..., text=..., padding=True))` on a batch
left-padded (the new tokens of every row then start at the same column), decoded without special tokens and
stripped: what is left after the chat template's scaffolding (the user turn, the `Assistant:` cue), which the
input holds and the new tokens do not. Nucleus sampling is keyed per sample (capfilt.models.sampling), so a
caption does not depend on the batch. capfilt runs no pass of its own here, so there is no fast path to check
at load.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from capfilt.models.base import Captioner, DecodingSettings
from capfilt.models.loading import load_pretrained
from capfilt.models.registry import register_captioner
from capfilt.models.sampling import KeyedGumbelNoise, sample_seed

# What a VLM is asked when the run keeps BLIP's default prompt, a caption prefix a chat model would only echo.
DEFAULT_INSTRUCTION = "Describe this image in one sentence."


class NewTokenNoise(KeyedGumbelNoise):
    """Keyed noise that counts steps from the first new token: `KeyedGumbelNoise` keys each step by the input's
    length, which in a left-padded batch holds the padding, so a caption would depend on its batch's longest
    input."""

    def __init__(self, row_seeds: list[int], input_length: int) -> None:
        super().__init__(row_seeds)
        self.input_length = input_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return super().__call__(input_ids[:, self.input_length :], scores)


@register_captioner("idefics3")
class VlmCaptioner(Captioner):
    """Captions of an image-text-to-text model, one chat turn per image: the picture, then the instruction.

    Preprocessing: the pipeline stacks each model's `preprocess` tensors, which must then have one shape, while a
    VLM's processor turns pictures of different shapes into different numbers of tiles or patches. So `preprocess`
    keeps the decoded picture itself, fitted (aspect ratio kept) into a `side` x `side` canvas, `side` being the
    longest edge the processor resizes to anyway, with a fourth channel marking where the picture lies;
    `caption_pixels` cuts each picture out again and hands the batch to the processor. The caption equals
    generate() on that picture, which for a picture no larger than `side` is the decoded picture itself.

    Prompt: `settings.prompt` is the instruction; BLIP's default "a picture of " becomes `DEFAULT_INSTRUCTION`,
    and `settings` (recorded beside each caption) says so.

    Lengths count new tokens only (`max_new_tokens`, `min_new_tokens`): the chat input's length depends on the
    template and on the picture's tiles, so it cannot be part of a length a user sets. The default 30 new tokens
    fits one sentence; a caption is kept whole as written, and a filter with a shorter text limit truncates it as
    its own tokenizer does.
    """

    role = "captioner"

    def __init__(
        self, model_id: str, settings: DecodingSettings, device: str, dtype: torch.dtype, sdpa: bool = True
    ) -> None:
        self.model_id = model_id
        if settings.prompt == DecodingSettings.prompt:
            settings = replace(settings, prompt=DEFAULT_INSTRUCTION)
        self.settings = settings
        self.device = torch.device(device)
        self.dtype = dtype
        self.processor = load_pretrained(AutoProcessor, model_id, self.role)
        # Left padding: every row's new tokens start at the same column, after its own input.
        self.processor.tokenizer.padding_side = "left"
        attention = {} if sdpa else {"attn_implementation": "eager"}
        self.model = load_pretrained(AutoModelForImageTextToText, model_id, self.role, dtype=dtype, **attention)
        self.model.to(self.device).eval()
        image_processor = self.processor.image_processor
        self.side = int(image_processor.size["longest_edge"])
        self.resample = Image.Resampling(int(image_processor.resample))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": settings.prompt}]}]
        self.text = self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @property
    def preprocessing(self) -> str:
        return f"vlm-canvas:{self.side}:{self.resample.name}"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The picture, shrunk to fit `side` if larger (with the processor's resampling), top-left in a uint8
        (4, side, side) canvas whose fourth channel is 255 where the picture is."""
        scale = min(1.0, self.side / max(image.size))
        width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        if (width, height) != image.size:
            image = image.resize((width, height), self.resample)
        canvas = torch.zeros(4, self.side, self.side, dtype=torch.uint8)
        canvas[:3, :height, :width] = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        canvas[3, :height, :width] = 255
        return canvas

    @staticmethod
    def pictures(pixels: torch.Tensor) -> list[Image.Image]:
        """The pictures `preprocess` put in the stacked canvases."""
        images = []
        for canvas in pixels:
            height, width = int(canvas[3, :, 0].count_nonzero()), int(canvas[3, 0].count_nonzero())
            images.append(Image.fromarray(canvas[:3, :height, :width].permute(1, 2, 0).numpy()))
        return images

    def inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The processor's batch for `images`, one chat turn each, left-padded, on the device in its dtype."""
        inputs = self.processor(images=[[image] for image in images], text=[self.text] * len(images),
                                padding=True, return_tensors="pt")
        return {name: value.to(self.device, self.dtype if value.is_floating_point() else None)
                for name, value in inputs.items()}

    @torch.inference_mode()
    def caption_pixels(self, pixels: torch.Tensor, keys: list[str]) -> list[list[str]]:
        s, n = self.settings, self.settings.num_captions
        images = self.pictures(pixels)
        decoding: dict[str, object] = {
            "max_new_tokens": s.max_length, "min_new_tokens": min(s.min_length, s.max_length),
            "repetition_penalty": s.effective_repetition_penalty, "num_beams": s.num_beams, "do_sample": False,
        }
        if s.method == "beam":
            decoding["num_return_sequences"] = n
        else:  # nucleus sampling: one row per caption, each decoded greedily over its own keyed noise
            images = [image for image in images for _ in range(n)]
        inputs = self.inputs(images)
        if s.method != "beam":
            seeds = [sample_seed(s.seed, key, j) for key in keys for j in range(n)]
            noise = NewTokenNoise(seeds, inputs["input_ids"].shape[1])
            decoding["logits_processor"] = LogitsProcessorList([*self.warpers(s), noise])
        sequences = self.model.generate(**inputs, **decoding)
        texts = self.processor.tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1] :],
                                                      skip_special_tokens=True)
        return [[text.strip() for text in texts[i * n : (i + 1) * n]] for i in range(len(keys))]

    def warpers(self, s: DecodingSettings) -> list[LogitsProcessor]:
        """The filters `generate(do_sample=True, top_p=...)` would apply before drawing: the checkpoint's
        temperature and top-k (from its generation config, which generate() reads), then the run's top-p."""
        generation = self.model.generation_config
        warpers: list[LogitsProcessor] = []
        if generation.temperature is not None and generation.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(generation.temperature))
        if generation.top_k:
            warpers.append(TopKLogitsWarper(generation.top_k))
        if s.top_p < 1.0:
            warpers.append(TopPLogitsWarper(s.top_p))
        return warpers
