"""Held-out evaluation of a BLIP captioner and filter, the figures BLIP reports for COCO.

- Captioner: beam-search captions (3 beams, BLIP's `caption_coco.yaml`) against every human caption of the
  picture: BLEU-4 and CIDEr(-D) from pycocoevalcap, the COCO caption scorers BLIP uses, and exact match.
- Filter: ITM accuracy on the true pairs and on each picture's and each caption's hardest negative, and
  image-to-text and text-to-image recall at 1 and 5, ranked as BLIP ranks (`blip_retrieval.evaluation`): the
  ITC cosine picks the `RERANK` best candidates, which are ordered by ITM match logit plus cosine.

Both run the model capfilt decodes and scores with, on pictures through capfilt's decoder and the
checkpoint's processor. `finetune` calls them after each epoch; `evaluate` on a saved model.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from capfilt.errors import ConfigError

# Candidates the ITM head re-ranks per query (BLIP's k_test is 256 for COCO's 5k pictures).
RERANK = 16
BEAMS = 3
MIN_LENGTH = 5
_PUNCTUATION = re.compile(r"[^\w\s]")


@dataclass(frozen=True)
class HeldOut:
    """Held-out pairs grouped by picture: each picture once, and every caption with the picture it describes."""

    images: list[bytes]
    captions: list[str]
    caption_image: list[int]

    @classmethod
    def from_pairs(cls, images: list[bytes], captions: list[str]) -> HeldOut:
        index: dict[bytes, int] = {}
        pictures: list[bytes] = []
        caption_image = []
        for image, caption in zip(images, captions):
            digest = hashlib.sha256(image).digest()
            if digest not in index:
                index[digest] = len(pictures)
                pictures.append(image)
            caption_image.append(index[digest])
        return cls(pictures, list(captions), caption_image)

    def references(self) -> list[list[str]]:
        found: list[list[str]] = [[] for _ in self.images]
        for caption, image in zip(self.captions, self.caption_image):
            found[image].append(caption)
        return found


def check_scorers() -> None:
    """Refuse, before any training, a captioner evaluation without pycocoevalcap."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as error:
        raise ConfigError("evaluating a captioner needs pycocoevalcap: pip install 'capfilt[train]'") from error


