"""Qwen2-VL and Qwen2.5-VL: native-resolution patches merged 2x2 by the projector, M-RoPE positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Backbone, PixelInputs, TextInputs


class Qwen2VLBackbone(Backbone):
    """Qwen2-VL and Qwen2.5-VL (native resolution, patches merged 2x2 by the projector, M-RoPE positions)."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    projector_path = "model.visual.merger"

    def _image_features(self, inputs: PixelInputs) -> list[torch.Tensor]:
        out = self.model.model.get_image_features(inputs.pixel_values, inputs.image_grid_thw)
        return list(out.pooler_output)

    def _split(self, projected: torch.Tensor, inputs: PixelInputs) -> list[torch.Tensor]:
        merge = self.image_processor.merge_size
        return list(torch.split(projected, (inputs.image_grid_thw.prod(-1) // merge**2).tolist()))

    def pixel_inputs_differentiable(self, pixels: torch.Tensor) -> PixelInputs:
        processor = self.image_processor
        patch, merge, temporal = processor.patch_size, processor.merge_size, processor.temporal_patch_size
        size = processor.size
        min_pixels = size["shortest_edge"] if hasattr(size, "get") else size.shortest_edge
        max_pixels = size["longest_edge"] if hasattr(size, "get") else size.longest_edge
        height, width = _qwen_resize(*pixels.shape[-2:], patch * merge, min_pixels, max_pixels)
        if (height, width) != tuple(pixels.shape[-2:]):
            pixels = F.interpolate(pixels, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        pixels = self._normalise(pixels)
        batch, channels = pixels.shape[:2]
        grid_h, grid_w = height // patch, width // patch
        # the image processor's layout: merge windows outermost, then one frame repeated over the temporal patch
        patches = pixels.reshape(batch, channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6)
        patches = patches.expand(*patches.shape[:6], temporal, *patches.shape[7:])
        flat = patches.reshape(batch * grid_h * grid_w, channels * temporal * patch * patch)
        grid = torch.tensor([[1, grid_h, grid_w]] * batch, device=self.device)
        return PixelInputs(flat.to(self.device, self.dtype), grid)

    def position_ids(self, text: TextInputs, inputs: PixelInputs) -> torch.Tensor:
        token_types = (text.input_ids == self.image_token_id).int()
        position_ids, _ = self.model.model.get_rope_index(
            text.input_ids.to(self.device), mm_token_type_ids=token_types.to(self.device),
            image_grid_thw=inputs.image_grid_thw, attention_mask=text.attention_mask.to(self.device),
        )
        return position_ids


def _qwen_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's size rule: both sides multiples of `factor`, area within [min_pixels, max_pixels]."""
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
