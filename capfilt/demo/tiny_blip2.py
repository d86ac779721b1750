"""A tiny random-weight BLIP-2 image-text retrieval checkpoint for tests, built from transformers' own classes.

It loads and runs like Salesforce/blip2-itm-vit-g: a `Blip2ForImageTextRetrieval` (vision tower, Q-Former with
its text input, ITC projections and ITM head; no language model) saved with `save_pretrained`, and a
`Blip2Processor` holding a BERT WordPiece tokenizer (capfilt's shapes vocabulary) and BLIP's PIL image
processor. With `image_tokens` (the default, as the processors of transformers' converted BLIP-2 checkpoints
are) the processor puts `num_query_tokens` `<image>` tokens before each text and the config names their id,
which the model drops again; without, the processor gives plain BERT tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
)

from capfilt.demo.tiny_blip import BlipImageProcessorPil, build_tokenizer

# The tokenizer's (and the Q-Former's) longest text, in tokens: short, so that tests can pass a longer caption.
TEXT_POSITIONS = 16
# Weights' init scale. BLIP-2's 0.02 leaves a model this small blind: its scores hardly depend on the image (to
# 1e-3) and its match probabilities sit near 0.5; at 0.3 they spread over (0, 1) and differ between images.
INIT_RANGE = 0.3


def build_tiny_blip2(path: Path, seed: int = 0, image_size: int = 32, hidden: int = 32, layers: int = 2,
                     heads: int = 2, num_query_tokens: int = 4, image_tokens: bool = True) -> Path:
    """Save a random-weight `Blip2ForImageTextRetrieval` and its `Blip2Processor` into `path`, loadable with
    `Blip2ForImageTextRetrieval.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`; the same seed
    gives the same weights. For tests: fast to build and run, saying nothing meaningful."""
    path = Path(path)
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=build_tokenizer(TEXT_POSITIONS),
                               num_query_tokens=num_query_tokens if image_tokens else None)
    tokenizer = processor.tokenizer  # with the `<image>` token the processor adds
    vision = Blip2VisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, image_size=image_size, patch_size=8,
                               initializer_range=INIT_RANGE)
    qformer = Blip2QFormerConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=heads,
                                 max_position_embeddings=TEXT_POSITIONS, pad_token_id=tokenizer.pad_token_id,
                                 use_qformer_text_input=True, initializer_range=INIT_RANGE)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>") if image_tokens else None
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         num_query_tokens=num_query_tokens, image_text_hidden_size=hidden,
                         image_token_index=image_token_index, initializer_range=INIT_RANGE)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Blip2ForImageTextRetrieval(config).eval()
        # Random init leaves the query tokens at zero, where every query gives the same output and a mean or a
        # max over them would hide a mistake.
        torch.nn.init.normal_(model.query_tokens)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
