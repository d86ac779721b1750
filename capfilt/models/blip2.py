"""BLIP-2 filter: the image-text matching probability and the contrastive similarity of BLIP-2's Q-Former, for
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

import torch
import torch.nn.functional as F
from transformers import AutoProcessor, Blip2ForImageTextRetrieval

from capfilt.errors import ModelLoadError
from capfilt.models.base import Filter
from capfilt.models.fast_paths import checked, close
from capfilt.models.image_input import ProcessorImageInput
from capfilt.models.loading import load_pretrained
from capfilt.models.registry import register_filter
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
            return [[{} for _ in image_texts] for image_texts in captions]
        pair_images = [i for i, image_texts in enumerate(captions) for _ in image_texts]
        scores = self._pair_scores(self.to_device(pixels), pair_texts, pair_images, asked, self.own_passes)
        columns = {name: values.tolist() for name, values in scores.items()}  # one copy to the host per score
        result, offset = [], 0
        for image_texts in captions:
            result.append([{name: columns[name][pair] for name in asked}
                           for pair in range(offset, offset + len(image_texts))])
            offset += len(image_texts)
        return result

    def _pair_scores(
        self, pixels: torch.Tensor, pair_texts: list[str], pair_images: list[int], names: Collection[str],
        own_passes: bool,
    ) -> dict[str, torch.Tensor]:
        """The scores `names` of each pair (a caption and the index of its picture in `pixels`), in float32 on
        the device: through our passes, or the plain call."""
        texts = list(dict.fromkeys(pair_texts))  # each distinct text once, in order of first use
        text_index = {text: index for index, text in enumerate(texts)}
        token_ids = self.tokenize(texts)
        pair_ids = [token_ids[text_index[text]] for text in pair_texts]
        pair_text = torch.tensor([text_index[text] for text in pair_texts], device=self.device)
        pair_image = torch.tensor(pair_images, device=self.device)
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
