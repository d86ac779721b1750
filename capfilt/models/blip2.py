"""BLIP-2 captioner and filter.

The captioner writes the captions of transformers `Blip2ForConditionalGeneration` checkpoints with an OPT or a
Flan-T5 language model (Salesforce/blip2-opt-2.7b, Salesforce/blip2-flan-t5-xl, a local directory): beam search,
or nucleus sampling keyed per sample (capfilt.models.sampling). They equal `model.generate(pixel_values=...,
input_ids=...)` with the same settings, tested token for token. Each image goes through one vision and Q-Former
pass for all its beams or sampled captions, where the library's call would run it once per sampled caption; the
language model then runs through the library's own generate(). When a model loads, this pass is checked against
the library's call on a probe; a release where they differ gets the library's call instead.

The filter: the image-text matching probability and the contrastive similarity of BLIP-2's Q-Former, for
transformers `Blip2ForImageTextRetrieval` checkpoints (Salesforce/blip2-itm-vit-g, Salesforce/blip2-itm-vit-g-coco,
a local directory) with their own processor.

`blip2_itm` is `softmax(logits_per_image)[:, 1]` of the plain call with `use_image_text_matching_head=True`: the
Q-Former runs the query tokens and the text together, the queries cross-attending the image, and the ITM head's
logits are averaged over the query tokens. `blip2_itc` is `logits_per_image` of the plain call with
`use_image_text_matching_head=False`: the largest, over the query tokens, of the cosines between the projected
query outputs (the Q-Former on the queries alone) and the projected text [CLS] (the Q-Former on the text alone).
Both are tested to equal the plain `model(**processor(images=..., text=..., padding=True, truncation=True))`
call within 1e-5 in fp32, and within 3e-2 in bf16.

Work is shared where the plain call cannot share it: each image of a batch goes through one vision pass for all
its captions, and for ITC through one Q-Former pass on the queries; each distinct text through one Q-Former text
pass; ITM runs the Q-Former once per image-caption pair, in passes of many pairs grouped by length. When a model
loads, these passes are checked against the plain call on a probe; a release where they differ gets the plain
call instead.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoProcessor,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    LogitsProcessorList,
)

from capfilt.errors import ModelLoadError
from capfilt.models.base import (
    Captioner,
    DecodingSettings,
    Filter,
    distinct_texts,
    longer_than,
    no_scores,
    pair_images,
    per_image,
)
from capfilt.models.fast_paths import checked, close, same_tokens
from capfilt.models.image_input import ProcessorImageInput
from capfilt.models.loading import load_pretrained
from capfilt.models.registry import register_captioner, register_filter
from capfilt.models.sampling import KeyedGumbelNoise, sample_seed, sampling_warpers
from capfilt.scores import Score

ITM, ITC = "blip2_itm", "blip2_itc"

# Captions of the load-time probe: one short, one of some length (past a small tokenizer's limit, so that it is
# truncated there as the processor truncates it).
PROBE_CAPTIONS = [
    "a dog",
    " ".join(["a red circle and a small blue square on a grey background next to a green star"] * 3),
]


def passes(lengths: list[int], size: int) -> list[list[int]]:
    """Indices into `lengths` for each pass: by token count, `size` a pass, so that a short text costs a short
    pass."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[start : start + size] for start in range(0, len(order), size)]


