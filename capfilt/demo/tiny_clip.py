"""A tiny random-weight CLIP checkpoint for tests, built from transformers' own CLIP classes.

It loads and runs like openai/clip-vit-base-patch32: a `CLIPModel` saved with `save_pretrained`, and a
`CLIPProcessor` holding a real `CLIPTokenizer` (byte-level BPE over its own small vocab.json and merges.txt) and
a real `CLIPImageProcessor` (resize the shortest edge, centre crop, normalise). The vocabulary is laid out as
OpenAI's is: the 256 byte-level characters, the same with the end-of-word mark `</w>`, the merged pieces of a
few common words, then `<|startoftext|>` and `<|endoftext|>` (the highest id, as the text tower's legacy
pooling assumes). Any text tokenizes without an unknown token; a word outside the merges is spelled in bytes.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from capfilt.demo.pil_processors import pil_image_processor

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# Words whose letters the merges join, in merge order (a word that an earlier word's merges cut differently,
# such as "green" after "red", stays in a few pieces, as rare words do in OpenAI's vocabulary).
WORDS = (
    "a", "an", "the", "of", "on", "in", "and", "with", "at", "to", "is", "photo", "picture", "image", "drawing",
    "dog", "cat", "bird", "car", "red", "green", "blue", "yellow", "white", "black", "grey", "gray", "small",
    "big", "large", "circle", "square", "triangle", "star", "shape", "shapes", "background", "next", "man",
    "woman", "person", "tree", "house",
)

MAX_POSITIONS = 77  # CLIP's text length; the tokenizer truncates to it


@functools.cache
def byte_alphabet() -> tuple[str, ...]:
    """The 256 printable characters byte-level BPE stands for the bytes 0..255 with (GPT-2's and CLIP's map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    characters = {byte: chr(byte) for byte in printable} | {byte: chr(256 + n) for n, byte in enumerate(others)}
    return tuple(characters[byte] for byte in [*printable, *others])


def add_merges(tokens: list[str], words: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    """BPE merges in rank order that build each word from its pieces (a string: its characters), left to right;
    each merged piece not yet in `tokens` is appended to it. The tiny builders' tokenizers all learn this way."""
    known, merges = set(tokens), []
    for pieces in words:
        merged = pieces[0]
        for piece in pieces[1:]:
            pair, merged = (merged, piece), merged + piece
            if merged not in known:
                known.add(merged)
                tokens.append(merged)
                merges.append(pair)
    return merges


def vocabulary(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tokenizer's vocabulary (token → id) and its merges in rank order."""
    alphabet = byte_alphabet()
    tokens = [*alphabet, *(character + END_OF_WORD for character in alphabet)]
    merges = add_merges(tokens, ([*word[:-1], word[-1] + END_OF_WORD] for word in words))
    tokens += [START, END]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_vocabulary(directory: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt in `directory`, in the files' usual formats."""
    vocab, merges = vocabulary()
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab_file, merges_file


def build_tokenizer(directory: Path | None = None) -> CLIPTokenizer:
    """CLIP's tokenizer over the tiny vocabulary; its vocab.json and merges.txt are also written to `directory`
    when given (hub checkpoints keep them beside tokenizer.json). Built from the vocabulary and merges themselves:
    `tokenizers` deprecates reading them from files in the BPE model's constructor."""
    vocab, merges = vocabulary()
    if directory is not None:
        write_vocabulary(directory)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_POSITIONS)


def build_processor(image_size: int, directory: Path | None = None) -> CLIPProcessor:
    image_processor = pil_image_processor("CLIP")(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=build_tokenizer(directory))


def clip_config(tokenizer: CLIPTokenizer, image_size: int, hidden: int, layers: int, heads: int,
                projection: int) -> CLIPConfig:
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_POSITIONS,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=8,
        projection_dim=projection,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection)


def build_tiny_clip(path: Path, seed: int = 0, image_size: int = 32, hidden: int = 32, layers: int = 2,
                    heads: int = 2, projection: int = 16) -> Path:
    """Save a random-weight `CLIPModel` and its `CLIPProcessor` into `path` (created if missing), loadable with
    `CLIPModel.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`; the same seed gives the same
    weights. For tests: fast to build and run, saying nothing meaningful."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    processor = build_processor(image_size, path)
    config = clip_config(processor.tokenizer, image_size, hidden, layers, heads, projection)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
