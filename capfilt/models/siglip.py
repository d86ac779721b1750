"""SigLIP filter: the sigmoid match probability of SigLIP's image and text embeddings, for any transformers
`SiglipModel` checkpoint (google/siglip-base-patch16-224, google/siglip-so400m-patch14-384, the fixed-resolution
SigLIP 2 checkpoints such as google/siglip2-so400m-patch14-384, a local directory) with its own processor.

The score is `sigmoid(cosine * exp(logit_scale) + logit_bias)`, `torch.sigmoid(logits_per_image)` of the plain
`SiglipModel(...)` call on texts padded to the text tower's 64 positions (`padding="max_length"`, as SigLIP was
trained and as its model card says to call it), tested to 1e-5 in fp32, with the passes `DualEncoderFilter`
shares. SigLIP pools an image with its attention-pooling head and a text with the last position's head; both are
the towers' `pooler_output`.
"""

from __future__ import annotations

import torch
from transformers import SiglipModel

from capfilt.models.dual_encoder import DualEncoderFilter
from capfilt.models.registry import register_filter
from capfilt.scores import Score


@register_filter("siglip")
class SiglipFilter(DualEncoderFilter):
    """SigLIP's image-text match probability (`siglip`), in [0, 1]."""

    model_class = SiglipModel
    model_types = ("siglip",)
    pad_to_max_length = True
    scores = (Score("siglip", 0.0, 1.0, "SigLIP sigmoid match probability (logit_scale and logit_bias applied)"),)
    default_scores = ("siglip",)
    # A starting point, not a published threshold: right captions often score well under 0.5 (the model card's
    # "a photo of 2 cats" gets 0.32), unrelated ones near 0. Tune it with `capfilt select`.
    default_keep = ("siglip>=0.1",)

    def pair_scores(self, cosines: torch.Tensor) -> torch.Tensor:
        scale, bias = self.model.logit_scale.float(), self.model.logit_bias.float()
        return torch.sigmoid(cosines * scale.exp() + bias)

    def plain_scores(self, output) -> torch.Tensor:
        return torch.sigmoid(output.logits_per_image.float())