@register_captioner("blip-2")
class Blip2Captioner(ProcessorImageInput, Captioner):
    """BLIP-2's captions, as `Blip2ForConditionalGeneration.generate` writes them with an OPT or a Flan-T5 language
    model.

    The language model's input is what the processor makes of the prompt: `num_query_tokens` image tokens, whose
    embeddings the projected Q-Former outputs replace, then the prompt with the tokenizer's special tokens (OPT's
    bos before it, T5's `</s>` after). OPT continues the prompt, and the caption is what follows it; Flan-T5 reads
    the prompt in its encoder, and the caption is all its decoder writes.

    `max_length` and `min_length` count tokens as they do for BLIP, the way Hugging Face counts the language
    model's own sequence, prompt included where that sequence holds it, BLIP-2's image tokens not: for OPT, bos +
    prompt + caption (generate() counts the `num_query_tokens` image tokens before them too, so they are added to
    the lengths passed to it); for Flan-T5, the decoder's start token + caption, as generate() counts them.
    """

    role = "captioner"

    def __init__(
        self, model_id: str, settings: DecodingSettings, device: str, dtype: torch.dtype, sdpa: bool = True
    ) -> None:
        self.model_id = model_id
        self.settings = settings
        self.device = torch.device(device)
        self.dtype = dtype
        self.processor = load_pretrained(AutoProcessor, model_id, self.role)
        # The library's default attention is the plain call's; --eager-attention asks for its matmul-softmax one.
        attention = {} if sdpa else {"attn_implementation": "eager"}
        self.model, loading = load_pretrained(Blip2ForConditionalGeneration, model_id, self.role, dtype=dtype,
                                              output_loading_info=True, **attention)
        config = self.model.config
        # A BLIP-2 retrieval checkpoint (blip2-itm-vit-g) has the same model_type but no language model or
        # projection: loaded as a captioner, they would be random and write noise.
        if loading["missing_keys"]:
            missing = sorted(loading["missing_keys"])
            raise ModelLoadError(f"the {self.role} {model_id} lacks BLIP-2's language model weights "
                                 f"({len(missing)} missing, e.g. {missing[0]}); use a checkpoint of "
                                 f"Blip2ForConditionalGeneration such as Salesforce/blip2-opt-2.7b")
        # generate() puts the projected queries only at the input's image tokens: without their id it fails (5.24:
        # 'bool' object has no attribute 'unsqueeze'), leaving no library call to caption with or check against.
        if config.image_token_index is None:
            raise ModelLoadError(f"the {self.role} {model_id} names no image token (image_token_index), where "
                                 f"transformers {transformers.__version__} puts BLIP-2's query outputs; use a "
                                 f"checkpoint converted with them, as the hub's Salesforce/blip2-* are")
        self.model.to(self.device).eval()
        self.input_ids = self._input_ids()
        decoder_only = not config.text_config.is_encoder_decoder
        # Where the caption starts in generate()'s output: after a decoder-only model's input, after an
        # encoder-decoder's start token.
        self.caption_start = self.input_ids.shape[1] if decoder_only else 1
        # The tokens generate() counts in its lengths and capfilt's do not: the image tokens of a decoder-only input.
        self.uncounted = config.num_query_tokens if decoder_only else 0
        self.own_passes = True  # one vision and Q-Former pass per image; else the library's generate()
        self._check_passes()

    def _input_ids(self) -> torch.Tensor:
        """The language model's input tokens, a batch of one, as the processor makes them for the prompt. The
        prompt's trailing whitespace is dropped: BLIP's default prompt ends in a space, which BERT ignores but
        OPT's byte-level BPE would make a token of its own, never seen before a word in its training."""
        config = self.model.config
        prompt = self.processor.tokenizer(self.settings.prompt.rstrip())["input_ids"]
        return torch.tensor([[config.image_token_index] * config.num_query_tokens + prompt], device=self.device)

    def _check_passes(self) -> None:
        """Our pass against the library's generate() on a probe: two pictures (the probe and its mirror image), so
        that a caption written for the wrong picture shows."""
        probe = self.probe_pixels()
        pixels = self.to_device(torch.cat([probe, probe.flip(-1)]))
        keys, settings = ["probe", "mirrored probe"], self._probe_settings()
        with torch.inference_mode():
            try:
                expected = self._sequences(pixels, keys, settings, own_passes=False)
            except Exception as error:
                raise self.unusable(error) from error

        @torch.inference_mode()
        def check() -> None:
            same_tokens(self._sequences(pixels, keys, settings, own_passes=True), expected)

        self.own_passes = checked("capfilt's own BLIP-2 vision pass", self.role, self.model_id, check)

    def _probe_settings(self) -> DecodingSettings:
        """The run's decoding settings cut to a few new tokens and, when sampling, one caption per picture: then
        both paths run the vision tower on the same batch, and agree to the bit."""
        s = self.settings
        max_length = min(s.max_length, self.caption_start - self.uncounted + 4)
        num_captions = s.num_captions if s.method == "beam" else 1
        return replace(s, max_length=max_length, min_length=min(s.min_length, max_length), num_captions=num_captions)

    @torch.inference_mode()
    def caption_pixels(self, pixels: torch.Tensor, keys: list[str]) -> list[list[str]]:
        """generate()'s captions with the image encoded once for all of its beams or sampled captions, and keyed
        sampling; the prompt is cut off by position (the tokens after the input), not by its text."""
        s = self.settings
        sequences = self._sequences(self.to_device(pixels), keys, s, self.own_passes)
        texts = self.processor.tokenizer.batch_decode(sequences[:, self.caption_start :], skip_special_tokens=True)
        n = s.num_captions
        return [[text.strip() for text in texts[i * n : (i + 1) * n]] for i in range(len(keys))]

    def _sequences(
        self, pixels: torch.Tensor, keys: list[str], s: DecodingSettings, own_passes: bool
    ) -> torch.Tensor:
        """Token sequences as generate() returns them, `s.num_captions` rows per image: from one vision and
        Q-Former pass per image (`own_passes`), or from the library's generate()."""
        decoding: dict[str, object] = {
            "max_length": s.max_length + self.uncounted, "min_length": s.min_length + self.uncounted,
            "repetition_penalty": s.effective_repetition_penalty, "num_beams": s.num_beams, "do_sample": False,
        }
        rows = 1
        if s.method == "beam":
            decoding["num_return_sequences"] = s.num_captions
        else:  # nucleus sampling: one row per caption, each decoded greedily over its own keyed noise
            seeds = [sample_seed(s.seed, key, j) for key in keys for j in range(s.num_captions)]
            # The language model's generation config is the one BLIP-2's generate() reads.
            warpers = sampling_warpers(self.model.language_model.generation_config, s.top_p)
            decoding["logits_processor"] = LogitsProcessorList([*warpers, KeyedGumbelNoise(seeds)])
            rows = s.num_captions
        if not own_passes:
            return self._library_generate(pixels.repeat_interleave(rows, dim=0), **decoding)
        return self._generate(self._language_inputs(pixels).repeat_interleave(rows, dim=0), **decoding)

    def _language_inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """Each image's projected Q-Former outputs (images, queries, language model width): generate()'s vision
        tower, Q-Former and projection."""
        model = self.model
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = model.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                                     encoder_attention_mask=image_mask).last_hidden_state
        # A Q-Former kept in float32 (the model's `_keep_in_fp32_modules`) hands on in the vision tower's dtype.
        return model.language_projection(query_output.to(image_embeds.dtype))

    def _generate(self, language_inputs: torch.Tensor, **decoding: object) -> torch.Tensor:
        """What generate() does after its Q-Former pass: the input's embeddings with each row's projected queries
        in place of its image tokens, then the language model's generate(); a decoder-only model also gets the
        input's tokens, which lead its output."""
        model = self.model
        input_ids = self.input_ids.repeat(language_inputs.shape[0], 1)
        inputs_embeds = model.get_input_embeddings()(input_ids)
        image_mask = (input_ids == model.config.image_token_index).unsqueeze(-1)
        inputs_embeds = inputs_embeds.masked_scatter(image_mask, language_inputs.to(inputs_embeds.dtype))
        inputs = {"inputs_embeds": inputs_embeds, "attention_mask": torch.ones_like(input_ids)}
        if not model.config.text_config.is_encoder_decoder:
            inputs["input_ids"] = input_ids
        return model.language_model.generate(**inputs, **decoding)

    def _library_generate(self, pixels: torch.Tensor, **decoding: object) -> torch.Tensor:
        """The library's call, one row per image of `pixels`: the reference of our pass, and the path left when it
        differs from it."""
        input_ids = self.input_ids.repeat(pixels.shape[0], 1)
        return self.model.generate(pixel_values=pixels, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   **decoding)


