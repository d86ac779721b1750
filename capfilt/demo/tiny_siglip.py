"""A tiny random-weight SigLIP checkpoint for tests, built from transformers' own SigLIP classes.

It loads and runs like google/siglip-base-patch16-224: a `SiglipModel` saved with `save_pretrained`, and a
`SiglipProcessor` holding a real `SiglipTokenizer` (a SentencePiece unigram model trained here on the shapes
domain's captions and junk alt text, `</s>` closing and padding every text) and a `SiglipImageProcessor`
(resize to a square, normalise with mean and std 0.5).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import torch
from transformers import (
    SiglipConfig,
    SiglipModel,
    SiglipProcessor,
    SiglipTextConfig,
    SiglipTokenizer,
    SiglipVisionConfig,
)

from capfilt.demo import shapes
from capfilt.demo.pil_processors import pil_image_processor

TEXT_POSITIONS = 16  # the text tower's length (64 in the released models), to which texts are padded


def build_tokenizer(directory: Path) -> SiglipTokenizer:
    """SigLIP's tokenizer over a SentencePiece model trained on shapes captions, written to directory/spiece.model."""
    import sentencepiece

    rng = random.Random(0)
    lines = [shapes.describe(shapes.random_scene(rng)) for _ in range(300)]
    lines += [shapes.junk_alt_text(rng) for _ in range(100)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=120, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(model.getvalue())
    return SiglipTokenizer(vocab_file=str(directory / "spiece.model"), model_max_length=TEXT_POSITIONS)


def build_tiny_siglip(path: Path, seed: int = 0, image_size: int = 32, hidden: int = 32, layers: int = 2,
                      heads: int = 2) -> Path:
    """Save a random-weight `SiglipModel` and its `SiglipProcessor` into `path`, loadable with
    `SiglipModel.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`; the same seed gives the same
    weights. For tests: fast to build and run, saying nothing meaningful."""
    path = Path(path)
    tokenizer = build_tokenizer(path)
    image_processor = pil_image_processor("Siglip")(size={"height": image_size, "width": image_size})
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = SiglipTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=TEXT_POSITIONS, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    vision = SiglipVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, image_size=image_size, patch_size=8)
    config = SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SiglipModel(config).eval()
        # Random init leaves logit_scale and logit_bias at SigLIP's start values (log 10, -10), where every
        # probability is near 0; spread them so that tests see probabilities across (0, 1).
        model.logit_scale.data.fill_(2.0)
        model.logit_bias.data.fill_(0.5)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
