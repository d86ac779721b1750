"""Scaled-dot-product attention for the BLIP towers.

transformers' BLIP code computes attention as matmul → softmax → matmul, materialising every attention
matrix; `torch.nn.functional.scaled_dot_product_attention` computes the same thing with fused kernels
(flash / memory-efficient attention on GPU). `use_sdpa(model)` swaps the forward of each attention module
of one model instance, leaving the classes (and any other model) untouched. Outputs equal the library's to
float rounding: tested in tests/test_fast_attention.py.

`PairImageCache` goes further for the filter: its text encoder cross-attends to the image, and the library
projects the image tokens to keys and values once per image-caption pair; with this cache, once per image.
(Captioning does the same in capfilt.models.blip_decoding.)
"""

from __future__ import annotations

import inspect
import math
import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.blip.modeling_blip import BlipAttention
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention


def vision_attention(self: BlipAttention, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, None]:
    batch, length, width = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
    return self.projection(context.transpose(1, 2).reshape(batch, length, width)), None


class PairImageCache(EncoderDecoderCache):
    """For scoring image-text pairs: cross-attention keys and values projected once per image and shared by
    all of its captions, instead of once per pair. `encoder_hidden_states` holds each image once and
    `pair_images` (set before each text pass) says which image each text row is paired with; image tokens
    are never padding, so no encoder mask applies. Images are projected in groups of a fixed size, so that
    an image's keys do not depend on how many images came with it."""

    def __init__(self, group_size: int) -> None:
        super().__init__(DynamicCache(), DynamicCache())
        self.group_size = group_size
        self.pair_images = torch.empty(0, dtype=torch.long)

    def image_keys(self, module: BlipTextSelfAttention, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values of every image, (images, heads, tokens, width), projected on first use."""
        layer = module.layer_idx
        if not self.is_updated.get(layer, False):
            self.cross_attention_cache.update(*self._project(module, images), layer)
            self.is_updated[layer] = True
        entry = self.cross_attention_cache.layers[layer]
        return entry.keys, entry.values

    def _project(self, module: BlipTextSelfAttention, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = [], []
        for start in range(0, images.shape[0], self.group_size):
            group = images[start : start + self.group_size]
            padded = torch.cat([group, group[:1].expand(self.group_size - group.shape[0], *group.shape[1:])])
            keys.append(heads(module, module.key, padded)[: group.shape[0]])
            values.append(heads(module, module.value, padded)[: group.shape[0]])
        return torch.cat(keys), torch.cat(values)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, key[self.pair_images], value[self.pair_images], scale=scale)


def heads(module: BlipTextSelfAttention, linear: nn.Linear, states: torch.Tensor) -> torch.Tensor:
    """`linear(states)` split into attention heads: (batch, heads, tokens, head width)."""
    return linear(states).view(*states.shape[:-1], -1, module.attention_head_size).transpose(1, 2)


def text_attention(
    self: BlipTextSelfAttention,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    past_key_values=None,
    cache=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """BlipTextSelfAttention.forward with the same cache handling, attention through SDPA. The cache comes as
    `past_key_values` (transformers < 5.24) or `cache` (5.24 on)."""
    past_key_values = cache if cache is not None else past_key_values
    scale = 1 / math.sqrt(self.attention_head_size)
    query = heads(self, self.query, hidden_states)
    cross = encoder_hidden_states is not None
    if cross and isinstance(past_key_values, PairImageCache):
        key, value = past_key_values.image_keys(self, encoder_hidden_states)
        context = past_key_values.attend(query, key, value, scale)
    else:
        mask = encoder_attention_mask if cross else attention_mask
        cache = past_key_values
        if isinstance(past_key_values, EncoderDecoderCache):
            cache = past_key_values.cross_attention_cache if cross else past_key_values.self_attention_cache
        if isinstance(past_key_values, PairImageCache):
            cache = None
        if cross and cache is not None and past_key_values.is_updated.get(self.layer_idx, False):
            key, value = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        else:
            states = encoder_hidden_states if cross else hidden_states
            key, value = heads(self, self.key, states), heads(self, self.value, states)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx)
                if cross:
                    past_key_values.is_updated[self.layer_idx] = True
        if mask is not None:
            mask = mask.to(device=query.device, dtype=query.dtype)
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    context = context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)
    return context, None


def cache_argument(module: nn.Module | type[nn.Module]) -> str:
    """The name under which `module.forward` takes its cache: `cache` from transformers 5.24 on, before that
    `past_key_values` (public arguments, read from the signature rather than assumed)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def use_sdpa(model: nn.Module) -> nn.Module:
    """Route every BLIP attention module of `model` through SDPA (inference only: no attention dropout)."""
    for module in model.modules():
        if isinstance(module, BlipAttention):
            module.forward = types.MethodType(vision_attention, module)
        elif isinstance(module, BlipTextSelfAttention):
            module.forward = types.MethodType(text_attention, module)
    return model


def use_library_attention(model: nn.Module) -> nn.Module:
    """Undo `use_sdpa`: every attention module runs its class's own forward again."""
    for module in model.modules():
        if isinstance(module, (BlipAttention, BlipTextSelfAttention)):
            module.__dict__.pop("forward", None)
    return model
