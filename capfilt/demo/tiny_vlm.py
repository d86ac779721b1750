"""A tiny random-weight SmolVLM (Idefics3) checkpoint for tests, built from transformers' own Idefics3 classes.

It loads and runs like HuggingFaceTB/SmolVLM-Instruct (model_type idefics3) through `AutoModelForImageTextToText`
and `AutoProcessor`: an `Idefics3ForConditionalGeneration` (a SigLIP-style vision tower, pixel shuffle, a Llama
language model) saved with `save_pretrained`, and an `Idefics3Processor` holding Idefics3's PIL image processor
(the picture resized to a longest edge, split into tiles plus a global view, so pictures of different shapes
give different numbers of image tokens) and a real byte-level BPE `GPT2Tokenizer` (as SmolVLM's) over a small
vocabulary with Idefics3's special tokens, and SmolVLM's chat template.

Qwen2-VL, Qwen2.5-VL, PaliGemma and Florence-2 are built in capfilt.demo.tiny_vlms.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    GPT2Tokenizer,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
)

from capfilt.demo.pil_processors import pil_image_processor
from capfilt.demo.tiny_clip import WORDS, add_merges, byte_alphabet

END, IM_START, END_OF_UTTERANCE = "<|endoftext|>", "<|im_start|>", "<end_of_utterance>"
IMAGE, FAKE_IMAGE, GLOBAL_IMAGE = "<image>", "<fake_token_around_image>", "<global-img>"
TILES = tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))
SPECIAL = (END, IM_START, END_OF_UTTERANCE, IMAGE, FAKE_IMAGE, GLOBAL_IMAGE, *TILES)

# SmolVLM-Instruct's chat template.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary (token → id) and merges in rank order: the 256 byte characters, the merged
    pieces of a few common words and of the chat's words, then the special tokens."""
    tokens = list(byte_alphabet())
    merges = add_merges(tokens, (*WORDS, "User", "Assistant", "Describe", "this", "one", "sentence"))
    tokens += SPECIAL
    return {token: index for index, token in enumerate(tokens)}, merges


def build_processor(tile: int, longest_edge: int, image_seq_len: int) -> Idefics3Processor:
    vocab, merges = vocabulary()
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token=END, bos_token=IM_START,
                              eos_token=END_OF_UTTERANCE, pad_token=END, additional_special_tokens=list(SPECIAL[1:]))
    image_processor = pil_image_processor("Idefics3")(size={"longest_edge": longest_edge},
                                                max_image_size={"longest_edge": tile})
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                             chat_template=CHAT_TEMPLATE)


def build_tiny_idefics3(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2,
                        tile: int = 28, tiles: int = 2) -> Path:
    """Save a random-weight `Idefics3ForConditionalGeneration` and its `Idefics3Processor` into `path` (created
    if missing), loadable with `AutoModelForImageTextToText` and `AutoProcessor`; the same seed gives the same
    weights. Pictures are resized to a longest edge of `tiles` tiles of `tile` pixels and split into them (one
    image token per tile after the pixel shuffle). For tests: fast to build and run, saying nothing meaningful."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    patch, scale_factor = 14, 2
    image_seq_len = (tile // patch) ** 2 // scale_factor**2
    processor = build_processor(tile, tile * tiles, image_seq_len)
    tokenizer = processor.tokenizer
    text = {
        "model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
        "max_position_embeddings": 1024, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "image_size": tile, "patch_size": patch}
    config = Idefics3Config(text_config=text, vision_config=vision, scale_factor=scale_factor,
                            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
                            pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
