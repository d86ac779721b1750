"""Any image-text-to-text model as captioner: transformers `AutoModelForImageTextToText` checkpoints asked for a
caption in their own terms (a chat turn, or a task prompt).

Registered and tested families (by config `model_type`), each on a tiny random checkpoint built with
transformers' own classes and `save_pretrained` (capfilt.demo.tiny_vlm, capfilt.demo.tiny_vlms):

- SmolVLM, model_type idefics3 (`VlmCaptioner`, e.g. HuggingFaceTB/SmolVLM-Instruct): tests/test_vlm_families.py.
- Qwen2-VL and Qwen2.5-VL, model_types qwen2_vl and qwen2_5_vl (`QwenVlCaptioner`, e.g.
  Qwen/Qwen2.5-VL-3B-Instruct): tests/test_vlm_families.py, run only where torchvision imports (their processor
  holds a video processor, which needs it; without torchvision those tests are skipped with that reason, and
  loading such a checkpoint fails at once in one line saying so).
- PaliGemma, model_type paligemma (`PaliGemmaCaptioner`, e.g. google/paligemma-3b-mix-224; PaliGemma 2 shares
  the model_type): tests/test_vlm_families.py, with or without torchvision.
- Florence-2, model_type florence2 (`Florence2Captioner`): transformers' native port (e.g.
  florence-community/Florence-2-base); tests/test_vlm_families.py, with or without torchvision. The original
  microsoft/Florence-2-* repositories are remote code (trust_remote_code) in another layout, which transformers'
  native class is not meant to load; use the converted florence-community ones (not checked here: no network).

Each is tested against the library's own generate() on the same inputs, for beam search and for keyed nucleus
sampling, and end to end in a bootstrap run with a BLIP filter. Not registered: any other image-text-to-text
model_type (LLaVA, Idefics2, Gemma 3, ...), none of which has a test here; adding one is a model_type in a
`register_captioner` beside a class whose hooks fit it, once a test like those runs.

Captions are the library's own `model.generate(**processor(images=..., text=..., padding=True))` on a batch
left-padded (the new tokens of every row then start at the same column), the new tokens decoded without
special tokens and stripped: what is left after the prompt (a chat template's user turn and assistant cue,
PaliGemma's prefix), which the input holds and the new tokens do not; an encoder-decoder (Florence-2) returns
its decoder's tokens alone. Nucleus sampling is keyed per sample (capfilt.models.sampling), the noise counted
from the first new token, so a caption does not depend on the batch. capfilt runs no pass of its own here, so
there is no fast path to check at load.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LogitsProcessorList,
)

from capfilt.errors import ModelLoadError
from capfilt.models.base import Captioner, DecodingSettings
from capfilt.models.loading import first_line, load_pretrained
from capfilt.models.registry import register_captioner
from capfilt.models.sampling import KeyedGumbelNoise, sample_seed, sampling_warpers

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

    Preprocessing: the pipeline batches each model's `preprocess` tensors into one tensor, while a VLM's
    processor turns pictures of different shapes into different numbers of tiles or patches. So `preprocess`
    keeps the decoded picture itself, fitted into the family's canvas (for Idefics3 a `side` x `side` square,
    `side` being the longest edge the processor resizes to anyway; aspect ratio kept), with a fourth channel
    marking where the picture lies; `collate` pads a batch's pictures to its largest, and `caption_pixels` cuts
    each picture out again and hands the batch to the processor. The caption equals generate() on that picture,
    which for a picture that fits is the decoded picture itself.

    Prompt: `settings.prompt` is the instruction; BLIP's default "a picture of " becomes the family's
    `default_instruction`, and `settings` (recorded beside each caption) says so.

    Lengths count new tokens only (`max_new_tokens`, `min_new_tokens`): the chat input's length depends on the
    template and on the picture's tiles, so it cannot be part of a length a user sets. The default 30 new tokens
    fits one sentence; a caption is kept whole as written, and a filter with a shorter text limit truncates it as
    its own tokenizer does.

    Families differ in a few hooks, overridden by the subclasses below, not in branches: `default_instruction`,
    `prompt_text` (the processor's text for one picture), `canvas` (the canvas's height and width, read from the
    image processor's size, whose keys differ per family), `fit` (the picture as the canvas holds it) and
    `inputs` (how the pictures are handed to the processor). The resampling is the image processor's own;
    `new_tokens` tells a decoder-only model's output from an encoder-decoder's.
    """

    role = "captioner"
    default_instruction = DEFAULT_INSTRUCTION

    def __init__(
        self, model_id: str, settings: DecodingSettings, device: str, dtype: torch.dtype, sdpa: bool = True
    ) -> None:
        self.model_id = model_id
        if settings.prompt == DecodingSettings.prompt:
            settings = replace(settings, prompt=self.default_instruction)
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
        self.height, self.width = self.canvas(image_processor)
        self.resample = Image.Resampling(int(image_processor.resample))
        self.text = self.prompt_text(settings.prompt)

    # --- the family's hooks ---

    def prompt_text(self, instruction: str) -> str:
        """The processor's text for one picture: a user turn of the picture then `instruction`, in the checkpoint's
        chat template, with the assistant's cue."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def canvas(self, image_processor) -> tuple[int, int]:
        """The canvas's (height, width): Idefics3 resizes a picture to a longest edge, `size["longest_edge"]`."""
        side = int(image_processor.size["longest_edge"])
        return side, side

    def fit(self, image: Image.Image) -> Image.Image:
        """The picture as the canvas holds it: shrunk (aspect ratio kept, with the processor's resampling) if it
        does not fit."""
        scale = min(1.0, self.height / image.height, self.width / image.width)
        size = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        return image if size == image.size else image.resize(size, self.resample)

    # --- shared ---

    @property
    def preprocessing(self) -> str:
        return f"vlm-canvas:{type(self).__name__}:{self.height}x{self.width}:{self.resample.name}"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The picture as `fit` makes it, a uint8 (4, height, width) tensor of its own size whose fourth channel
        is 255 (it marks the picture once `collate` has padded it)."""
        image = self.fit(image)
        picture = torch.full((4, image.height, image.width), 255, dtype=torch.uint8)
        picture[:3] = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        return picture

    def collate(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The pictures top-left in canvases of the batch's largest height and width, not the family's whole
        canvas (Qwen's is 3584 pixels square: 51 MB a picture)."""
        height, width = max(t.shape[1] for t in tensors), max(t.shape[2] for t in tensors)
        canvases = torch.zeros(len(tensors), 4, height, width, dtype=torch.uint8)
        for canvas, picture in zip(canvases, tensors):
            canvas[:, : picture.shape[1], : picture.shape[2]] = picture
        return canvases

    @staticmethod
    def pictures(pixels: torch.Tensor) -> list[Image.Image]:
        """The pictures `collate` put in the canvases."""
        images = []
        for canvas in pixels:
            height, width = int(canvas[3, :, 0].count_nonzero()), int(canvas[3, 0].count_nonzero())
            images.append(Image.fromarray(canvas[:3, :height, :width].permute(1, 2, 0).numpy()))
        return images

    def inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The processor's batch for `images`, one picture and `text` each, left-padded, on the device in its
        dtype."""
        inputs = self.processor(images=[[image] for image in images], text=[self.text] * len(images),
                                padding=True, return_tensors="pt")
        return {name: value.to(self.device, self.dtype if value.is_floating_point() else None)
                for name, value in inputs.items()}

    def new_tokens(self, sequences: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """What generate() added: a decoder-only model returns its input then the new tokens; an encoder-decoder
        model returns the decoder's tokens alone, from its start token."""
        return sequences[:, self.prefix_length(inputs) :]

    def prefix_length(self, inputs: dict[str, torch.Tensor]) -> int:
        """How many tokens the sequences generate() extends hold before the first new one."""
        return 1 if self.model.config.is_encoder_decoder else inputs["input_ids"].shape[1]

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
            noise = NewTokenNoise(seeds, self.prefix_length(inputs))
            warpers = sampling_warpers(self.model.generation_config, s.top_p)
            decoding["logits_processor"] = LogitsProcessorList([*warpers, noise])
        sequences = self.model.generate(**inputs, **decoding)
        texts = self.processor.tokenizer.batch_decode(self.new_tokens(sequences, inputs), skip_special_tokens=True)
        return [[text.strip() for text in texts[i * n : (i + 1) * n]] for i in range(len(keys))]


