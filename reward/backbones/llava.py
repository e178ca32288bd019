"""LLaVA 1.5: a CLIP tower, an MLP projector and a fixed number of visual tokens per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backbone, PixelInputs


class LlavaBackbone(Backbone):
    """LLaVA 1.5 (CLIP tower, MLP projector, a fixed number of tokens per image)."""

    model_types = ("llava",)
    projector_path = "model.multi_modal_projector"

    def _image_features(self, inputs: PixelInputs) -> list[torch.Tensor]:
        config = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=inputs.pixel_values, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        return list(out.pooler_output)

    def _split(self, projected: torch.Tensor, inputs: PixelInputs) -> list[torch.Tensor]:
        return list(projected)

    def pixel_inputs_differentiable(self, pixels: torch.Tensor) -> PixelInputs:
        processor = self.image_processor
        size = processor.size
        shortest = size.get("shortest_edge") if hasattr(size, "get") else size.shortest_edge
        height, width = pixels.shape[-2:]
        if shortest and min(height, width) != shortest:
            scale = shortest / min(height, width)
            new_size = (max(shortest, round(height * scale)), max(shortest, round(width * scale)))
            pixels = F.interpolate(pixels, size=new_size, mode="bicubic", align_corners=False, antialias=True)
        crop = processor.crop_size
        crop_h, crop_w = (crop["height"], crop["width"]) if hasattr(crop, "get") else (crop.height, crop.width)
        top, left = (pixels.shape[-2] - crop_h) // 2, (pixels.shape[-1] - crop_w) // 2
        pixels = pixels[..., top: top + crop_h, left: left + crop_w]
        return PixelInputs(self._normalise(pixels).to(self.device, self.dtype))
