"""Small BLIP captioners and filters built from transformers' own BLIP classes, with a word-level tokenizer.

The demo models (`capfilt.demo.train`) and the random-weight models the tests use (`build_tiny_pair`) share
the definitions here, so both load and run exactly like Salesforce's BLIP checkpoints do: the same model
classes, a `BlipProcessor` with a BERT tokenizer whose [DEC] token starts captions, and config token ids
that `BlipForConditionalGeneration.generate` relies on (it swaps the prompt's [CLS] for `bos_token_id`, drops
the prompt's final [SEP], and stops at `sep_token_id`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import (
    BertTokenizerFast,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
    PreTrainedModel,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from capfilt.demo.pil_processors import pil_image_processor
from capfilt.demo.shapes import VOCABULARY

# The prompt BLIP's captioner is run with; its words must be in the vocabulary too.
PROMPT = "a picture of "
# BERT's special tokens in BERT's order, then BLIP's decoder start token.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]")


class Normalisation(NamedTuple):
    """Per-channel mean and standard deviation the image processor normalises pixels (0..1) with."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CLIP_NORMALISATION = Normalisation(tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD))


@dataclass(frozen=True)
class Architecture:
    """The sizes of one BLIP model; vision and text towers share width and depth."""

    image_size: int = 64
    patch_size: int = 8
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    # Width of the image-text contrastive (ITC) embedding of the filter.
    embedding: int = 64
    # Longest text, in tokens, the text tower has positions for; the tokenizer truncates to it.
    max_text_tokens: int = 64
    normalisation: Normalisation = CLIP_NORMALISATION


def vocabulary() -> list[str]:
    """The tokenizer's tokens in id order: specials, the domain's words and the prompt's, digit pieces.

    The "##" digit pieces let BERT's WordPiece spell any number (IMG_2031.JPG, DSC00412) without [UNK].
    """
    words = sorted(set(VOCABULARY) | set(PROMPT.split()))
    digit_pieces = [f"##{token}" for token in words if token.isdigit()]
    return [*SPECIAL_TOKENS, *words, *digit_pieces]


def build_tokenizer(max_text_tokens: int) -> BertTokenizerFast:
    """A lower-casing BERT WordPiece tokenizer over `vocabulary()`, with [DEC] as its bos token like BLIP's."""
    vocab = {token: index for index, token in enumerate(vocabulary())}
    return BertTokenizerFast(vocab=vocab, bos_token="[DEC]", model_max_length=max_text_tokens)


def build_processor(architecture: Architecture) -> BlipProcessor:
    """A `BlipProcessor` that resizes pictures to the model's input size and tokenizes text for it."""
    side = architecture.image_size
    image_processor = pil_image_processor("Blip")(
        size={"height": side, "width": side},
        image_mean=list(architecture.normalisation.mean),
        image_std=list(architecture.normalisation.std),
    )
    return BlipProcessor(image_processor=image_processor, tokenizer=build_tokenizer(architecture.max_text_tokens))


def blip_config(architecture: Architecture, tokenizer: BertTokenizerFast) -> BlipConfig:
    """The `BlipConfig` of a model of `architecture` whose token ids are `tokenizer`'s."""
    a = architecture
    text = BlipTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=a.hidden,
        intermediate_size=4 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        max_position_embeddings=a.max_text_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    vision = BlipVisionConfig(
        hidden_size=a.hidden,
        intermediate_size=4 * a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        image_size=a.image_size,
        patch_size=a.patch_size,
        # BLIP's default (1e-10) suits only checkpoints that are loaded over it: weights that small leave a
        # fresh vision tower blind to shapes for thousands of steps.
        initializer_range=0.02,
    )
    return BlipConfig(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        image_text_hidden_size=a.embedding,
        projection_dim=a.embedding,
    )


def new_captioner(architecture: Architecture, seed: int) -> tuple[BlipForConditionalGeneration, BlipProcessor]:
    """A randomly initialised captioner and its processor; the same seed gives the same weights."""
    processor = build_processor(architecture)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(blip_config(architecture, processor.tokenizer))
    return model.eval(), processor


def new_filter(architecture: Architecture, seed: int) -> tuple[BlipForImageTextRetrieval, BlipProcessor]:
    """A randomly initialised filter (ITM and ITC heads) and its processor; the same seed, the same weights."""
    processor = build_processor(architecture)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BlipForImageTextRetrieval(blip_config(architecture, processor.tokenizer))
    return model.eval(), processor


def save(model: PreTrainedModel, processor: BlipProcessor, directory: Path) -> Path:
    """Save model and processor side by side, as `from_pretrained` and `AutoProcessor` expect them."""
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_pair(
    directory: Path,
    seed: int = 0,
    image_size: int = 32,
    hidden: int = 32,
    layers: int = 1,
    *,
    captioner_image_size: int | None = None,
    filter_image_size: int | None = None,
    captioner_normalisation: Normalisation = CLIP_NORMALISATION,
    filter_normalisation: Normalisation = CLIP_NORMALISATION,
) -> tuple[Path, Path]:
    """Save a random-weight captioner and filter into `directory/"captioner"` and `directory/"filter"`.

    They are for tests: fast to build and to run, loadable like any BLIP checkpoint, but saying nothing
    meaningful. Either model's input size and normalisation can differ from the other's, to check that each
    model's own processor is used. Returns the two directories.
    """
    directory = Path(directory)

    def architecture(side: int | None, normalisation: Normalisation) -> Architecture:
        heads = 2 if hidden % 2 == 0 else 1
        return Architecture(
            image_size=side or image_size,
            hidden=hidden,
            layers=layers,
            heads=heads,
            embedding=hidden,
            normalisation=normalisation,
        )

    captioner, captioner_processor = new_captioner(architecture(captioner_image_size, captioner_normalisation), seed)
    retrieval, filter_processor = new_filter(architecture(filter_image_size, filter_normalisation), seed + 1)
    return (
        save(captioner, captioner_processor, directory / "captioner"),
        save(retrieval, filter_processor, directory / "filter"),
    )
