"""BLIP captioner (image-grounded text decoder) and filter (image-grounded text encoder), via transformers.

Outputs equal the plain Hugging Face calls: `processor(...)` + `model.generate(...)` for captions,
`model(..., use_itm_head=True/False)` for ITM/ITC, tested to give the same captions and scores. They differ
in where work is shared: each image is preprocessed once (in the pipeline's workers) and encoded once per
model; the filter scores all of an image's captions against that one encoding; the captioner projects the
image's cross-attention keys and values once for all of its beams.
"""

from __future__ import annotations

import functools
import json

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoProcessor,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from capfilt.models.base import Captioner, CaptionScores, DecodingSettings, Filter, ImageModel
from capfilt.models.blip_decoding import BlipDecoder
from capfilt.models.fast_attention import PairImageCache, cache_argument, use_sdpa
from capfilt.models.loading import load_pretrained
from capfilt.models.preprocess import Preprocess, fast_preprocess, processor_preprocess
from capfilt.models.sampling import KeyedGumbelNoise, sample_seed


class BlipImageInput(ImageModel):
    """Preprocessing as the checkpoint's own image processor does it, one image at a time (in the decode
    workers); through capfilt's exact table-driven path where it covers the processor's settings."""

    processor: BlipProcessor
    device: torch.device
    dtype: torch.dtype

    @functools.cached_property
    def preprocessing(self) -> str:
        return json.dumps(self.processor.image_processor.to_dict(), sort_keys=True, default=str)

    @functools.cached_property
    def _preprocess(self) -> Preprocess:
        image_processor = self.processor.image_processor
        return fast_preprocess(image_processor) or processor_preprocess(image_processor)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self._preprocess(image)

    def to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned, so that the copy overlaps work already queued on the GPU
            pixels = pixels.pin_memory()
        return pixels.to(self.device, non_blocking=True).to(self.dtype)