@register_filter("blip-2")
class Blip2Filter(ProcessorImageInput, Filter):
    """BLIP-2's image-text match probability (`blip2_itm`) and contrastive similarity (`blip2_itc`), as
    `Blip2ForImageTextRetrieval(..., use_image_text_matching_head=True/False)` computes them."""

    role = "filter"
    scores = (
        Score(ITM, 0.0, 1.0, "BLIP-2 image-text match probability (ITM head averaged over the query tokens, "
                             "softmaxed)"),
        Score(ITC, -1.0, 1.0, "BLIP-2 largest cosine over the query tokens of the projected query and text "
                              "embeddings (ITC)"),
    )
    default_scores = (ITM,)
    default_keep = (f"{ITM}>=0.5",)  # as BLIP's CapFilt threshold on its ITM probability

    def __init__(
        self,
        model_id: str,
        device: str,
        dtype: torch.dtype,
        sdpa: bool = True,
        pair_batch_size: int | None = None,
        text_batch_size: int | None = None,
    ) -> None:
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        # Image-caption pairs per ITM pass and distinct texts per ITC text pass.
        self.pair_batch_size = pair_batch_size or (32 if self.device.type == "cpu" else 256)
        self.text_batch_size = text_batch_size or (64 if self.device.type == "cpu" else 256)
        self.processor = load_pretrained(AutoProcessor, model_id, self.role)
        # The library's default attention (SDPA) is the plain call's; --eager-attention asks for its matmul-softmax
        # attention instead.
        attention = {} if sdpa else {"attn_implementation": "eager"}
        self.model, loading = load_pretrained(Blip2ForImageTextRetrieval, model_id, self.role, dtype=dtype,
                                              output_loading_info=True, **attention)
        # A BLIP-2 captioner (blip2-opt-*, blip2-flan-t5-*) has the same model_type but no ITM head, text
        # embeddings or projections: loaded as a retrieval model, they would be random and score noise.
        if loading["missing_keys"]:
            missing = sorted(loading["missing_keys"])
            raise ModelLoadError(f"the {self.role} {model_id} lacks BLIP-2's image-text retrieval weights "
                                 f"({len(missing)} missing, e.g. {missing[0]}); use a checkpoint of "
                                 f"Blip2ForImageTextRetrieval such as Salesforce/blip2-itm-vit-g")
        self.model.to(self.device).eval()
        # What `tokenizer(..., truncation=True)` keeps, bounded by the Q-Former's positions.
        self.text_max_tokens = min(self.processor.tokenizer.model_max_length,
                                   self.model.config.qformer_config.max_position_embeddings)
        self.own_passes = True  # each image and each distinct text encoded once; else the plain call per pass
        self._check_passes()

    def truncated(self, texts: list[str]) -> list[bool]:
        return longer_than(self.processor.tokenizer, texts, self.text_max_tokens)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the processor makes them, before padding and the image tokens: truncated to the
        tokenizer's length."""
        return self.processor.tokenizer(texts, truncation=True, max_length=self.text_max_tokens)["input_ids"]

    def padded(self, token_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """`token_ids` padded on the right to the longest of them, with their attention mask, on the device."""
        length = max(len(ids) for ids in token_ids)
        pad = self.processor.tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids in token_ids])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids in token_ids])
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}

    def _check_passes(self) -> None:
        """Our passes against the plain call on a probe: two pictures (the probe and its mirror image), one with
        both captions, one with the long one, so that a caption scored against the wrong picture shows."""
        probe = self.probe_pixels()
        pixels = self.to_device(torch.cat([probe, probe.flip(-1)]))
        texts, images = [*PROBE_CAPTIONS, PROBE_CAPTIONS[1]], [0, 0, 1]
        names = (ITM, ITC)
        with torch.inference_mode():
            try:
                expected = self._pair_scores(pixels, texts, images, names, own_passes=False)
            except Exception as error:
                raise self.unusable(error) from error

        @torch.inference_mode()
        def check() -> None:
            actual = self._pair_scores(pixels, texts, images, names, own_passes=True)
            close(torch.stack([actual[name] for name in names]), torch.stack([expected[name] for name in names]),
                  self.dtype, "scores")

        self.own_passes = checked("capfilt's own BLIP-2 passes", self.role, self.model_id, check)

    @torch.inference_mode()
    def score_pixels(
        self, pixels: torch.Tensor, captions: list[list[str]], names: Collection[str]
    ) -> list[list[dict[str, float]]]:
        asked = [score.name for score in self.scores if score.name in names]
        pair_texts = [text for image_texts in captions for text in image_texts]
        if not pair_texts or not asked:
            return no_scores(captions)
        scores = self._pair_scores(self.to_device(pixels), pair_texts, pair_images(captions), asked, self.own_passes)
        columns = {name: values.tolist() for name, values in scores.items()}  # one copy to the host per score
        return per_image([{name: columns[name][pair] for name in asked} for pair in range(len(pair_texts))], captions)

    def _pair_scores(
        self, pixels: torch.Tensor, pair_texts: list[str], image_of_pair: list[int], names: Collection[str],
        own_passes: bool,
    ) -> dict[str, torch.Tensor]:
        """The scores `names` of each pair (a caption and the index of its picture in `pixels`), in float32 on
        the device: through our passes, or the plain call."""
        texts, text_of_pair = distinct_texts(pair_texts)
        token_ids = self.tokenize(texts)
        pair_ids = [token_ids[text] for text in text_of_pair]
        pair_text = torch.tensor(text_of_pair, device=self.device)
        pair_image = torch.tensor(image_of_pair, device=self.device)
        scores: dict[str, torch.Tensor] = {}
        if own_passes:
            image_embeds = self.model.vision_model(pixel_values=pixels).last_hidden_state  # one vision pass
            if ITM in names:
                scores[ITM] = self._itm(image_embeds, pair_ids, pair_image)
            if ITC in names:
                scores[ITC] = self._itc(image_embeds, token_ids, pair_image, pair_text)
        else:
            if ITM in names:
                scores[ITM] = self._plain_itm(pixels, pair_ids, pair_image)
            if ITC in names:
                scores[ITC] = self._plain_itc(pixels, token_ids, pair_image, pair_text)
        return scores

    # Our passes: what the model's forward does after its vision pass, with that pass shared.

    def _itm(self, image_embeds: torch.Tensor, pair_ids: list[list[int]], pair_image: torch.Tensor) -> torch.Tensor:
        """Match probability of each pair (its text's token ids, its picture), in passes of `pair_batch_size`
        pairs of like length."""
        scores = torch.empty(len(pair_ids), device=self.device)
        for rows in passes([len(ids) for ids in pair_ids], self.pair_batch_size):
            tokens = self.padded([pair_ids[row] for row in rows])
            scores[rows] = self._match_probability(image_embeds[pair_image[rows]], tokens)
        return scores

    def _match_probability(self, image_embeds: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Softmax of the ITM head's logits averaged over the query tokens, index 1 = match: the Q-Former over
        the query tokens followed by the text, the queries cross-attending each row's image embeddings."""
        model = self.model
        query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        queries = query_tokens.shape[1]
        query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=self.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = model.qformer(
            query_embeds=model.embeddings(input_ids=tokens["input_ids"], query_embeds=query_tokens),
            query_length=queries,
            attention_mask=torch.cat([query_mask, tokens["attention_mask"]], dim=1),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        logits = model.itm_head(hidden[:, :queries, :].to(model.itm_head.weight.dtype))
        # Averaged in float32 (the library averages in the model's dtype): the same in fp32, closer in bf16.
        return logits.float().mean(dim=1).softmax(dim=-1)[:, 1]

    def _itc(
        self, image_embeds: torch.Tensor, token_ids: list[list[int]], pair_image: torch.Tensor,
        pair_text: torch.Tensor,
    ) -> torch.Tensor:
        """Largest cosine over the query tokens of each pair: one Q-Former pass on the queries for the batch's
        images, one text pass per `text_batch_size` distinct texts."""
        query_feat = self._query_features(image_embeds)  # (images, queries, dim)
        text_feat = torch.empty(len(token_ids), query_feat.shape[-1], device=self.device)
        for rows in passes([len(ids) for ids in token_ids], self.text_batch_size):
            text_feat[rows] = self._text_features(self.padded([token_ids[row] for row in rows]))
        cosines = torch.einsum("pqd,pd->pq", query_feat[pair_image], text_feat[pair_text])
        return cosines.amax(dim=1)

    def _query_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The projected, L2-normalised outputs of the query tokens over each image, in float32 (the library
        normalises in the model's dtype)."""
        model = self.model
        query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        hidden = model.qformer(query_embeds=query_tokens, encoder_hidden_states=image_embeds,
                               encoder_attention_mask=image_mask).last_hidden_state
        projection = model.vision_projection
        return F.normalize(projection(hidden.to(projection.weight.dtype)).float(), dim=-1)

    def _text_features(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """The projected, L2-normalised [CLS] output of the Q-Former on each text alone, in float32."""
        model = self.model
        hidden = model.qformer(query_embeds=model.embeddings(input_ids=tokens["input_ids"]), query_length=0,
                               attention_mask=tokens["attention_mask"]).last_hidden_state
        projection = model.text_projection
        return F.normalize(projection(hidden[:, 0, :].to(projection.weight.dtype)).float(), dim=-1)

    # The plain call: the reference of our passes, and the path left when they differ from it.

    def plain_inputs(self, token_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """The text inputs of the plain call, as the processor makes them: padded, and where the checkpoint's
        config names an image token, after `num_query_tokens` of them (which the model drops again)."""
        tokens = self.padded(token_ids)
        image_token = self.model.config.image_token_index
        if image_token is None:
            return tokens
        rows, queries = len(token_ids), self.model.config.num_query_tokens
        prefix = torch.full((rows, queries), image_token, dtype=torch.long, device=self.device)
        return {"input_ids": torch.cat([prefix, tokens["input_ids"]], dim=1),
                "attention_mask": torch.cat([torch.ones_like(prefix), tokens["attention_mask"]], dim=1)}

    def _plain_itm(self, pixels: torch.Tensor, pair_ids: list[list[int]], pair_image: torch.Tensor) -> torch.Tensor:
        """Match probability of each pair from the plain call, which encodes each pair's picture again."""
        scores = torch.empty(len(pair_ids), device=self.device)
        for rows in passes([len(ids) for ids in pair_ids], self.pair_batch_size):
            output = self.model(pixel_values=pixels[pair_image[rows]],
                                **self.plain_inputs([pair_ids[row] for row in rows]),
                                use_image_text_matching_head=True)
            scores[rows] = output.logits_per_image.float().softmax(dim=-1)[:, 1]
        return scores

    def _plain_itc(
        self, pixels: torch.Tensor, token_ids: list[list[int]], pair_image: torch.Tensor, pair_text: torch.Tensor,
    ) -> torch.Tensor:
        """Similarity of each pair from the plain call, one per text pass (which encodes the batch's pictures
        again); the call gives every picture against every text."""
        scores = torch.empty(len(pixels), len(token_ids), device=self.device)
        for rows in passes([len(ids) for ids in token_ids], self.text_batch_size):
            output = self.model(pixel_values=pixels, **self.plain_inputs([token_ids[row] for row in rows]),
                                use_image_text_matching_head=False)
            scores[:, rows] = output.logits_per_image.float()
        return scores[pair_image, pair_text]
