"""Nucleus sampling seeded per sample, so that a caption depends only on the seed and the sample's key.

`generate(do_sample=True)` draws every row of a batch from one global random stream, so a caption would
change with batch size, worker count or where a run was resumed. Instead each row gets Gumbel noise from a
counter-based hash of (row seed, position, token id) and decoding takes the argmax: the argmax of
logits + Gumbel noise is an exact draw from softmax(logits) (the Gumbel-max trick), the same distribution
as multinomial sampling after the same top-k / top-p filtering. The hash is plain integer arithmetic, so
the noise is identical on every device and batch layout.
"""

from __future__ import annotations

import hashlib

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

_MASK32 = 0xFFFFFFFF
# Odd constants below 2**31, so every product stays inside int64 (no overflow on any device).
_STEP_MIX = 0x7FEB352D
_TOKEN_MIX = 0x632BE5AB
_HASH_MIX = 0x045D9F3B


def sample_seed(seed: int, key: str, index: int) -> int:
    """The seed of the `index`-th caption of sample `key` under the run seed `seed`."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def sampling_warpers(generation: GenerationConfig, top_p: float) -> list[LogitsProcessor]:
    """The filters `generate(do_sample=True, top_p=top_p)` applies before drawing, in its order: the checkpoint's
    temperature and top-k (from `generation`, the generation config generate() reads), then `top_p`."""
    warpers: list[LogitsProcessor] = []
    if generation.temperature is not None and generation.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(generation.temperature))
    if generation.top_k:
        warpers.append(TopKLogitsWarper(generation.top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def uniform_noise(row_seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """Uniforms in (0, 1), one per (row, token), a pure function of (row seed, step, token id)."""
    tokens = torch.arange(vocab_size, device=row_seeds.device, dtype=torch.int64)
    x = (row_seeds[:, None] + (step * _STEP_MIX & _MASK32) + tokens[None, :] * _TOKEN_MIX) & _MASK32
    for _ in range(2):  # a 32-bit integer finaliser (two xorshift-multiply rounds)
        x = (((x >> 16) ^ x) * _HASH_MIX) & _MASK32
    x = (x >> 16) ^ x
    return (x.to(torch.float64) + 0.5) / 2.0**32


class KeyedGumbelNoise(LogitsProcessor):
    """Adds per-row Gumbel noise to filtered scores, for greedy decoding to sample from them.

    Rows follow `generate`'s layout: sample i's return sequence j is row i * num_return_sequences + j.
    """

    def __init__(self, row_seeds: list[int]) -> None:
        self.row_seeds = torch.tensor(row_seeds, dtype=torch.int64)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        seeds = self.row_seeds.to(scores.device)
        uniforms = uniform_noise(seeds, input_ids.shape[1], scores.shape[-1])
        gumbel = -torch.log(-torch.log(uniforms))
        return scores + gumbel.to(scores.dtype)
