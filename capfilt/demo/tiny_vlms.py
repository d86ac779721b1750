"""Tiny random-weight checkpoints of more image-text-to-text families for tests, built from transformers' own
classes and saved with `save_pretrained` (the SmolVLM one is capfilt.demo.tiny_vlm):

- PaliGemma (model_type paligemma): a `PaliGemmaForConditionalGeneration` (SigLIP vision tower, Gemma language
  model) and a `PaliGemmaProcessor` holding SigLIP's PIL image processor (a fixed height x width) and a real
  `GemmaTokenizer` (SentencePiece-style BPE with byte fallback) over a small vocabulary; the processor adds
  PaliGemma's `<image>`, `<loc....>` and `<seg...>` tokens itself. No chat template: PaliGemma takes a task
  prefix ("caption en").
- Florence-2 (model_type florence2): a `Florence2ForConditionalGeneration` (DaViT vision tower, BART
  encoder-decoder) and a `Florence2Processor` holding CLIP's PIL image processor (a fixed height x width) and a
  real byte-level BPE `BartTokenizer` with Florence-2's `<image>` token, and its post-processor config. No chat
  template: Florence-2 takes task tokens ("<CAPTION>").
- Qwen2-VL and Qwen2.5-VL (model_types qwen2_vl, qwen2_5_vl): a `Qwen2VLForConditionalGeneration` /
  `Qwen2_5_VLForConditionalGeneration` and a `Qwen2VLProcessor` / `Qwen2_5_VLProcessor` holding Qwen2-VL's PIL
  image processor (the picture resized to multiples of 28 pixels between min_pixels and max_pixels: pictures
  of different shapes give different numbers of image tokens), its video processor (which needs torchvision)
  and a real byte-level BPE `Qwen2Tokenizer` with Qwen's special tokens, and Qwen2-VL's chat template.

For tests: fast to build and run, saying nothing meaningful; the same seed gives the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BartTokenizer,
    Florence2Config,
    Florence2ForConditionalGeneration,
    Florence2Processor,
    GemmaTokenizer,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
)

from capfilt.demo.pil_processors import pil_image_processor
from capfilt.demo.tiny_clip import WORDS, add_merges, byte_alphabet

# The words the tiny tokenizers merge: the shapes domain's and the prompts'.
PROMPT_WORDS = (*WORDS, "caption", "en", "What", "does", "describe", "Describe", "this", "one", "sentence",
                "user", "assistant", "system", "You", "are", "helpful")


def byte_level_vocabulary(special: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary (token → id) and merges in rank order: the 256 byte characters, the merged
    pieces of `PROMPT_WORDS`, then `special`."""
    tokens = list(byte_alphabet())
    merges = add_merges(tokens, PROMPT_WORDS)
    known = set(tokens)
    tokens += [token for token in special if token not in known]
    return {token: index for index, token in enumerate(tokens)}, merges