class BlipCaptioner(BlipImageInput, Captioner):
    def __init__(
        self, model_id: str, settings: DecodingSettings, device: str, dtype: torch.dtype, sdpa: bool = True
    ) -> None:
        self.model_id = model_id
        self.settings = settings
        self.device = torch.device(device)
        self.dtype = dtype
        self.processor = load_pretrained(AutoProcessor, model_id, "captioner")
        self.model = load_pretrained(BlipForConditionalGeneration, model_id, "captioner", dtype=dtype)
        self.model.to(self.device).eval()
        if sdpa:
            use_sdpa(self.model)
        self.prompt_ids = self._prompt_ids()
        config = self.model.config.text_config
        # Our own decoding loop where it reproduces generate(); generate() itself with --eager-attention (the
        # library's reference path) or a checkpoint asking for settings the loop does not cover.
        self.decoder = None
        if sdpa and BlipDecoder.covers(self.model.text_decoder):
            self.decoder = BlipDecoder(self.model.text_decoder, config.sep_token_id, config.pad_token_id)

    def _prompt_ids(self) -> torch.Tensor:
        """The decoder's first tokens, as BLIP's generate() makes them: the prompt's [CLS] swapped for [DEC]
        (bos) and its closing [SEP] dropped; just [DEC] without a prompt."""
        bos = self.model.config.text_config.bos_token_id
        if not self.settings.prompt:
            return torch.tensor([bos], device=self.device)
        ids = self.processor.tokenizer(self.settings.prompt, return_tensors="pt")["input_ids"][0, :-1].clone()
        ids[0] = bos
        return ids.to(self.device)

    @torch.inference_mode()
    def caption_pixels(self, pixels: torch.Tensor, keys: list[str]) -> list[list[str]]:
        """BLIP's generate() with the image encoded once for all of its beams or sampled captions, and keyed
        sampling; stepped by `BlipDecoder` where it covers the settings."""
        s = self.settings
        image_embeds = self.model.vision_model(pixel_values=self.to_device(pixels)).last_hidden_state
        lengths = {"max_length": s.max_length, "min_length": s.min_length,
                   "repetition_penalty": s.effective_repetition_penalty}
        if s.method == "beam":
            if self.decoder is not None:
                sequences = self.decoder.beam_search(image_embeds, self.prompt_ids, s.num_beams, s.num_captions,
                                                     **lengths)
            else:
                sequences = self._generate(image_embeds, num_beams=s.num_beams, num_return_sequences=s.num_captions,
                                           **lengths)
        else:  # one row per caption, each sampled by greedy decoding over its own keyed noise
            seeds = [sample_seed(s.seed, key, j) for key in keys for j in range(s.num_captions)]
            warpers = [*self._warpers(), KeyedGumbelNoise(seeds)]
            if self.decoder is not None:
                sequences = self.decoder.greedy(image_embeds, self.prompt_ids, s.num_captions, warpers=warpers,
                                                **lengths)
            else:
                sequences = self._generate(image_embeds.repeat_interleave(s.num_captions, dim=0),
                                           logits_processor=LogitsProcessorList(warpers), **lengths)
        texts = self.processor.batch_decode(sequences, skip_special_tokens=True)
        n = s.num_captions
        return [[strip_prompt(t, s.prompt) for t in texts[i * n : (i + 1) * n]] for i in range(len(keys))]

    def _generate(self, image_embeds: torch.Tensor, **decoding: object) -> torch.Tensor:
        """What BlipForConditionalGeneration.generate does after its vision pass."""
        config = self.model.config.text_config
        input_ids = self.prompt_ids.expand(image_embeds.shape[0], -1)
        return self.model.text_decoder.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
            eos_token_id=config.sep_token_id,
            pad_token_id=config.pad_token_id,
            do_sample=False,
            **decoding,
        )

    def _warpers(self) -> list:
        """The filters `generate(do_sample=True)` would apply: the checkpoint's temperature and top-k, our top-p."""
        generation = self.model.generation_config
        warpers = []
        if generation.temperature is not None and generation.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(generation.temperature))
        if generation.top_k:
            warpers.append(TopKLogitsWarper(generation.top_k))
        if self.settings.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.settings.top_p))
        return warpers


def strip_prompt(text: str, prompt: str) -> str:
    """Remove the prompt the decoder was primed with (BLIP does `caption[len(prompt):]`)."""
    stripped_prompt = prompt.strip()
    if stripped_prompt and text.startswith(stripped_prompt):
        text = text[len(stripped_prompt) :]
    return text.strip()


