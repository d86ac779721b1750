"""SigLIP 2 NaFlex filter: the sigmoid match probability of SigLIP 2's image and text embeddings, for any
transformers `Siglip2Model` checkpoint (model_type `siglip2`: google/siglip2-base-patch16-naflex,
google/siglip2-so400m-patch16-naflex, a local directory) with its own processor. The fixed-resolution SigLIP 2
checkpoints (google/siglip2-so400m-patch14-384, ...) are `SiglipModel`s and go through `capfilt.models.siglip`.

The score is `siglip`, as for SigLIP: `sigmoid(cosine * exp(logit_scale) + logit_bias)`, `torch.sigmoid(
logits_per_image)` of the plain `Siglip2Model(**processor(text=..., images=..., padding="max_length",
max_num_patches=...))` call (texts padded to the text tower's 64 positions, as the model card says), tested to
1e-5 in fp32 with the passes `DualEncoderFilter` shares. It keeps SigLIP's name because it is the same quantity
on the same scale, from the same sigmoid loss: every SigLIP 2 checkpoint then reports `siglip` whichever class
transformers gives it (NaFlex here, fixed resolution in `capfilt.models.siglip`), and keep rules, presets and
`capfilt select` thresholds carry over. A run that scores with both a SigLIP and a SigLIP 2 filter names them
apart as for any two filters of one family (`--filter name=model`).

NaFlex: the image processor resizes each picture, keeping its aspect ratio, to at most `max_num_patches` patches
and gives the patches padded to that count (`pixel_values`, (patches, 3·p·p)), which of them are real
(`pixel_attention_mask`) and the patch grid (`spatial_shapes`, rows and columns), to which the vision tower
resizes its position embeddings. The pipeline stacks one fixed-shape tensor per picture, so `preprocess` packs
the three into one (patches, 3·p·p + 3) float32 tensor: the patches, then a column holding the mask and two
holding the grid's rows and columns (exact in float32; the packed tensor stays float32 on the device, since
bfloat16 could not hold a grid of over 256 patches a side, and the vision tower casts the patches to its dtype as
the plain call does). Pictures of different shapes share one vision pass, as in the plain call. Texts are padded
on the tokenizer's own side (the released tokenizers pad on the right; `Siglip2Tokenizer`'s class default is the
left). The load-time check compares against the library's own image processor and tokenizer output, so a wrong
packing or padding shows there.
"""

from __future__ import annotations

import functools

import torch
from PIL import Image
from transformers import Siglip2Model

from capfilt.models.dual_encoder import PROBE_CAPTIONS
from capfilt.models.fast_paths import checked, close, probe_picture
from capfilt.models.registry import register_filter
from capfilt.models.siglip import SiglipFilter

VISION_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def pack(inputs) -> torch.Tensor:
    """The image processor's `pixel_values`, `pixel_attention_mask` and `spatial_shapes` for a batch as one
    (batch, patches, 3·p·p + 3) float32 tensor: patches, mask, then the grid's rows and columns on every patch."""
    patches = inputs["pixel_values"].float()
    mask = inputs["pixel_attention_mask"].float()[..., None]
    grid = inputs["spatial_shapes"].float()[:, None, :].expand(-1, patches.shape[1], -1)
    return torch.cat([patches, mask, grid], dim=-1)


def unpack(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """`pack`'s inverse: the vision tower's inputs, the patches in float32 as the image processor gives them."""
    return {
        "pixel_values": packed[..., :-3].float(),
        "pixel_attention_mask": packed[..., -3].round().int(),
        "spatial_shapes": packed[:, 0, -2:].round().long(),
    }


@register_filter("siglip2")
class Siglip2Filter(SiglipFilter):
    """SigLIP 2's image-text match probability (`siglip`, as SigLIP's), in [0, 1], for NaFlex checkpoints."""

    model_class = Siglip2Model
    model_types = ("siglip2",)

    # Images: the packed NaFlex inputs.

    @functools.cached_property
    def preprocessing(self) -> str:
        return "siglip2-naflex-packed " + super().preprocessing

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return pack(self.processor.image_processor(images=[image], return_tensors="pt"))[0]

    def to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """The packed tensor on the device, kept in float32 (its grid columns must stay exact)."""
        if self.device.type == "cuda":  # pinned, so that the copy overlaps work already queued on the GPU
            pixels = pixels.pin_memory()
        return pixels.to(self.device, non_blocking=True).float()

    def pooled_image(self, pixels: torch.Tensor) -> torch.Tensor:
        # The public get_image_features, not vision_model: that tower's mask keyword differs across releases
        # (`attention_mask` in 5.0, `pixel_attention_mask` in 5.24).
        return self.model.get_image_features(**unpack(pixels)).pooler_output

    # Texts: padded to the text tower's length on the tokenizer's side.

    def padded(self, token_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        length = self.text_max_tokens
        left = self.processor.tokenizer.padding_side == "left"
        input_ids, masks = [], []
        for ids in token_ids:
            padding = length - len(ids)
            input_ids.append([self.pad_token_id] * padding + ids if left else ids + [self.pad_token_id] * padding)
            masks.append([0] * padding + [1] * len(ids) if left else [1] * len(ids) + [0] * padding)
        tokens = {"input_ids": torch.tensor(input_ids).to(self.device)}
        if self.uses_attention_mask:
            tokens["attention_mask"] = torch.tensor(masks).to(self.device)
        return tokens

    # The plain call, for the load-time check and the fallback.

    def _library_scores(
        self, pixels: torch.Tensor, token_ids: list[list[int]], pair_image: torch.Tensor, pair_text: torch.Tensor
    ) -> torch.Tensor:
        """The pairs' scores from the plain call, one per text pass (which encodes the batch's images again)."""
        vision = unpack(pixels)
        scores = torch.empty(len(pixels), len(token_ids), device=self.device)
        for rows in self.text_passes(token_ids):
            output = self.model(**self.padded([token_ids[row] for row in rows]), **vision)
            scores[:, rows] = self.plain_scores(output).float()
        return scores[pair_image, pair_text]

    def _check_passes(self) -> None:
        """Our passes against the plain call on the library's own processor output, for two probe pictures of
        different shapes (so different patch grids and padding) in one batch, one with both captions, one with
        the long one."""
        probe = probe_picture()
        pictures = [probe, probe.transpose(Image.Transpose.TRANSPOSE).crop((0, 0, probe.height, probe.height // 2))]
        captions = [PROBE_CAPTIONS, PROBE_CAPTIONS[1:]]
        name = self.scores[0].name
        with torch.inference_mode():
            try:
                images = self.processor.image_processor(images=pictures, return_tensors="pt")
                texts = self.processor.tokenizer(PROBE_CAPTIONS, padding="max_length", truncation=True,
                                                 max_length=self.text_max_tokens, return_tensors="pt")
                inputs = {**{key: texts[key] for key in self.processor.tokenizer.model_input_names if key in texts},
                          **{key: images[key] for key in VISION_INPUTS}}
                output = self.model(**{key: value.to(self.device) for key, value in inputs.items()})
                expected = self.plain_scores(output).float()[[0, 0, 1], [0, 1, 1]]
            except Exception as error:
                raise self.unusable(error) from error

        def check() -> None:
            scored = self.score_pixels(self.preprocess_all(pictures), captions, (name,))
            close(torch.tensor([pair[name] for pairs in scored for pair in pairs]), expected, self.dtype, "scores")

        self.own_passes = checked(f"capfilt's own {self.model_class.__name__} passes", self.role, self.model_id, check)
