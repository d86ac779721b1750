"""BLIP caption decoding without `generate()`'s per-step overhead, giving the same tokens.

`generate()` spends most of a small model's decoding time outside the model's arithmetic: building masks,
preparing inputs, updating keyword arguments and walking the cache classes at every step. `BlipDecoder`
steps BLIP's text decoder directly, with the library's own layers and weights:
- the prompt is run once per image, not once per beam or sampled caption;
- the image's cross-attention keys and values are projected once per image, and beams attend to them
  together (no copies per beam, none at each beam reorder);
- an image whose captions are final (all its sampled rows ended, or no beam can beat its finished ones)
  leaves the batch: the model runs only on the images still decoding;
- beam search keeps `generate()`'s semantics by calling the library's own beam-search steps
  (`_get_top_k_continuations`, `_update_finished_beams`, ...) on the same scores, with the same logits
  processors (minimum length, repetition penalty).
It covers BLIP's decoding settings; `BlipDecoder.covers` says when a checkpoint asks for anything else
(n-gram blocking, forced tokens, ...), and the captioner then keeps `generate()`. Tests compare both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import MinLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor
from transformers.models.blip.modeling_blip_text import BlipTextLayer, BlipTextLMHeadModel

from capfilt.models.fast_attention import heads

# Generation settings that add logits processors or change stopping; decoding here handles none of them.
_UNHANDLED = ("no_repeat_ngram_size", "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id",
              "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "encoder_repetition_penalty",
              "exponential_decay_length_penalty", "min_new_tokens", "max_new_tokens", "renormalize_logits",
              "epsilon_cutoff", "eta_cutoff", "typical_p", "min_p", "constraints", "force_words_ids", "stop_strings",
              "diversity_penalty", "num_beam_groups", "watermarking_config")
_BEAM_STEPS = ("_get_top_k_continuations", "_get_running_beams_for_next_iteration", "_update_finished_beams",
               "_check_early_stop_heuristic", "_beam_search_has_unfinished_sequences")


class BlipDecoder:
    """Steps a `BlipTextLMHeadModel` over a batch of images, each decoded by `rows_per_image` rows."""

    def __init__(self, text_decoder: BlipTextLMHeadModel, eos_token_id: int, pad_token_id: int) -> None:
        self.decoder = text_decoder
        self.layers: list[BlipTextLayer] = list(text_decoder.bert.encoder.layer)
        self.eos, self.pad = eos_token_id, pad_token_id
        self.generation = text_decoder.generation_config

    @classmethod
    def covers(cls, text_decoder: BlipTextLMHeadModel) -> bool:
        """Whether the checkpoint's generation settings and this transformers version are ones it reproduces."""
        generation, default = text_decoder.generation_config, GenerationConfig()
        same = all(getattr(generation, name, None) == getattr(default, name, None) for name in _UNHANDLED)
        return same and all(hasattr(text_decoder, name) for name in _BEAM_STEPS)

    # --- the model, one step at a time -------------------------------------------------------------------

    def _start(self, image_embeds: torch.Tensor, prompt_ids: torch.Tensor, rows_per_image: int) -> torch.Tensor:
        """Project every layer's image keys and values, run the prompt once per image, and give each of the
        image's rows its copy of the prompt's cache; returns the first logits, one row per decoding row."""
        self.image_keys = []
        for layer in self.layers:
            cross = layer.crossattention.self
            # Contiguous: read at every step, and SDPA is several times slower on the strided view.
            key, value = heads(cross, cross.key, image_embeds), heads(cross, cross.value, image_embeds)
            self.image_keys.append((key.contiguous(), value.contiguous()))
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rows_per_image = rows_per_image
        self.images = image_embeds.shape[0]
        self.active = torch.arange(self.images, device=image_embeds.device)  # images still decoding
        logits = self._forward(prompt_ids.expand(image_embeds.shape[0], -1), prompt=True)
        self.keys = [k.repeat_interleave(rows_per_image, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(rows_per_image, dim=0) for v in self.values]
        return logits.repeat_interleave(rows_per_image, dim=0)

    def _forward(self, tokens: torch.Tensor, prompt: bool = False) -> torch.Tensor:
        """Next-token logits (float32) after `tokens` (rows, new tokens), appending their keys to the cache."""
        past = self.keys[0].shape[2] if self.keys else 0
        # Positions passed explicitly: a public argument, where the cache-length keyword is private and renamed.
        positions = torch.arange(past, past + tokens.shape[1], device=tokens.device)[None, :]
        hidden = self.decoder.bert.embeddings(input_ids=tokens, position_ids=positions)
        for index, layer in enumerate(self.layers):
            hidden = self._layer(layer, index, hidden, prompt)
        return self.decoder.cls(hidden[:, -1:, :])[:, -1, :].float()

    def _layer(self, layer: BlipTextLayer, index: int, hidden: torch.Tensor, causal: bool) -> torch.Tensor:
        attention = layer.attention.self
        scale = 1 / math.sqrt(attention.attention_head_size)
        query = heads(attention, attention.query, hidden)
        key, value = heads(attention, attention.key, hidden), heads(attention, attention.value, hidden)
        if causal:  # the prompt: no cache yet
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[index] = key = torch.cat([self.keys[index], key], dim=2)
            self.values[index] = value = torch.cat([self.values[index], value], dim=2)
        context = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scale)
        attended = layer.attention.output(merge_heads(context), hidden)

        cross = layer.crossattention.self
        query = heads(cross, cross.query, attended)
        image_key, image_value = self.image_keys[index]
        images, count = image_key.shape[0], query.shape[1]
        group = query.shape[0] // images  # rows per image: 1 for the prompt, then rows_per_image
        steps, width = query.shape[2], query.shape[3]
        # Each image's rows are stacked along the query axis: one attention per image, no key copies per row.
        stacked = query.view(images, group, count, steps, width).transpose(1, 2).reshape(images, count, -1, width)
        context = F.scaled_dot_product_attention(stacked, image_key, image_value, scale=scale)
        context = context.view(images, count, group, steps, width).transpose(1, 2).reshape(query.shape)
        crossed = layer.crossattention.output(merge_heads(context), attended)
        return layer.output(layer.intermediate(crossed), crossed)

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits after `tokens` (every row's next token) for every row; only the rows of images still
        decoding are computed, the others get zeros (their outcome is already fixed)."""
        rows = self._rows(self.active)
        logits = self._forward(tokens[rows][:, None])
        if rows.shape[0] == tokens.shape[0]:
            return logits
        return logits.new_zeros(tokens.shape[0], logits.shape[1]).index_copy_(0, rows, logits)

    def _rows(self, images: torch.Tensor) -> torch.Tensor:
        group = self.rows_per_image
        return (images[:, None] * group + torch.arange(group, device=images.device)).reshape(-1)

    def _retire(self, done: torch.Tensor) -> None:
        """Stop computing the images marked in `done` (one flag per image of the batch), once enough of them
        have finished to be worth copying the caches of the others."""
        keep = (~done[self.active]).nonzero().reshape(-1)  # positions within the active images
        retiring = self.active.shape[0] - keep.shape[0]
        if retiring == 0 or (keep.shape[0] and retiring < max(1, self.active.shape[0] // 8)):
            return
        rows = self._rows(keep)
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.image_keys = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in self.image_keys]
        self.active = self.active[keep]

    def _reorder(self, beam_rows: torch.Tensor) -> None:
        """Give each active row the cache of the row it continues (`beam_rows`: a source row for every row
        of the batch; beams only move within their image)."""
        group = self.rows_per_image
        sources = beam_rows[self._rows(self.active)]
        position = torch.zeros(self.images, dtype=torch.long, device=beam_rows.device)  # image -> its cache slot
        position[self.active] = torch.arange(self.active.shape[0], device=beam_rows.device)
        cache_rows = position[sources // group] * group + sources % group
        self.keys = [k.index_select(0, cache_rows) for k in self.keys]
        self.values = [v.index_select(0, cache_rows) for v in self.values]

    def _processors(self, min_length: int, repetition_penalty: float, device: torch.device) -> LogitsProcessorList:
        """What generate() would apply before any sampling warpers, in its order."""
        processors: list[LogitsProcessor] = []
        if repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty)))
        if min_length > 0:
            processors.append(MinLengthLogitsProcessor(min_length, self.eos, device=device))
        return LogitsProcessorList(processors)

    # --- decoding ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits_along(self, image_embeds: torch.Tensor, prompt_ids: torch.Tensor,
                     continuation: torch.Tensor) -> torch.Tensor:
        """Next-token logits (float32) of one row per image after the prompt and after each token of
        `continuation` (rows, tokens) but its last, computed as decoding computes them: what the start-up
        check compares with the text decoder's own forward."""
        logits = [self._start(image_embeds, prompt_ids, 1)]
        for tokens in continuation[:, :-1].T:
            logits.append(self._step(tokens))
        return torch.stack(logits, dim=1)

    @torch.inference_mode()
    def greedy(self, image_embeds: torch.Tensor, prompt_ids: torch.Tensor, rows_per_image: int, max_length: int,
               min_length: int, repetition_penalty: float, warpers: list[LogitsProcessor]) -> torch.Tensor:
        """generate(do_sample=False) with extra `warpers` (e.g. keyed Gumbel noise, which makes it sampling):
        sequences (rows, length), padded after their end."""
        processors = LogitsProcessorList([*self._processors(min_length, repetition_penalty, image_embeds.device), *warpers])
        logits = self._start(image_embeds, prompt_ids, rows_per_image)
        rows = logits.shape[0]
        sequences = prompt_ids.expand(rows, -1)
        unfinished = torch.ones(rows, dtype=torch.bool, device=logits.device)
        while True:
            tokens = processors(sequences, logits).argmax(dim=-1)
            tokens = torch.where(unfinished, tokens, self.pad)
            sequences = torch.cat([sequences, tokens[:, None]], dim=1)
            unfinished &= tokens != self.eos
            if sequences.shape[1] >= max_length or not unfinished.any():
                return sequences
            self._retire(~unfinished.view(-1, rows_per_image).any(dim=1))
            logits = self._step(tokens)

    @torch.inference_mode()
    def beam_search(self, image_embeds: torch.Tensor, prompt_ids: torch.Tensor, num_beams: int, num_sequences: int,
                    max_length: int, min_length: int, repetition_penalty: float) -> torch.Tensor:
        """generate(num_beams=..., do_sample=False): the `num_sequences` best of each image's beams, image by
        image, (images x num_sequences, length)."""
        d, g = self.decoder, self.generation
        # The checkpoint's values, else generate()'s documented defaults.
        length_penalty = 1.0 if g.length_penalty is None else g.length_penalty
        early_stopping = False if g.early_stopping is None else g.early_stopping
        processors = self._processors(min_length, repetition_penalty, image_embeds.device)
        batch, prompt_len, device = image_embeds.shape[0], prompt_ids.shape[0], image_embeds.device
        beams_to_keep = 2 * num_beams
        top_num_beam_mask = torch.arange(beams_to_keep, device=device) < num_beams
        running_sequences = torch.full((batch, num_beams, max_length), self.pad, dtype=torch.int64, device=device)
        running_sequences[:, :, :prompt_len] = prompt_ids
        sequences = running_sequences.clone()
        running_beam_scores = torch.zeros((batch, num_beams), device=device)
        running_beam_scores[:, 1:] = -1e9
        beam_scores = torch.full((batch, num_beams), -1e9, device=device)
        is_sent_finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
        improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
        running_beam_indices = torch.full((batch, num_beams, max_length - prompt_len), -1, dtype=torch.int32,
                                          device=device)
        beam_indices = running_beam_indices.clone()
        logits = self._start(image_embeds, prompt_ids, num_beams)
        cur_len = prompt_len
        while True:
            flat = running_sequences[:, :, :cur_len].reshape(batch * num_beams, cur_len)
            log_probs = processors(flat, F.log_softmax(logits, dim=-1)).view(batch, num_beams, -1)
            log_probs = (log_probs + running_beam_scores[:, :, None]).view(batch, -1)
            topk_log_probs, topk_sequences, topk_beam_indices = d._get_top_k_continuations(
                accumulated_log_probs=log_probs, running_sequences=running_sequences,
                running_beam_indices=running_beam_indices, cur_len=cur_len, decoder_prompt_len=prompt_len,
                do_sample=False, beams_to_keep=beams_to_keep, num_beams=num_beams, batch_size=batch,
                vocab_size=logits.shape[-1])  # required before transformers 5.18, ignored after
            hits_stop = (topk_sequences[:, :, cur_len] == self.eos) | (cur_len + 1 >= max_length)
            running_sequences, running_beam_scores, running_beam_indices = d._get_running_beams_for_next_iteration(
                topk_log_probs=topk_log_probs, topk_running_sequences=topk_sequences,
                topk_running_beam_indices=topk_beam_indices, next_token_hits_stopping_criteria=hits_stop,
                num_beams=num_beams)
            sequences, beam_scores, beam_indices, is_sent_finished = d._update_finished_beams(
                sequences=sequences, topk_running_sequences=topk_sequences, beam_scores=beam_scores,
                topk_log_probs=topk_log_probs, beam_indices=beam_indices, topk_running_beam_indices=topk_beam_indices,
                is_early_stop_heuristic_unsatisfied=improvable, is_sent_finished=is_sent_finished,
                next_token_hits_stopping_criteria=hits_stop, top_num_beam_mask=top_num_beam_mask,
                num_beams=num_beams, cur_len=cur_len, decoder_prompt_len=prompt_len, length_penalty=length_penalty,
                early_stopping=early_stopping)
            self._reorder(running_beam_indices[..., cur_len - prompt_len].reshape(-1).long())
            cur_len += 1
            improvable = d._check_early_stop_heuristic(
                is_early_stop_heuristic_unsatisfied=improvable, running_beam_scores=running_beam_scores,
                beam_scores=beam_scores, is_sent_finished=is_sent_finished, cur_len=cur_len, max_length=max_length,
                decoder_prompt_len=prompt_len, early_stopping=early_stopping, length_penalty=length_penalty)
            if not d._beam_search_has_unfinished_sequences(improvable, is_sent_finished, hits_stop, early_stopping):
                break
            # An image that can no longer improve on its finished captions keeps them whatever comes next.
            self._retire(~improvable[:, 0])
            logits = self._step(running_sequences[:, :, cur_len - 1].reshape(-1))
        best = sequences[:, :num_sequences].reshape(batch * num_sequences, -1)
        generated = (beam_indices[:, :num_sequences].reshape(batch * num_sequences, -1) + 1).bool().sum(dim=1).max()
        return best[:, : prompt_len + generated]


def merge_heads(context: torch.Tensor) -> torch.Tensor:
    """(batch, heads, tokens, width) → (batch, tokens, heads x width)."""
    batch, count, steps, width = context.shape
    return context.transpose(1, 2).reshape(batch, steps, count * width)
