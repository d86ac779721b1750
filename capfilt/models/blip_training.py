"""BLIP's fine-tuning losses for the captioner (language modelling) and the filter (ITC + ITM), as BLIP
fine-tunes both on human-annotated pairs before CapFilt (salesforce/BLIP `models/blip.py`,
`models/blip_retrieval.py`).

Both losses run the very transformers modules capfilt runs at inference (`BlipForConditionalGeneration`,
`BlipForImageTextRetrieval`), on the inputs capfilt feeds them, so a fine-tuned model is scored and decoded the
way it was trained: the captioner's decoder starts from [DEC] (bos) as `generate()` makes it, and the filter's
ITM reads the text's first token as the tokenizer gives it, exactly as `BlipForImageTextRetrieval.forward` does
(BLIP's own code swaps in an [ENC] token; the transformers checkpoints and capfilt do not).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, PreTrainedTokenizerBase

IGNORE = -100  # the label cross-entropy skips
# BLIP's temperature: its start value and the range it is clamped to after every update.
INITIAL_TEMPERATURE = 0.07
TEMPERATURE_RANGE = (0.001, 0.5)


def prompt_length(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """Tokens of the prompt the decoder is conditioned on but never predicts: [DEC] and the prompt's words,
    not the [SEP] the tokenizer closes it with (BLIP's `len(tokenizer(prompt).input_ids) - 1`)."""
    return len(tokenizer(prompt).input_ids) - 1


def caption_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """Targets for the LM loss: the input ids, with the prompt and the padding ignored.

    Aligned with `input_ids` (not shifted): the loss shifts them, as transformers' `labels` expect.
    """
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE)
    labels[:, :prompt_length] = IGNORE
    return labels


def decoder_input_ids(model: BlipForConditionalGeneration, input_ids: torch.Tensor) -> torch.Tensor:
    """The tokenizer's ids with the first ([CLS]) swapped for [DEC] (bos): what `generate()` starts from.

    `BlipForConditionalGeneration.forward` passes ids through unchanged (only `generate()` swaps), so training
    has to swap them itself to learn the sequences capfilt decodes.
    """
    ids = input_ids.clone()
    ids[:, 0] = model.config.text_config.bos_token_id
    return ids


def captioner_loss(
    model: BlipForConditionalGeneration,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_length: int,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """BLIP's captioning loss on "[DEC] prompt caption [SEP]": next-token cross-entropy with label smoothing
    (BLIP's `BertLMHeadModel` uses 0.1), averaged over the caption's tokens and its [SEP].

    Computed here rather than through `labels=`: transformers takes the smoothing from the checkpoint's
    config (0 for the released ones), and BLIP's recipe needs 0.1. It runs the two passes
    `BlipForConditionalGeneration.forward` runs, but through the submodules, so that it can itself be the
    model's forward (under DDP, which synchronises only the gradients of passes made inside its forward).
    """
    ids = decoder_input_ids(model, input_ids)
    image_embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    logits = model.text_decoder(input_ids=ids, attention_mask=attention_mask,
                                encoder_hidden_states=image_embeds).logits
    labels = caption_labels(ids, attention_mask, prompt_length)
    # Position t predicts token t + 1.
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
    )


class FilterLosses(NamedTuple):
    itc: torch.Tensor
    itm: torch.Tensor
    total: torch.Tensor


def image_embeddings(model: BlipForImageTextRetrieval, pixel_values: torch.Tensor) -> torch.Tensor:
    return model.vision_model(pixel_values=pixel_values).last_hidden_state


