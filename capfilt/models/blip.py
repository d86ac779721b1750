"""BLIP captioner (image-grounded text decoder) and filter (image-grounded text encoder), via transformers.

Outputs equal the plain Hugging Face calls: `processor(...)` + `model.generate(...)` for captions,
`model(..., use_itm_head=True/False)` for ITM/ITC. The filter differs from that plain call in one way,
tested to give the same numbers: the vision tower runs once per image and its output is shared by all of the
image's captions, instead of once per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoProcessor,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from capfilt.models.base import Captioner, CaptionScores, DecodingSettings, Filter
from capfilt.models.fast_attention import use_sdpa
from capfilt.models.loading import load_pretrained
from capfilt.models.sampling import KeyedGumbelNoise, sample_seed


class BlipCaptioner(Captioner):
    def __init__(
        self, model_id: str, settings: DecodingSettings, device: str, dtype: torch.dtype, sdpa: bool = True
    ) -> None:
        self.model_id = model_id
        self.settings = settings
        self.device = torch.device(device)
        self.processor = load_pretrained(AutoProcessor, model_id, "captioner")
        self.model = load_pretrained(BlipForConditionalGeneration, model_id, "captioner", dtype=dtype)
        self.model.to(self.device).eval()
        if sdpa:
            use_sdpa(self.model)
        self.dtype = dtype

    def length_kwargs(self) -> dict:
        s = self.settings
        return dict(
            max_length=s.max_length, min_length=s.min_length, repetition_penalty=s.effective_repetition_penalty
        )

    @torch.inference_mode()
    def caption(self, images: list[Image.Image], keys: list[str]) -> list[list[str]]:
        prompt = self.settings.prompt
        inputs = self.processor(images=images, text=[prompt] * len(images) if prompt else None, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        if self.settings.method == "beam":
            sequences = self.model.generate(
                **inputs,
                num_beams=self.settings.num_beams,
                num_return_sequences=self.settings.num_captions,
                do_sample=False,
                **self.length_kwargs(),
            )
        else:
            sequences = self._sample(inputs, keys)
        texts = self.processor.batch_decode(sequences, skip_special_tokens=True)
        n = self.settings.num_captions
        return [[strip_prompt(t, prompt) for t in texts[i * n : (i + 1) * n]] for i in range(len(images))]

    def _sample(self, inputs: dict[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        """Nucleus sampling, each caption seeded by (seed, key, index): what `BlipForConditionalGeneration.
        generate` does (prompt's [CLS] swapped for [DEC], its last [SEP] dropped, decoding cross-attending to
        the image), with the image encoded once for all of its captions and keyed Gumbel-max sampling."""
        n, config = self.settings.num_captions, self.model.config.text_config
        image_embeds = self.model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        image_embeds = image_embeds.repeat_interleave(n, dim=0)
        rows = image_embeds.shape[0]
        if "input_ids" in inputs:
            input_ids = inputs["input_ids"].repeat_interleave(n, dim=0)[:, :-1].clone()
            attention_mask = inputs["attention_mask"].repeat_interleave(n, dim=0)[:, :-1]
        else:
            input_ids = torch.full((rows, 1), 0, dtype=torch.long, device=self.device)
            attention_mask = torch.ones_like(input_ids)
        input_ids[:, 0] = config.bos_token_id
        seeds = [sample_seed(self.settings.seed, key, j) for key in keys for j in range(n)]
        return self.model.text_decoder.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device),
            eos_token_id=config.sep_token_id,
            pad_token_id=config.pad_token_id,
            do_sample=False,
            logits_processor=LogitsProcessorList([*self._warpers(), KeyedGumbelNoise(seeds)]),
            **self.length_kwargs(),
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


class BlipFilter(Filter):
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
        self.pair_batch_size = pair_batch_size or (8 if self.device.type == "cpu" else 32)
        self.processor = load_pretrained(AutoProcessor, model_id, "filter")
        self.model = load_pretrained(BlipForImageTextRetrieval, model_id, "filter", dtype=dtype)
        self.model.to(self.device).eval()
        if sdpa:
            use_sdpa(self.model)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise as the reference call does, truncated to the filter's text length (BLIP: 35 tokens)."""
        tokens = self.processor.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.text_max_tokens, return_tensors="pt"
        )
        return {k: tokens[k].to(self.device) for k in ("input_ids", "attention_mask")}

    @torch.inference_mode()
    def score(
        self, images: list[Image.Image], captions: list[list[str]], itm: bool, itc: bool
    ) -> list[list[CaptionScores]]:
        pairs = [(i, text) for i, texts in enumerate(captions) for text in texts]
        if not pairs:
            return [[] for _ in images]
        pixel_values = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        image_embeds = self.model.vision_model(pixel_values=pixel_values.to(self.device, self.dtype)).last_hidden_state

        tokens = self.tokenize([text for _, text in pairs])
        image_index = torch.tensor([i for i, _ in pairs], device=self.device)
        itm_parts: list[torch.Tensor] = []
        itc_parts: list[torch.Tensor] = []
        for start in range(0, len(pairs), self.pair_batch_size):
            count = min(self.pair_batch_size, len(pairs) - start)
            # Every text pass has the same shape (rows padded with repeats of the first, tokens to the maximum
            # length): then a pair's scores are bit-identical whatever batch it came in, and reruns give the
            # same bytes.
            rows = torch.tensor(
                list(range(start, start + count)) + [start] * (self.pair_batch_size - count), device=self.device
            )
            chunk_tokens = {name: values[rows] for name, values in tokens.items()}
            chunk_images = image_embeds[image_index[rows]]
            if itm:
                itm_parts.append(self._itm(chunk_images, chunk_tokens)[:count])
            if itc:
                itc_parts.append(self._itc(chunk_images, chunk_tokens)[:count])
        # One copy to the host for the whole batch: no device sync per chunk.
        itm_scores = torch.cat(itm_parts).tolist() if itm else [None] * len(pairs)
        itc_scores = torch.cat(itc_parts).tolist() if itc else [None] * len(pairs)
        scores = [CaptionScores(a, b) for a, b in zip(itm_scores, itc_scores)]
        result, offset = [], 0
        for texts in captions:
            result.append(scores[offset : offset + len(texts)])
            offset += len(texts)
        return result

    def _itm(self, image_embeds: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Match probability: softmax of the ITM head, index 1 = match."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = self.model.text_encoder(
            **tokens, encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts
        ).last_hidden_state
        logits = self.model.itm_head(hidden[:, 0, :]).float()
        return logits.softmax(dim=-1)[:, 1]

    def _itc(self, image_embeds: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cosine of the unimodal image and text projections."""
        image_feat = F.normalize(self.model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        hidden = self.model.text_encoder(**tokens).last_hidden_state
        text_feat = F.normalize(self.model.text_proj(hidden[:, 0, :]).float(), dim=-1)
        return (image_feat * text_feat).sum(dim=-1)