def normalise(text: str) -> str:
    """Lower case without punctuation, as COCO's PTB tokenizer leaves captions for the scorers."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def caption_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-4 and CIDEr-D (pycocoevalcap) of each picture's caption against its references, and the share of
    captions equal to one of their references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    candidates = {i: [normalise(text)] for i, text in enumerate(predictions)}
    truths = {i: [normalise(text) for text in texts] for i, texts in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(truths, candidates, verbose=0)
    cider, _ = Cider().compute_score(truths, candidates)
    exact = sum(candidates[i][0] in truths[i] for i in candidates) / len(candidates)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "exact_match": exact}


def _pixels(images: list[bytes], image_processor) -> torch.Tensor:
    from capfilt.decode import DEFAULT_MAX_PIXELS, decode_image

    decoded = [decode_image(image, DEFAULT_MAX_PIXELS) for image in images]
    return image_processor(images=decoded, return_tensors="pt")["pixel_values"]


def _batches(count: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


@torch.no_grad()
def evaluate_captioner(model, processor, held_out: HeldOut, prompt: str, batch_size: int,
                       max_length: int) -> dict[str, float]:
    """Caption each held-out picture with `generate()` (beam search, BLIP's settings) and score the captions."""
    device = next(model.parameters()).device
    predictions: list[str] = []
    for rows in _batches(len(held_out.images), batch_size):
        pixels = _pixels(held_out.images[rows], processor.image_processor).to(device, model.dtype)
        prompts = processor.tokenizer([prompt] * len(pixels), return_tensors="pt").to(device)
        output = model.generate(pixel_values=pixels, input_ids=prompts.input_ids,
                                attention_mask=prompts.attention_mask, num_beams=BEAMS, max_length=max_length,
                                min_length=MIN_LENGTH)
        texts = processor.tokenizer.batch_decode(output, skip_special_tokens=True)
        # The decoded text repeats the prompt, which is not part of the caption capfilt writes.
        predictions += [text.strip().removeprefix(prompt.strip()).strip() for text in texts]
    return caption_metrics(predictions, held_out.references())


@torch.no_grad()
def evaluate_filter(model, processor, held_out: HeldOut, batch_size: int, max_tokens: int) -> dict[str, float]:
    """ITM accuracy against hard negatives and retrieval recall of a `BlipForImageTextRetrieval`."""
    from capfilt.models.blip_training import image_embeddings, itm_logits

    device = next(model.parameters()).device
    embeds = torch.cat([
        image_embeddings(model, _pixels(held_out.images[rows], processor.image_processor).to(device, model.dtype))
        for rows in _batches(len(held_out.images), batch_size)
    ])
    tokens = processor.tokenizer(held_out.captions, padding="longest", truncation=True, max_length=max_tokens,
                                 return_tensors="pt").to(device)
    text_features = torch.cat([
        model.text_proj(model.text_encoder(input_ids=tokens.input_ids[rows],
                                           attention_mask=tokens.attention_mask[rows]).last_hidden_state[:, 0])
        for rows in _batches(len(held_out.captions), batch_size)
    ])
    cosine = (F.normalize(model.vision_proj(embeds[:, 0]).float(), dim=-1)
              @ F.normalize(text_features.float(), dim=-1).t())
    owner = torch.tensor(held_out.caption_image, device=device)
    matches = owner[None, :] == torch.arange(len(held_out.images), device=device)[:, None]

    def match_logits(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """ITM (no match, match) logits of picture images[i] with caption texts[i]."""
        return torch.cat([
            itm_logits(model, embeds[images[rows]], tokens.input_ids[texts[rows]],
                       tokens.attention_mask[texts[rows]]).float()
            for rows in _batches(len(images), batch_size)
        ])

    def recall(similarity: torch.Tensor, correct: torch.Tensor, query_is_image: bool) -> tuple[float, float]:
        """Recall at 1 and 5 of each row's query over the columns, the best RERANK re-ranked by ITM."""
        top = similarity.topk(min(RERANK, similarity.shape[1]), dim=1)
        queries = torch.arange(similarity.shape[0], device=device).repeat_interleave(top.indices.shape[1])
        candidates = top.indices.flatten()
        pairs = (queries, candidates) if query_is_image else (candidates, queries)
        score = torch.full_like(similarity, float("-inf"))
        score[queries, candidates] = match_logits(*pairs)[:, 1] + top.values.flatten()
        ranks = score.argsort(dim=1, descending=True)
        first_hit = correct.gather(1, ranks).float().argmax(dim=1)
        found = correct.gather(1, ranks).any(dim=1)
        return tuple(float(((first_hit < k) & found).float().mean()) for k in (1, 5))

    i2t = recall(cosine, matches, query_is_image=True)
    t2i = recall(cosine.t(), matches.t(), query_is_image=False)

    # ITM on every true pair, each picture with its most similar other caption, each caption with its most
    # similar other picture: a decision is right when match probability > 0.5 says so.
    texts = torch.arange(len(held_out.captions), device=device)
    pictures = torch.arange(len(held_out.images), device=device)
    other = cosine.masked_fill(matches, float("-inf"))
    has_other = ~matches.all(dim=1)
    negative_text = other.argmax(dim=1)[has_other]
    negative_image = other.argmax(dim=0)
    positive = match_logits(owner, texts).softmax(-1)[:, 1] > 0.5
    negative = torch.cat([
        match_logits(pictures[has_other], negative_text),
        match_logits(negative_image, texts) if has_other.any() else torch.empty(0, 2, device=device),
    ]).softmax(-1)[:, 1] <= 0.5
    accuracy = float(torch.cat([positive, negative]).float().mean())
    return {"itm_accuracy": accuracy, "i2t_r1": i2t[0], "i2t_r5": i2t[1], "t2i_r1": t2i[0], "t2i_r5": t2i[1]}


def evaluate(role: str, model: str, data: str, batch_size: int = 32, device: str = "cpu",
             prompt: str = "a picture of ", storage_options: dict[str, Any] | None = None) -> dict[str, float]:
    """The held-out figures of a saved captioner or filter on the pairs of `data` (any input capfilt reads)."""
    from transformers import AutoProcessor, BlipForConditionalGeneration, BlipForImageTextRetrieval

    from capfilt.finetune import CAPTIONER_MAX_TOKENS, FILTER_MAX_TOKENS, check_model, read_pairs
    from capfilt.models.loading import load_pretrained

    check_model(role, model)
    if role == "captioner":
        check_scorers()
    pairs = read_pairs(data, storage_options)
    if not pairs.images:
        raise ConfigError(f"no usable image-caption pairs in {data}")
    held_out = HeldOut.from_pairs(pairs.images, pairs.captions)
    processor = load_pretrained(AutoProcessor, model, role)
    cls = BlipForConditionalGeneration if role == "captioner" else BlipForImageTextRetrieval
    loaded = load_pretrained(cls, model, role, dtype=torch.float32).to(device).eval()
    if role == "captioner":
        return evaluate_captioner(loaded, processor, held_out, prompt, batch_size, CAPTIONER_MAX_TOKENS)
    return evaluate_filter(loaded, processor, held_out, batch_size, FILTER_MAX_TOKENS)
