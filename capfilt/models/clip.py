"""CLIP filter: the cosine of CLIP's projected image and text embeddings, for any transformers `CLIPModel`
checkpoint (openai/clip-vit-base-patch32, openai/clip-vit-large-patch14, laion/CLIP-ViT-H-14-laion2B-s32B-b79K,
a local directory) with its own processor.

The score equals `(image_embeds * text_embeds).sum(-1)` of the plain `CLIPModel(input_ids=..., attention_mask=...,
pixel_values=...)` call, tested to 1e-5 in fp32, with the passes `DualEncoderFilter` shares. Only public,
long-standing pieces of the model are used (`vision_model(...).pooler_output`, `visual_projection`,
`text_model(...).pooler_output`, `text_projection`): `get_image_features`' return type changed between
transformers 5.x releases.
"""

from __future__ import annotations

import torch
from transformers import CLIPModel

from capfilt.models.dual_encoder import DualEncoderFilter
from capfilt.models.registry import register_filter
from capfilt.scores import Score


@register_filter("clip")
class ClipFilter(DualEncoderFilter):
    """CLIP's image-text cosine (`clip`), in [-1, 1]; LAION-400M kept pairs at 0.28 and above (ViT-B/32)."""

    model_class = CLIPModel
    model_types = ("clip",)
    scores = (Score("clip", -1.0, 1.0, "CLIP cosine of the projected image and text embeddings"),)
    default_scores = ("clip",)
    default_keep = ("clip>=0.28",)  # LAION-400M's threshold (for ViT-B/32)

    def pooled_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

    def pooled_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.text_projection(self.model.text_model(**tokens).pooler_output)

    def pair_scores(self, cosines: torch.Tensor) -> torch.Tensor:
        return cosines

    def plain_scores(self, output) -> torch.Tensor:
        return output.image_embeds.float() @ output.text_embeds.float().T