@register_captioner("qwen2_vl", "qwen2_5_vl")
class QwenVlCaptioner(VlmCaptioner):
    """Qwen2-VL and Qwen2.5-VL (e.g. Qwen/Qwen2.5-VL-3B-Instruct): a chat turn as SmolVLM's, but the image
    processor resizes a picture to multiples of 28 pixels holding between min_pixels and max_pixels pixels
    (`size["shortest_edge"]` and `size["longest_edge"]` are those pixel counts, not edges). The canvas is the
    largest square within max_pixels, so a picture fitted into it is only rounded to the patch grid by the
    processor, never shrunk again. At Qwen's default max_pixels (12845056) that is a 3584-pixel square, but a
    batch's canvases are only as large as its largest picture (`collate`)."""

    def __init__(
        self, model_id: str, settings: DecodingSettings, device: str, dtype: torch.dtype, sdpa: bool = True
    ) -> None:
        try:  # transformers would fail with a long ImportError while building the processor
            import torchvision  # noqa: F401
        except Exception as error:
            raise ModelLoadError(f"cannot load the {self.role} from {model_id}: Qwen2-VL's processor holds a video "
                                 f"processor, which needs torchvision ({first_line(error)})") from error
        super().__init__(model_id, settings, device, dtype, sdpa)

    def canvas(self, image_processor) -> tuple[int, int]:
        side = math.isqrt(int(image_processor.size["longest_edge"]))
        return side, side


