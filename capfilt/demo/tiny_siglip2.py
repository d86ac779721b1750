"""A tiny random-weight SigLIP 2 NaFlex checkpoint for tests, built from transformers' own SigLIP 2 classes.

It loads and runs like google/siglip2-base-patch16-naflex: a `Siglip2Model` saved with `save_pretrained`, and a
`Siglip2Processor` holding a real `Siglip2Tokenizer` (Gemma's byte-fallback BPE with SigLIP 2's lowercasing, its
vocabulary trained here on the shapes domain's captions and junk alt text; `<eos>` closes every text and
`<pad>` pads it on the right to the text tower's 64 positions, as the released checkpoints were converted) and a
`Siglip2ImageProcessorPil` (each picture resized, keeping its aspect ratio, to at most `max_num_patches` patches
of 16 pixels, normalised with mean and std 0.5, cut into patches and padded).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers
from transformers import (
    Siglip2Config,
    Siglip2Model,
    Siglip2Processor,
    Siglip2TextConfig,
    Siglip2VisionConfig,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from capfilt.demo import shapes
from capfilt.demo.pil_processors import pil_image_processor

TEXT_POSITIONS = 64  # the text tower's length, as released: Siglip2Processor pads texts to 64 tokens
PATCH_SIZE = 16  # as released: Siglip2Processor's default patch size


def build_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerBase:
    """SigLIP 2's tokenizer over a byte-fallback BPE vocabulary trained on shapes captions and junk alt text:
    `Siglip2Tokenizer` (Gemma's, lowercasing), or in releases without it Gemma's, which SigLIP 2 checkpoints
    loaded there."""
    rng = random.Random(0)
    lines = [shapes.describe(shapes.random_scene(rng)) for _ in range(300)]
    lines += [shapes.junk_alt_text(rng) for _ in range(100)]
    tokenizer_class = getattr(transformers, "Siglip2Tokenizer", None) or transformers.GemmaTokenizer
    base = tokenizer_class(padding_side=padding_side, add_eos_token=True)
    return base.train_new_from_iterator(lines, vocab_size=200)


def build_tiny_siglip2(path: Path, seed: int = 0, max_num_patches: int = 16, position_grid: int = 4,
                       hidden: int = 32, layers: int = 2, heads: int = 2, padding_side: str = "right") -> Path:
    """Save a random-weight `Siglip2Model` and its `Siglip2Processor` into `path`, loadable with
    `Siglip2Model.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`; the same seed gives the same
    weights. Pictures become at most `max_num_patches` patches; the learned position embeddings are a
    `position_grid`² grid, resized to each picture's patch grid. `padding_side="left"` gives a tokenizer that
    pads on the left (Siglip2Tokenizer's class default). For tests: fast to build and run, saying nothing
    meaningful."""
    path = Path(path)
    tokenizer = build_tokenizer(padding_side)
    image_processor = pil_image_processor("Siglip2")(patch_size=PATCH_SIZE, max_num_patches=max_num_patches)
    processor = Siglip2Processor(image_processor=image_processor, tokenizer=tokenizer)
    text = Siglip2TextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             max_position_embeddings=TEXT_POSITIONS, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    vision = Siglip2VisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, num_patches=position_grid**2, patch_size=PATCH_SIZE)
    config = Siglip2Config(text_config=text.to_dict(), vision_config=vision.to_dict())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Siglip2Model(config).eval()
        # Random init leaves logit_scale and logit_bias at SigLIP's start values (log 10, -10), where every
        # probability is near 0; spread them so that tests see probabilities across (0, 1).
        model.logit_scale.data.fill_(2.0)
        model.logit_bias.data.fill_(0.5)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