class BlipFilter(BlipImageInput, Filter):
    def __init__(
        self,
        model_id: str,
        device: str,
        dtype: torch.dtype,
        text_max_tokens: int,
        sdpa: bool = True,
        pair_batch_size: int | None = None,
    ) -> None:
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        self.text_max_tokens = text_max_tokens
        # Pairs per text pass; fixed per device (not per run) so that outputs do not depend on --batch-size.
        # Small on CPU, where padding rows cost their full compute and batching gains little.
        self.pair_batch_size = pair_batch_size or (16 if self.device.type == "cpu" else 32)
        self.processor = load_pretrained(AutoProcessor, model_id, "filter")
        self.model = load_pretrained(BlipForImageTextRetrieval, model_id, "filter", dtype=dtype)
        self.model.to(self.device).eval()
        self.sdpa = sdpa
        if sdpa:
            use_sdpa(self.model)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the reference call makes them, truncated to the filter's text length (BLIP: 35)."""
        return self.processor.tokenizer(texts, truncation=True, max_length=self.text_max_tokens)["input_ids"]

    def padded(self, token_ids: list[list[int]], length: int) -> dict[str, torch.Tensor]:
        """`token_ids` padded on the right to `length`, with their attention mask, on the device."""
        pad = self.processor.tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids in token_ids])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in token_ids])
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}

    @torch.inference_mode()
    def score_pixels(
        self, pixels: torch.Tensor, captions: list[list[str]], itm: bool, itc: bool
    ) -> list[list[CaptionScores]]:
        texts = [text for image_texts in captions for text in image_texts]
        pair_images = torch.tensor([i for i, image_texts in enumerate(captions) for _ in image_texts])
        if not texts:
            return [[] for _ in captions]
        image_embeds = self.model.vision_model(pixel_values=self.to_device(pixels)).last_hidden_state
        image_keys = PairImageCache(self.pair_batch_size) if self.sdpa else None
        token_ids = self.tokenize(texts)
        # Texts are scored in passes of one length, their token count rounded up to a multiple of 8: then a
        # short caption costs a short pass, and a pair's pass does not depend on the other texts of the batch.
        by_length: dict[int, list[int]] = {}
        for pair, ids in enumerate(token_ids):
            by_length.setdefault(min(-(-len(ids) // 8) * 8, self.text_max_tokens), []).append(pair)
        order, itm_parts, itc_parts = [], [], []
        for length, pairs in sorted(by_length.items()):
            for start in range(0, len(pairs), self.pair_batch_size):
                chunk = pairs[start : start + self.pair_batch_size]
                order += chunk
                # Every pass has the same shape (rows padded with repeats of the first): then a pair's scores are
                # bit-identical whatever batch it came in, and reruns give the same bytes.
                rows = chunk + chunk[:1] * (self.pair_batch_size - len(chunk))
                tokens = self.padded([token_ids[row] for row in rows], length)
                images = pair_images[rows].to(self.device)
                if itm:
                    itm_parts.append(self._itm(image_embeds, images, tokens, image_keys)[: len(chunk)])
                if itc:
                    itc_parts.append(self._itc(image_embeds[images, 0, :], tokens)[: len(chunk)])
        # One copy to the host for the whole batch: no device sync per pass.
        itm_scores = dict(zip(order, torch.cat(itm_parts).tolist())) if itm else {}
        itc_scores = dict(zip(order, torch.cat(itc_parts).tolist())) if itc else {}
        scores = [CaptionScores(itm_scores.get(pair), itc_scores.get(pair)) for pair in range(len(texts))]
        result, offset = [], 0
        for image_texts in captions:
            result.append(scores[offset : offset + len(image_texts)])
            offset += len(image_texts)
        return result

    def _itm(
        self,
        image_embeds: torch.Tensor,
        images: torch.Tensor,
        tokens: dict[str, torch.Tensor],
        image_keys: PairImageCache | None,
    ) -> torch.Tensor:
        """Match probability: softmax of the ITM head, index 1 = match. With `image_keys`, each image's
        cross-attention keys and values are projected once for all of its captions."""
        if image_keys is not None:
            image_keys.pair_images = images
            cache = {cache_argument(self.model.text_encoder): image_keys}
            hidden = self.model.text_encoder(**tokens, encoder_hidden_states=image_embeds, **cache).last_hidden_state
        else:
            pair_embeds = image_embeds[images]
            image_atts = torch.ones(pair_embeds.shape[:-1], dtype=torch.long, device=self.device)
            hidden = self.model.text_encoder(
                **tokens, encoder_hidden_states=pair_embeds, encoder_attention_mask=image_atts
            ).last_hidden_state
        logits = self.model.itm_head(hidden[:, 0, :]).float()
        return logits.softmax(dim=-1)[:, 1]

    def _itc(self, image_cls: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cosine of the unimodal image and text projections (`image_cls`: each pair's image [CLS] embedding)."""
        image_feat = F.normalize(self.model.vision_proj(image_cls).float(), dim=-1)
        hidden = self.model.text_encoder(**tokens).last_hidden_state
        text_feat = F.normalize(self.model.text_proj(hidden[:, 0, :]).float(), dim=-1)
        return (image_feat * text_feat).sum(dim=-1)