def cosine_similarity(
    model: BlipForImageTextRetrieval, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Images × texts cosine of the projected [CLS] features: `model(..., use_itm_head=False).itm_score`."""
    image_features, text_features = itc_features(model, image_embeds, input_ids, attention_mask)
    return image_features @ text_features.t()


def itc_features(
    model: BlipForImageTextRetrieval, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised ITC projections of the images' and the texts' [CLS] features."""
    text = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    image_features = F.normalize(model.vision_proj(image_embeds[:, 0, :]), dim=-1)
    text_features = F.normalize(model.text_proj(text[:, 0, :]), dim=-1)
    return image_features, text_features


def itm_logits(
    model: BlipForImageTextRetrieval, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """(no match, match) logits of each image with its row's text: `model(..., use_itm_head=True).itm_score`."""
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    fused = model.text_encoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_mask,
    ).last_hidden_state
    return model.itm_head(fused[:, 0, :])


def hard_negatives(
    sim: torch.Tensor, generator: torch.Generator | None = None, matches: torch.Tensor | None = None
) -> torch.Tensor:
    """For each row of `sim`, one column drawn in proportion to softmax(row) with the row's matches (the
    diagonal unless `matches` says more) excluded; -1 for a row with no other column (a batch of one).

    Softmax over the non-matching columns only is softmax(sim) with the matches zeroed, renormalised (as
    `torch.multinomial` would), but never all zero: a confident model underflows softmax(sim)'s off-diagonal.
    """
    if matches is None:
        matches = torch.eye(*sim.shape, dtype=torch.bool, device=sim.device)
    picks = torch.full((sim.shape[0],), -1, dtype=torch.long, device=sim.device)
    has_negative = ~matches.all(dim=1)
    if has_negative.any():
        with torch.no_grad():
            weights = sim[has_negative].float().masked_fill(matches[has_negative], float("-inf")).softmax(dim=1)
            picks[has_negative] = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return picks


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


@functools.cache
def _loss_group() -> torch.distributed.ProcessGroup:
    """A process group of the loss's own: its collectives, some in the backward pass, must not interleave with
    the gradient all-reduces DDP issues on the default group while the backward pass runs, whose order relative
    to them can differ between processes (a collective matched with another hangs). Created by every process at
    its first gather, which they all reach together."""
    return torch.distributed.new_group(backend=torch.distributed.get_backend())


def release_loss_group() -> None:
    """Forget the loss's group, before the process group it belongs to is destroyed."""
    if _loss_group.cache_info().currsize:
        torch.distributed.destroy_process_group(_loss_group())
    _loss_group.cache_clear()


class _GatherWithGrad(torch.autograd.Function):
    """BLIP's `GatherLayer`: all-gather forward; backward sums each part's gradient over the processes (each
    used every part in its loss) and hands every process the sum for its own part."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=_loss_group())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *gradients: torch.Tensor) -> torch.Tensor:
        summed = torch.stack(gradients)
        torch.distributed.all_reduce(summed, group=_loss_group())
        return summed[torch.distributed.get_rank()]


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor`, concatenated in rank order, with gradients flowing back to each process's
    own part (BLIP's `all_gather_with_grad`). The tensor itself in a single process."""
    if world_size() == 1:
        return tensor
    return torch.cat(_GatherWithGrad.apply(tensor))


def gather_padded(tensor: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's token rows and every process's, all padded with `pad` to the longest row of any."""
    if world_size() == 1:
        return tensor, tensor
    longest = torch.tensor(tensor.shape[1], device=tensor.device)
    torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX, group=_loss_group())
    padded = F.pad(tensor, (0, int(longest) - tensor.shape[1]), value=pad)
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    torch.distributed.all_gather(parts, padded, group=_loss_group())
    return padded, torch.cat(parts)


class FilterLoss(torch.nn.Module):
    """BLIP's retrieval fine-tuning loss, ITC + ITM with hard negatives, holding ITC's learnt temperature.

    The retrieval model keeps no temperature (its ITC score is the plain cosine), so this module owns it; give
    its parameters to the optimiser along with the model's.
    """

    def __init__(self, temperature: float = INITIAL_TEMPERATURE) -> None:
        super().__init__()
        self.temp = torch.nn.Parameter(torch.tensor(float(temperature)))

    def itc_logits(
        self,
        model: BlipForImageTextRetrieval,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Images × texts similarity over the temperature, clamped first to BLIP's range as BLIP does."""
        return cosine_similarity(model, image_embeds, input_ids, attention_mask) / self.temperature()

    def temperature(self) -> torch.Tensor:
        with torch.no_grad():
            self.temp.clamp_(*TEMPERATURE_RANGE)
        return self.temp

    def forward(
        self,
        model: BlipForImageTextRetrieval,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generator: torch.Generator | None = None,
        image_ids: torch.Tensor | None = None,
    ) -> FilterLosses:
        """Row i of the batch is a matching pair. `image_ids` marks rows showing the same picture (as with
        several captions per image): they count as matches of each other, never as negatives.

        Under DDP, as in BLIP, each process's images and texts are contrasted with, and draw their hard
        negatives from, the batches of all processes (gathered, with gradients)."""
        image_embeds = image_embeddings(model, pixel_values)
        image_features, text_features = itc_features(model, image_embeds, input_ids, attention_mask)
        temperature = self.temperature()
        # This process's rows against every process's: the whole batch in a single process.
        sim_i2t = image_features @ gather(text_features).t() / temperature
        sim_t2i = text_features @ gather(image_features).t() / temperature
        all_embeds = gather(image_embeds)
        input_ids, all_input_ids = gather_padded(input_ids, model.config.text_config.pad_token_id or 0)
        attention_mask, all_attention_mask = gather_padded(attention_mask, 0)
        first = torch.distributed.get_rank() * len(input_ids) if world_size() > 1 else 0
        if image_ids is None:
            image_ids = torch.arange(first, first + len(input_ids), device=input_ids.device)
        all_image_ids = gather(image_ids)
        matches = image_ids[:, None] == all_image_ids[None, :]
        # BLIP mixes these hard targets with a momentum encoder's predictions (distillation) and also contrasts
        # with a queue of past momentum features; without a momentum encoder, the in-batch texts and images and
        # the hard targets alone (BLIP's `pos_idx / pos_idx.sum(1)`): every match of a row shares its probability.
        targets = matches.float() / matches.sum(dim=1, keepdim=True)
        itc = (
            -(F.log_softmax(sim_i2t, dim=1) * targets).sum(1).mean()
            - (F.log_softmax(sim_t2i, dim=1) * targets).sum(1).mean()
        ) / 2

        # ITM: the positives, each text with a hard-negative image, each image with a hard-negative text.
        negative_text = hard_negatives(sim_i2t, generator, matches)
        negative_image = hard_negatives(sim_t2i, generator, matches)
        texts_of_negative_images = (negative_image >= 0).nonzero().squeeze(1)
        images_of_negative_texts = (negative_text >= 0).nonzero().squeeze(1)
        # A batch of one (or of one picture's captions only) has no negatives: its ITM sees the positives alone.
        images = torch.cat(
            [
                image_embeds,
                all_embeds[negative_image[texts_of_negative_images]],
                image_embeds[images_of_negative_texts],
            ]
        )
        texts = torch.cat([input_ids, input_ids[texts_of_negative_images],
                           all_input_ids[negative_text[images_of_negative_texts]]])
        masks = torch.cat([attention_mask, attention_mask[texts_of_negative_images],
                           all_attention_mask[negative_text[images_of_negative_texts]]])
        logits = itm_logits(model, images, texts, masks)
        labels = torch.zeros(len(texts), dtype=torch.long, device=logits.device)
        labels[: len(input_ids)] = 1
        itm = F.cross_entropy(logits.float(), labels)
        return FilterLosses(itc=itc, itm=itm, total=itc + itm)
