"""Scaled-dot-product attention for the BLIP towers.

transformers' BLIP code computes attention as matmul → softmax → matmul, materialising every attention
matrix; `torch.nn.functional.scaled_dot_product_attention` computes the same thing with fused kernels
(flash / memory-efficient attention on GPU). `use_sdpa(model)` swaps the forward of each attention module
of one model instance, leaving the classes (and any other model) untouched. Outputs equal the library's to
float rounding: tested in tests/test_fast_attention.py.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention


def vision_attention(self: BlipAttention, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
    batch, length, width = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
    return self.projection(context.transpose(1, 2).reshape(batch, length, width)), None


def text_attention(
    self: BlipTextSelfAttention,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """BlipTextSelfAttention.forward with the same cache handling, attention through SDPA."""
    head = self.attention_head_size
    query = self.query(hidden_states).view(*hidden_states.shape[:-1], -1, head).transpose(1, 2)
    cross = encoder_hidden_states is not None
    mask = encoder_attention_mask if cross else attention_mask
    cache, reuse = past_key_values, False
    if isinstance(past_key_values, EncoderDecoderCache):
        reuse = cross and past_key_values.is_updated.get(self.layer_idx, False)
        cache = past_key_values.cross_attention_cache if cross else past_key_values.self_attention_cache
    if reuse:
        key, value = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
    else:
        states = encoder_hidden_states if cross else hidden_states
        key = self.key(states).view(*states.shape[:-1], -1, head).transpose(1, 2)
        value = self.value(states).view(*states.shape[:-1], -1, head).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
            if cross and isinstance(past_key_values, EncoderDecoderCache):
                past_key_values.is_updated[self.layer_idx] = True
    if mask is not None:
        mask = mask.to(device=query.device, dtype=query.dtype)
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=1 / math.sqrt(head))
    context = context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)
    return context, None


def use_sdpa(model: nn.Module) -> nn.Module:
    """Route every BLIP attention module of `model` through SDPA (inference only: no attention dropout)."""
    for module in model.modules():
        if isinstance(module, BlipAttention):
            module.forward = types.MethodType(vision_attention, module)
        elif isinstance(module, BlipTextSelfAttention):
            module.forward = types.MethodType(text_attention, module)
    return model
