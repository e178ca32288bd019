"""LLaVA-NeXT (LLaVA-1.6): LLaVA 1.5's CLIP tower and MLP projector over any-resolution tiles.

An image is resized into the best of `image_grid_pinpoints`, padded, cut into tower-sized tiles and preceded by
a base view of the whole image. After the projector, the tiles' features are laid out as one grid, the padding
is cut away (`unpad_image`) and each row ends with the learned `image_newline`. Every step that decides which
visual tokens land in the sequence is transformers' own (`get_image_features`, `pack_image_features`,
`image_size_to_num_patches`, `select_best_resolution`), so our tokens are the ones the model itself would place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_transforms import divide_to_patches
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .base import PixelInputs
from .llava import LlavaBackbone


class LlavaNextBackbone(LlavaBackbone):
    """LLaVA-NeXT: LLaVA with any-resolution tiles, unpadding and a newline token per feature row.

    The projector's captured input holds every tile of every image; `newline + unpadding` happen after the
    projector, so a perspective's projector copy re-packs its output with the base model's `image_newline`.
    """

    model_types = ("llava_next",)

    def _image_features(self, inputs: PixelInputs) -> list[torch.Tensor]:
        config = self.model.config
        out = self.model.model.get_image_features(
            pixel_values=inputs.pixel_values, image_sizes=inputs.image_sizes,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        return list(out.pooler_output)

    def _split(self, projected: torch.Tensor, inputs: PixelInputs) -> list[torch.Tensor]:
        config, inner = self.model.config, self.model.model
        tiles = [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                 for size in inputs.image_sizes]
        features, _ = inner.pack_image_features(
            torch.split(projected, tiles), inputs.image_sizes, config.vision_feature_select_strategy,
            image_newline=inner.image_newline,
        )
        return list(features)

    def pixel_inputs_differentiable(self, pixels: torch.Tensor) -> PixelInputs:
        """The image processor's any-resolution layout in torch: the base view, then the tiles row by row."""
        processor = self.image_processor
        batch = pixels.shape[0]
        height, width = pixels.shape[-2:]
        target = select_best_resolution((height, width), processor.image_grid_pinpoints)
        fitted = get_patch_output_size(pixels, target, ChannelDimension.FIRST)
        resized = pixels if fitted == (height, width) else _resize(pixels, fitted)
        # centred zero padding before rescaling, as the processor pads its uint8 image with black
        pad_y, extra_y = divmod(target[0] - fitted[0], 2)
        pad_x, extra_x = divmod(target[1] - fitted[1], 2)
        padded = F.pad(resized, (pad_x, pad_x + extra_x, pad_y, pad_y + extra_y))
        tile_size = _get(processor.crop_size, "height") or _get(processor.size, "height") \
            or _get(processor.size, "shortest_edge")
        base_size = (_get(processor.size, "height"), _get(processor.size, "width"))
        if not all(base_size):
            base_size = (_get(processor.size, "shortest_edge"),) * 2
        base = pixels if (height, width) == base_size else _resize(pixels, base_size)
        views = torch.stack([base, *divide_to_patches(padded, tile_size)], dim=1)
        # each view then takes LLaVA 1.5's per-image steps (shortest-edge resize, centre crop, normalise)
        flat = super().pixel_inputs_differentiable(views.flatten(0, 1)).pixel_values
        sizes = torch.tensor([[height, width]] * batch, device=self.device)
        return PixelInputs(flat.unflatten(0, (batch, views.shape[1])), image_sizes=sizes)


def _resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)


def _get(size, key: str) -> int | None:
    """A field of an image processor's size dict (a plain dict or a `SizeDict`)."""
    return size.get(key) if hasattr(size, "get") else getattr(size, key, None)