def seeded(build, seed: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def set_generation_tokens(model, tokenizer, **extra: int) -> None:
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    for name, value in extra.items():
        setattr(model.generation_config, name, value)


# --- PaliGemma ---------------------------------------------------------------------------------------------


def gemma_tokenizer() -> GemmaTokenizer:
    """A `GemmaTokenizer` (BPE over "▁"-for-space text with byte fallback, as Gemma's) over a small vocabulary:
    Gemma's five special tokens, the 256 byte-fallback tokens, printable ASCII and "▁", and merged pieces of
    `PROMPT_WORDS`."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *(f"<0x{byte:02X}>" for byte in range(256)), "▁",
              *(chr(code) for code in range(ord("!"), ord("~") + 1))]
    merges = add_merges(tokens, PROMPT_WORDS)
    return GemmaTokenizer(vocab={token: index for index, token in enumerate(tokens)}, merges=merges)


def build_tiny_paligemma(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2,
                         image_size: int = 28, patch: int = 14) -> Path:
    """Save a random-weight `PaliGemmaForConditionalGeneration` and its `PaliGemmaProcessor` into `path` (created
    if missing), loadable with `AutoModelForImageTextToText` and `AutoProcessor`. Pictures are resized to
    `image_size` x `image_size` (one image token per `patch` x `patch` patch)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    image_seq_length = (image_size // patch) ** 2
    image_processor = pil_image_processor("Siglip")(size={"height": image_size, "width": image_size},
                                              image_seq_length=image_seq_length)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=gemma_tokenizer())
    tokenizer = processor.tokenizer  # now with <image>, <loc....> and <seg...>
    text = {"model_type": "gemma", "vocab_size": len(tokenizer), "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": 1, "head_dim": hidden // heads, "max_position_embeddings": 1024,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "initializer_range": 0.2}
    vision = {"model_type": "siglip_vision_model", "hidden_size": hidden, "intermediate_size": 2 * hidden,
              "num_hidden_layers": layers, "num_attention_heads": heads, "image_size": image_size,
              "patch_size": patch, "projection_dim": hidden}
    config = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=processor.image_token_id,
                             vocab_size=len(tokenizer), projection_dim=hidden, hidden_size=hidden,
                             pad_token_id=tokenizer.pad_token_id)
    model = seeded(lambda: PaliGemmaForConditionalGeneration(config), seed)
    set_generation_tokens(model, tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# --- Florence-2 --------------------------------------------------------------------------------------------

# Florence-2's post-processor config (microsoft/Florence-2-base's processor_config.json), which
# `post_process_generation` needs for every task it parses.
FLORENCE2_POST_PROCESSOR = {
    "ocr": {"PATTERN": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
            "AREA_THRESHOLD": 0.0},
    "phrase_grounding": {"FILTER_BY_AREA": False},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}


def build_tiny_florence2(path: Path, seed: int = 0, hidden: int = 32, layers: int = 1, heads: int = 2,
                         image_size: int = 64) -> Path:
    """Save a random-weight `Florence2ForConditionalGeneration` and its `Florence2Processor` into `path` (created
    if missing), loadable with `AutoModelForImageTextToText` and `AutoProcessor`. Pictures are resized to
    `image_size` x `image_size`; the DaViT tower downsamples by 32, so (image_size / 32)² + 1 image tokens."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    special = ("<s>", "<pad>", "</s>", "<unk>", "<image>", "<mask>")
    vocab, merges = byte_level_vocabulary(special)
    tokenizer = BartTokenizer(vocab=vocab, merges=merges, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                              cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                              extra_special_tokens={"image_token": "<image>"})
    image_seq_length = (image_size // 32) ** 2 + 1
    image_processor = pil_image_processor("CLIP")(size={"height": image_size, "width": image_size}, do_center_crop=False,
                                            crop_size={"height": image_size, "width": image_size},
                                            image_seq_length=image_seq_length)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   post_processor_config=FLORENCE2_POST_PROCESSOR)
    bart = {"model_type": "bart", "vocab_size": len(tokenizer), "d_model": hidden, "encoder_layers": layers,
            "decoder_layers": layers, "encoder_attention_heads": heads, "decoder_attention_heads": heads,
            "encoder_ffn_dim": 2 * hidden, "decoder_ffn_dim": 2 * hidden, "max_position_embeddings": 256,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "decoder_start_token_id": tokenizer.eos_token_id,
            "forced_eos_token_id": tokenizer.eos_token_id, "init_std": 0.2}
    vision = {"depths": [1, 1, 1, 1], "embed_dim": [8, 8, 16, 16], "num_heads": [1, 1, 2, 2],
              "num_groups": [1, 1, 2, 2], "window_size": 2, "drop_path_rate": 0.0, "projection_dim": hidden,
              "max_position_embeddings": image_size // 32, "max_temporal_embeddings": 4}
    config = Florence2Config(text_config=bart, vision_config=vision, image_token_id=processor.image_token_id,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id)
    model = seeded(lambda: Florence2ForConditionalGeneration(config), seed)
    set_generation_tokens(model, tokenizer, decoder_start_token_id=tokenizer.eos_token_id)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# --- Qwen2-VL and Qwen2.5-VL -------------------------------------------------------------------------------

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")

# Qwen2-VL-Instruct's chat template (Qwen2.5-VL-Instruct's is the same).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_vl(path: Path, seed: int = 0, version: str = "qwen2_vl", hidden: int = 32, layers: int = 2,
                        heads: int = 2, min_pixels: int = 28 * 28, max_pixels: int = 56 * 56) -> Path:
    """Save a random-weight Qwen2-VL (`version` "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl") and its processor into
    `path` (created if missing), loadable with `AutoModelForImageTextToText` and `AutoProcessor`. Pictures are
    resized to multiples of 28 pixels (aspect ratio about kept) holding between `min_pixels` and `max_pixels`
    pixels, one image token per 28 x 28. The processor's video processor needs torchvision."""
    from transformers import (  # here: the video processor (and so these imports' use) needs torchvision
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = byte_level_vocabulary(QWEN_SPECIAL)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", additional_special_tokens=list(QWEN_SPECIAL[1:]))
    image_processor = pil_image_processor("Qwen2VL")(min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)
    processor_class, config_class, model_class = {
        "qwen2_vl": (Qwen2VLProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration),
        "qwen2_5_vl": (Qwen2_5_VLProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    }[version]
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=video_processor, chat_template=QWEN_CHAT_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    head_dim = hidden // heads
    text = {"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 1,
            "max_position_embeddings": 1024, "max_window_layers": layers, "initializer_range": 0.2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [head_dim // 8, head_dim // 8 * 3 // 2, head_dim // 8 * 3 // 2]},
            "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if version == "qwen2_vl":
        vision = {"depth": layers, "embed_dim": hidden, "hidden_size": hidden, "num_heads": heads, "mlp_ratio": 2}
    else:
        vision = {"depth": layers, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_heads": heads,
                  "out_hidden_size": hidden, "window_size": 56, "fullatt_block_indexes": [layers - 1]}
    config = config_class(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                          video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                          vision_end_token_id=ids("<|vision_end|>"))
    model = seeded(lambda: model_class(config), seed)
    set_generation_tokens(model, tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
