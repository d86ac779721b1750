"""BLIP captioner (image-grounded text decoder) and filter (image-grounded text encoder), via transformers.

Outputs equal the plain Hugging Face calls: `processor(...)` + `model.generate(...)` for captions,
`model(..., use_itm_head=True/False)` for ITM/ITC, tested to give the same captions and scores. They differ
in where work is shared: each image is preprocessed once (in the pipeline's workers) and encoded once per
model; the filter scores all of an image's captions against that one encoding; the captioner projects the
image's cross-attention keys and values once for all of its beams.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers import (
    AutoProcessor,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    LogitsProcessorList,
)

from capfilt.models.base import Captioner, DecodingSettings, Filter, longer_than, pair_images, per_image
from capfilt.models.blip_decoding import BlipDecoder
from capfilt.models.fast_attention import PairImageCache, cache_argument, use_library_attention, use_sdpa
from capfilt.models.fast_paths import checked, close, failure, same_tokens
from capfilt.models.image_input import ProcessorImageInput
from capfilt.models.loading import load_pretrained
from capfilt.models.registry import register_captioner, register_filter
from capfilt.models.sampling import KeyedGumbelNoise, sample_seed, sampling_warpers
from capfilt.scores import Score


@register_captioner("blip")
class BlipCaptioner(ProcessorImageInput, Captioner):
    role = "captioner"

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
        self.prompt_ids = self._prompt_ids()
        self.decoder: BlipDecoder | None = None
        self._enable_fast_paths(sdpa)

    def _enable_fast_paths(self, sdpa: bool) -> None:
        """SDPA attention and our own decoding loop, each where it gives the library's logits and generate()'s
        captions on a probe picture (see capfilt.models.fast_paths); generate() with the library's attention
        otherwise, and always with --eager-attention (`sdpa` False), the library's reference path."""
        probe = self._probe_settings()
        pixels, keys = self.to_device(self.probe_pixels()), ["probe"]
        with torch.inference_mode():
            try:
                image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
                expected = self._sequences(image_embeds, keys, probe)
                if not sdpa:  # the library's path throughout: nothing to check it against
                    return
                sequence = self._first_caption(expected)
                expected_logits = self._library_logits(image_embeds, sequence)
                expected_steps = self._greedy_steps(image_embeds, probe.max_length)
            except Exception as error:
                raise self.unusable(error) from error
        # A checkpoint asking for generation settings the loop does not reproduce keeps generate(), silently:
        # that is the checkpoint's choice, not a fault.
        if BlipDecoder.covers(self.model.text_decoder):
            config = self.model.config.text_config
            decoder = BlipDecoder(self.model.text_decoder, config.sep_token_id, config.pad_token_id)

            @torch.inference_mode()
            def check_decoder() -> None:
                continuation = sequence[:, len(self.prompt_ids) :]
                close(decoder.logits_along(image_embeds, self.prompt_ids, continuation), expected_logits,
                      self.dtype, "logits")
                same_tokens(self._sequences(image_embeds, keys, probe, decoder), expected)

            if checked("capfilt's own decoding loop", self.role, self.model_id, check_decoder):
                self.decoder = decoder

        @torch.inference_mode()
        def check_attention() -> None:
            use_sdpa(self.model)
            fast_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
            close(fast_embeds, image_embeds, self.dtype, "image embeddings")
            close(self._library_logits(image_embeds, sequence), expected_logits, self.dtype, "logits")
            tokens, logits = self._greedy_steps(image_embeds, probe.max_length)  # through the decoding cache
            same_tokens(tokens, expected_steps[0])
            close(logits, expected_steps[1], self.dtype, "logits while decoding")
            if self.decoder is None:  # the run's decoding goes through generate() and this attention
                same_tokens(self._sequences(fast_embeds, keys, probe), expected)

        if not checked("fused attention (SDPA)", self.role, self.model_id, check_attention):
            use_library_attention(self.model)

    def _first_caption(self, sequences: torch.Tensor) -> torch.Tensor:
        """The first row of `sequences` up to its end token, as a batch of one."""
        row, start = sequences[0], len(self.prompt_ids)
        ends = (row[start:] == self.model.config.text_config.sep_token_id).nonzero()
        return row[: start + int(ends[0]) + 1 if len(ends) else row.shape[0]][None]

    def _library_logits(self, image_embeds: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        """The text decoder's own forward over `sequence`: the next-token logits from the prompt's last token on."""
        output = self.model.text_decoder(input_ids=sequence, attention_mask=torch.ones_like(sequence),
                                         encoder_hidden_states=image_embeds)
        return output.logits[:, len(self.prompt_ids) - 1 : -1].float()

    def _greedy_steps(self, image_embeds: torch.Tensor, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy generate(): its tokens and the logits of each step, which go through the decoding cache."""
        output = self._generate(image_embeds, max_length=max_length, output_logits=True, return_dict_in_generate=True)
        return output.sequences, torch.stack(output.logits, dim=1).float()

    def _probe_settings(self) -> DecodingSettings:
        """The run's decoding settings, cut to a few new tokens."""
        max_length = min(self.settings.max_length, len(self.prompt_ids) + 4)
        return replace(self.settings, max_length=max_length, min_length=min(self.settings.min_length, max_length))

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
        sampling; stepped by `BlipDecoder` where it passed its check."""
        s = self.settings
        image_embeds = self.model.vision_model(pixel_values=self.to_device(pixels)).last_hidden_state
        texts = self.processor.batch_decode(self._sequences(image_embeds, keys, s, self.decoder),
                                            skip_special_tokens=True)
        n = s.num_captions
        return [[strip_prompt(t, s.prompt) for t in texts[i * n : (i + 1) * n]] for i in range(len(keys))]

    def _sequences(self, image_embeds: torch.Tensor, keys: list[str], s: DecodingSettings,
                   decoder: BlipDecoder | None = None) -> torch.Tensor:
        """Token sequences, `s.num_captions` rows per image: through `decoder`, or the library's generate()."""
        lengths = {"max_length": s.max_length, "min_length": s.min_length,
                   "repetition_penalty": s.effective_repetition_penalty}
        if s.method == "beam":
            if decoder is not None:
                return decoder.beam_search(image_embeds, self.prompt_ids, s.num_beams, s.num_captions, **lengths)
            return self._generate(image_embeds, num_beams=s.num_beams, num_return_sequences=s.num_captions,
                                  **lengths)
        # Nucleus sampling: one row per caption, each decoded greedily over its own keyed noise.
        seeds = [sample_seed(s.seed, key, j) for key in keys for j in range(s.num_captions)]
        warpers = [*sampling_warpers(self.model.generation_config, s.top_p), KeyedGumbelNoise(seeds)]
        if decoder is not None:
            return decoder.greedy(image_embeds, self.prompt_ids, s.num_captions, warpers=warpers, **lengths)
        return self._generate(image_embeds.repeat_interleave(s.num_captions, dim=0),
                              logits_processor=LogitsProcessorList(warpers), **lengths)

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


# Two captions for the filter's probe: one short, one near BLIP's 35 tokens after truncation.
PROBE_CAPTIONS = [
    "a dog",
    ("a red circle and a small blue square on a grey background, next to a green star, "
     "IMG_2031.JPG, with some words that make this caption longer than thirty five tokens"),
]


def strip_prompt(text: str, prompt: str) -> str:
    """Remove the prompt the decoder was primed with (BLIP does `caption[len(prompt):]`)."""
    stripped_prompt = prompt.strip()
    if stripped_prompt and text.startswith(stripped_prompt):
        text = text[len(stripped_prompt) :]
    return text.strip()


@register_filter("blip")
class BlipFilter(ProcessorImageInput, Filter):
    """BLIP's image-text matching head (`itm`, the softmaxed match probability) and its contrastive cosine
    (`itc`), as `BlipForImageTextRetrieval(..., use_itm_head=True/False)` computes them."""

    role = "filter"
    scores = (
        Score("itm", 0.0, 1.0, "BLIP image-text match probability (ITM head, softmaxed)"),
        Score("itc", -1.0, 1.0, "BLIP cosine of the projected image and text embeddings (ITC)"),
    )
    default_scores = ("itm",)
    default_keep = ("itm>=0.5",)  # the BLIP authors' CapFilt threshold
    # BLIP's ITM/ITC text encoder saw at most 35 tokens in training.
    text_max_tokens = 35

    def __init__(
        self,
        model_id: str,
        device: str,
        dtype: torch.dtype,
        sdpa: bool = True,
        pair_batch_size: int | None = None,
    ) -> None:
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        # Pairs per text pass; fixed per device (not per run) so that outputs do not depend on --batch-size.
        # Small on CPU, where padding rows cost their full compute and batching gains little.
        self.pair_batch_size = pair_batch_size or (16 if self.device.type == "cpu" else 32)
        self.processor = load_pretrained(AutoProcessor, model_id, "filter")
        self.model = load_pretrained(BlipForImageTextRetrieval, model_id, "filter", dtype=dtype)
        self.model.to(self.device).eval()
        self.sdpa = False  # SDPA attention, and with it each image's keys projected once (`PairImageCache`)
        self.own_passes = True  # each image encoded once for all its captions, instead of the model's forward
        self._enable_fast_paths(sdpa)

    def _enable_fast_paths(self, sdpa: bool) -> None:
        """SDPA attention and our own text passes, each where it gives the model's own forward's scores on a
        probe: two pictures (the probe and its mirror image), one with two captions, one with one, so that a
        caption paired with the wrong picture shows (see capfilt.models.fast_paths). Both are checked at once
        first, each alone only when that fails: a vision pass costs about a second on a CPU at base size."""
        probe = self.probe_pixels()
        images = torch.cat([probe, probe.flip(-1)])
        captions = [PROBE_CAPTIONS, PROBE_CAPTIONS[1:]]
        with torch.inference_mode():
            try:
                expected = self._library_scores(images)
            except Exception as error:
                raise self.unusable(error) from error

        def check_passes() -> None:
            scores = [score for pairs in self.score_pixels(images, captions, ("itm", "itc")) for score in pairs]
            actual = torch.tensor([[score["itm"] for score in scores], [score["itc"] for score in scores]])
            close(actual, expected, self.dtype, "scores")

        @torch.inference_mode()
        def check_attention() -> None:
            close(self._library_scores(images), expected, self.dtype, "scores")

        if sdpa:
            use_sdpa(self.model)
            self.sdpa = True
            if failure(check_passes) is None:
                return
            self.sdpa = checked("fused attention (SDPA)", self.role, self.model_id, check_attention)
            if not self.sdpa:
                use_library_attention(self.model)
        self.own_passes = checked("capfilt's own text passes", self.role, self.model_id, check_passes)

    @torch.inference_mode()
    def _library_scores(self, images: torch.Tensor) -> torch.Tensor:
        """ITM (first row) and ITC (second) of the probe's three pairs, from the model's own forward: ITM of each
        pair, ITC of both pictures against both captions in one call (the model gives every pairing)."""
        texts = [PROBE_CAPTIONS[0], PROBE_CAPTIONS[1], PROBE_CAPTIONS[1]]
        token_ids = self.tokenize(texts)
        tokens = self.padded(token_ids, max(len(ids) for ids in token_ids))
        pixels = self.to_device(images)
        itm, _ = self._library_pass(pixels[[0, 0, 1]], tokens, itm=True, itc=False)
        two = {name: values[:2] for name, values in tokens.items()}  # one of each caption
        cosines = self.model(**two, pixel_values=pixels, use_itm_head=False).itm_score.float()  # (images, texts)
        return torch.stack([itm, cosines[[0, 0, 1], [0, 1, 1]]])

    def truncated(self, texts: list[str]) -> list[bool]:
        return longer_than(self.processor.tokenizer, texts, self.text_max_tokens)

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
        self, pixels: torch.Tensor, captions: list[list[str]], names: Collection[str]
    ) -> list[list[dict[str, float]]]:
        itm, itc = "itm" in names, "itc" in names
        texts = [text for image_texts in captions for text in image_texts]
        image_of_pair = torch.tensor(pair_images(captions))
        if not texts:
            return [[] for _ in captions]
        pixels = self.to_device(pixels)
        if self.own_passes:
            image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state
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
                images = image_of_pair[rows].to(self.device)
                if not self.own_passes:
                    itm_pass, itc_pass = self._library_pass(pixels[images], tokens, itm, itc)
                    itm_parts.append(itm_pass[: len(chunk)])
                    itc_parts.append(itc_pass[: len(chunk)])
                    continue
                if itm:
                    itm_parts.append(self._itm(image_embeds, images, tokens, image_keys)[: len(chunk)])
                if itc:
                    itc_parts.append(self._itc(image_embeds[images, 0, :], tokens)[: len(chunk)])
        # One copy to the host for the whole batch: no device sync per pass.
        itm_scores = dict(zip(order, torch.cat(itm_parts).tolist())) if itm else {}
        itc_scores = dict(zip(order, torch.cat(itc_parts).tolist())) if itc else {}
        scores = [{**({"itm": itm_scores[pair]} if itm else {}), **({"itc": itc_scores[pair]} if itc else {})}
                  for pair in range(len(texts))]
        return per_image(scores, captions)

    def _library_pass(
        self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor], itm: bool, itc: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM and ITC of each pair (row) from the model's own forward, which encodes each pair's image again:
        the reference of the fast paths, and the path left when they are off. A score not asked for is empty."""
        nothing = torch.empty(0, device=self.device)
        itm_scores = itc_scores = nothing
        if itm:
            logits = self.model(**tokens, pixel_values=pixels, use_itm_head=True).itm_score
            itm_scores = logits.float().softmax(dim=-1)[:, 1]
        if itc:  # the model gives every image against every text; a pair is on the diagonal
            itc_scores = self.model(**tokens, pixel_values=pixels, use_itm_head=False).itm_score.float().diagonal()
        return itm_scores, itc_scores

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