class FixedSizeVlmCaptioner(VlmCaptioner):
    """A family whose image processor resizes every picture to one `size["height"]` x `size["width"]` (aspect
    ratio not kept) and whose processor takes a task prompt, not a chat turn. `fit` makes that resize itself
    (same size, same resampling), so the canvas is the picture whole and the processor resizes it to the size
    it already has; with transformers' PIL image processors (PIL returns such a picture unchanged) the caption is
    then generate() on the decoded picture itself, of any size (tests/test_vlm_families.py checks it; with the
    torchvision ones it is generate() on the resized picture)."""

    def canvas(self, image_processor) -> tuple[int, int]:
        return int(image_processor.size["height"]), int(image_processor.size["width"])

    def fit(self, image: Image.Image) -> Image.Image:
        size = self.width, self.height
        return image if image.size == size else image.convert("RGB").resize(size, self.resample)

    def inputs(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """One picture per text, as the model cards pass them (a flat list)."""
        inputs = self.processor(images=images, text=[self.text] * len(images), padding=True, return_tensors="pt")
        return {name: value.to(self.device, self.dtype if value.is_floating_point() else None)
                for name, value in inputs.items()}


@register_captioner("paligemma")
class PaliGemmaCaptioner(FixedSizeVlmCaptioner):
    """PaliGemma (e.g. google/paligemma-3b-mix-224, PaliGemma 2): a task prefix, not a chat. The text is
    `<image>` then the prefix ("caption en" by default, PaliGemma's captioning task); the processor expands the
    image token and adds `<bos>` and the closing newline. The new tokens are the answer alone."""

    default_instruction = "caption en"

    def prompt_text(self, instruction: str) -> str:
        return self.processor.image_token + instruction


@register_captioner("florence2")
class Florence2Captioner(FixedSizeVlmCaptioner):
    """Florence-2 (transformers' native `Florence2ForConditionalGeneration`, e.g. florence-community/Florence-2-base;
    not the remote-code microsoft/Florence-2-* checkpoints): an
    encoder-decoder taking a task token, "<CAPTION>" by default ("<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"
    also caption), which the processor turns into its question and wraps in `<image>...<s>...</s>`. Captions are the
    decoder's tokens decoded without special tokens and stripped, which for the caption tasks is exactly what
    `processor.post_process_generation(text, task=...)` returns (its "pure_text" parsing drops `<s>` and `</s>`
    and strips); a task that answers boxes, polygons or OCR regions is refused at load."""

    default_instruction = "<CAPTION>"

    def prompt_text(self, instruction: str) -> str:
        answers = getattr(self.processor, "tasks_answer_post_processing_type", {})
        task = instruction[: instruction.find(">") + 1] if instruction.startswith("<") else ""
        if answers.get(task, "pure_text") != "pure_text":
            raise ValueError(f"Florence-2's task {instruction!r} does not answer text; a caption needs one of "
                             + ", ".join(task for task, kind in answers.items() if kind == "pure_text"))
        return instruction
