"""A tiny random-weight BLIP-2 image-text retrieval checkpoint for tests, built from transformers' own classes.

It loads and runs like Salesforce/blip2-itm-vit-g: a `Blip2ForImageTextRetrieval` (vision tower, Q-Former with
its text input, ITC projections and ITM head; no language model) saved with `save_pretrained`, and a
`Blip2Processor` holding a BERT WordPiece tokenizer (capfilt's shapes vocabulary) and BLIP's PIL image
processor. With `image_tokens` (the default, as the processors of transformers' converted BLIP-2 checkpoints
are) the processor puts `num_query_tokens` `<image>` tokens before each text and the config names their id,
which the model drops again; without, the processor gives plain BERT tokens.

`build_tiny_blip2_captioner` saves the captioner half the same way, loading and running like
Salesforce/blip2-opt-2.7b or Salesforce/blip2-flan-t5-xl: a `Blip2ForConditionalGeneration` (vision tower,
Q-Former without text input, language projection, a tiny OPT or Flan-T5 language model) and a `Blip2Processor`
whose tokenizer is the language model's kind: GPT-2's byte-level BPE with `</s>` (id 2) as OPT's bos, eos and
`<pad>` (id 1) as its pad; or T5's unigram SentencePiece with `<pad>` (id 0, also the decoder's start) and `</s>`
(id 1) closing every text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    GPT2Tokenizer,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    T5Config,
    T5Tokenizer,
)

from capfilt.demo.pil_processors import pil_image_processor
from capfilt.demo.shapes import VOCABULARY
from capfilt.demo.tiny_blip import build_tokenizer
from capfilt.demo.tiny_clip import byte_alphabet

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
    image_processor = pil_image_processor("Blip")(size={"height": image_size, "width": image_size})
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


# Words the captioner's tokenizers hold whole: the shapes domain's and those of the prompts tests use.
CAPTION_WORDS = tuple(sorted({*VOCABULARY, "a", "photo", "picture", "of"}))
# The captioner's language model positions: room for the query tokens, a prompt and a caption.
LANGUAGE_POSITIONS = 64
# Characters T5's unigram vocabulary holds alone, so that any ASCII text tokenizes without `<unk>` (SentencePiece
# models have byte fallback or a large alphabet for the same reason).
T5_CHARACTERS = "".join(chr(code) for code in range(ord("!"), ord("~") + 1))


def opt_tokenizer() -> GPT2Tokenizer:
    """OPT's tokenizer kind: GPT-2's byte-level BPE, `</s>` (id 2) prepended to every text as bos, `<pad>` id 1.
    Each word of `CAPTION_WORDS` merges to one token, alone or after a space (`Ġ`), unless an earlier word's merges
    cut it differently; anything else is spelled in bytes."""
    tokens = ["<s>", "<pad>", "</s>", "<unk>", *byte_alphabet()]
    known, merges = set(tokens), []

    def merge(left: str, right: str) -> None:
        if left + right not in known:
            known.add(left + right)
            tokens.append(left + right)
            merges.append((left, right))

    for word in CAPTION_WORDS:
        for end in range(2, len(word) + 1):
            merge(word[: end - 1], word[end - 1])
    for word in CAPTION_WORDS:  # ranked after every word's own merges, which BPE then applies first
        merge("Ġ", word)
    return GPT2Tokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=merges,
                         bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                         add_bos_token=True)


def t5_tokenizer() -> T5Tokenizer:
    """T5's tokenizer kind: a unigram SentencePiece vocabulary (`<pad>` 0, `</s>` 1, `<unk>` 2; whole words after
    `▁` likely, single characters unlikely), `</s>` appended to every text, no sentinel tokens."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -6.0)]
    pieces += [("▁" + word, -4.0) for word in CAPTION_WORDS]
    pieces += [(character, -10.0) for character in T5_CHARACTERS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def language_config(language: Literal["opt", "t5"], tokenizer: PreTrainedTokenizerBase, hidden: int, layers: int,
                    heads: int) -> PretrainedConfig:
    """The language model's config, with the token ids generate() reads from it: OPT's bos, eos and pad; T5's pad
    as the decoder's first token and `</s>` as its end. The weights' init scale is the filter's, so that captions
    differ between pictures."""
    vocab_size = len(tokenizer)
    if language == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, word_embed_proj_dim=hidden,
                         max_position_embeddings=LANGUAGE_POSITIONS, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         init_std=INIT_RANGE)
    # Flan-T5's gated-GELU feed-forward and untied output embeddings
    return T5Config(vocab_size=vocab_size, d_model=hidden, d_kv=hidden // heads, d_ff=4 * hidden,
                    num_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id, initializer_factor=INIT_RANGE / 0.02)


def build_tiny_blip2_captioner(path: Path, seed: int = 0, language: Literal["opt", "t5"] = "opt", image_size: int = 32,
                               hidden: int = 32, layers: int = 2, heads: int = 2, num_query_tokens: int = 4,
                               image_tokens: bool = True) -> Path:
    """Save a random-weight `Blip2ForConditionalGeneration` with a tiny OPT (`language="opt"`) or Flan-T5
    (`"t5"`) language model, and its `Blip2Processor`, into `path`; loadable with
    `Blip2ForConditionalGeneration.from_pretrained(path)` and `AutoProcessor.from_pretrained(path)`; the same seed
    gives the same weights. With `image_tokens` the processor puts `num_query_tokens` `<image>` tokens before each
    text and the config names their id, where the model puts the projected query outputs (the form transformers'
    converted checkpoints have); without, neither does. For tests: fast to build and run, saying nothing
    meaningful."""
    if language not in ("opt", "t5"):
        raise ValueError(f"unknown language model {language!r}: choose opt or t5")
    path = Path(path)
    image_processor = pil_image_processor("Blip")(size={"height": image_size, "width": image_size})
    tokenizer = opt_tokenizer() if language == "opt" else t5_tokenizer()
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer,
                               num_query_tokens=num_query_tokens if image_tokens else None)
    tokenizer = processor.tokenizer  # with the `<image>` token the processor adds
    vision = Blip2VisionConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                               num_attention_heads=heads, image_size=image_size, patch_size=8,
                               initializer_range=INIT_RANGE)
    qformer = Blip2QFormerConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, encoder_hidden_size=hidden,
                                 use_qformer_text_input=False, initializer_range=INIT_RANGE)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>") if image_tokens else None
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                         text_config=language_config(language, tokenizer, hidden, layers, heads).to_dict(),
                         num_query_tokens=num_query_tokens, image_token_index=image_token_index,
                         initializer_range=INIT_RANGE)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Blip2ForConditionalGeneration(config).eval()
        torch.nn.init.normal_(model.query_tokens)  # as the filter's: zero queries would all give one output
        if language == "t5":
            # T5's init scales its norms and output layer by the factor too, which leaves logits so peaked that a
            # nucleus holds one token and every sample is the same: the decoder's last norm and output layer are
            # drawn as OPT's are.
            torch.nn.init.ones_(model.language_model.decoder.final_layer_norm.weight)
            torch.nn.init.normal_(model.language_model.lm_head.weight, std=INIT_RANGE)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
