"""A tiny random-weight open_clip checkpoint for tests, in open_clip's own folder format.

open_clip's model configs are JSON dicts (`open_clip/model_configs/ViT-B-32.json` and the like); this is one of
them at a tiny size, saved as `open_clip.push_to_hf_hub.save_for_hf` saves a model for the hub: the folder holds
`open_clip_config.json` (the model and preprocessing configs) and `open_clip_model.safetensors`, and loads with
`open_clip.create_model_from_pretrained("local-dir:FOLDER")`, as `hf-hub:ORG/NAME` checkpoints do. The text
tower tokenizes with open_clip's bundled CLIP BPE tokenizer (77 tokens), which needs no file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHITECTURE = "capfilt-tiny-ViT"
# ViT-B-32.json's shape, shrunk: 2 layers of width 32 in each tower, 8-pixel patches of a 32-pixel image.
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_open_clip(directory: Path, seed: int = 0) -> Path:
    """A random tiny open_clip CLIP in `directory`, loadable as `open_clip:DIRECTORY`."""
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    # Registered as open_clip registers its bundled configs: a JSON file named after the architecture.
    config_file = directory / f"{ARCHITECTURE}.json"
    config_file.write_text(json.dumps(TINY_CONFIG, indent=2))
    open_clip.add_model_config(config_file)
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCHITECTURE)
    save_file(model.state_dict(), directory / "open_clip_model.safetensors")
    save_config_for_hf(model, directory / "open_clip_config.json", model_config=TINY_CONFIG)
    return directory
