"""Phi-3(.5)-vision's HD image preprocessing in PIL (no torchvision) and the same layout in torch with gradients.

An image is turned landscape, scaled so that a whole number of crop-wide columns fits within `num_crops` crops,
padded with white to a whole number of crop rows (centred), turned back; normalised with CLIP's mean/std; then
cut into crop x crop sub-crops (row by row) and preceded by a bicubic crop x crop global view of the whole canvas.
The crop size is the remote code's constant 336; `hd_crop_size` in preprocessor_config.json (written only when
it differs) lets tiny test checkpoints use a smaller tower.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import cached_file

PROCESSOR_CONFIG = "preprocessor_config.json"
DEFAULT_CROP_SIZE = 336


def hd_layout(width: int, height: int, num_crops: int, crop: int) -> tuple[bool, int, int, int, int]:
    """The HD canvas of a width x height image, computed landscape (long side as width):
    (transposed, resized width, resized height, padded height, top padding)."""
    transposed = width < height
    if transposed:
        width, height = height, width
    ratio = width / height
    scale = 1
    while scale * math.ceil(scale / ratio) <= num_crops:
        scale += 1
    scale -= 1
    new_width = int(scale * crop)
    # an image wider than `crop` times its height would scale to zero rows, where the remote code fails
    new_height = max(1, int(new_width / ratio))
    padded_height = math.ceil(new_height / crop) * crop
    return transposed, new_width, new_height, padded_height, int((padded_height - new_height) / 2)


class Phi3VImageProcessor:
    """Reads the published preprocessor_config.json (`num_crops`, `image_mean`, `image_std`, `num_img_tokens`) and
    returns what the remote `Phi3VImageProcessor` returns: `pixel_values` (images, num_crops + 1, 3, crop, crop),
    `image_sizes` (images, 2) HD canvas (height, width) and `num_img_tokens`."""

    def __init__(self, num_crops: int = 1, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, num_img_tokens: int = 144,
                 hd_crop_size: int = DEFAULT_CROP_SIZE):
        if not isinstance(num_crops, int) or num_crops < 1:
            raise ValueError(f"{PROCESSOR_CONFIG}: num_crops must be a positive integer, got {num_crops!r}")
        grid = math.isqrt(num_img_tokens)
        if grid * grid != num_img_tokens:
            raise ValueError(f"{PROCESSOR_CONFIG}: num_img_tokens must be a square (tokens per crop), "
                             f"got {num_img_tokens!r}")
        self.num_crops = num_crops
        self.image_mean = list(OPENAI_CLIP_MEAN if image_mean is None else image_mean)
        self.image_std = list(OPENAI_CLIP_STD if image_std is None else image_std)
        self.num_img_tokens = num_img_tokens
        self.crop_size = hd_crop_size

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path) -> "Phi3VImageProcessor":
        """From a checkpoint directory or the local Hugging Face cache."""
        found = cached_file(str(path_or_id), PROCESSOR_CONFIG)
        config = json.loads(Path(found).read_text())
        kind = config.get("image_processor_type")
        if kind != "Phi3VImageProcessor":
            raise ValueError(f"{path_or_id}/{PROCESSOR_CONFIG}: image_processor_type: expected "
                             f"'Phi3VImageProcessor', got {kind!r}")
        known = ("num_crops", "image_mean", "image_std", "num_img_tokens", "hd_crop_size")
        return cls(**{key: config[key] for key in known if key in config})

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write preprocessor_config.json in the published layout."""
        config = {
            "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor",
                         "AutoImageProcessor": "processing_phi3_v.Phi3VImageProcessor"},
            "image_processor_type": "Phi3VImageProcessor", "processor_class": "Phi3VProcessor",
            "num_crops": self.num_crops, "image_mean": self.image_mean, "image_std": self.image_std,
            "num_img_tokens": self.num_img_tokens,
        }
        if self.crop_size != DEFAULT_CROP_SIZE:
            config["hd_crop_size"] = self.crop_size
        path = Path(directory) / PROCESSOR_CONFIG
        path.write_text(json.dumps(config, indent=2))
        return path

    def num_image_tokens(self, width: int, height: int) -> int:
        """Visual tokens for an image of this size, the remote `calc_num_image_tokens_from_image_size`."""
        transposed, new_width, _, padded_height, _ = hd_layout(width, height, self.num_crops, self.crop_size)
        rows, cols = padded_height // self.crop_size, new_width // self.crop_size
        if transposed:
            rows, cols = cols, rows
        grid = math.isqrt(self.num_img_tokens)
        return (rows * cols + 1) * self.num_img_tokens + 1 + (rows + 1) * grid

    # -- the PIL path -----------------------------------------------------------------------------------------
    def hd_canvas(self, image: Image.Image) -> Image.Image:
        """The padded HD canvas, step by step as the remote code takes them (PIL bilinear, white padding)."""
        image = image.convert("RGB")
        transposed, new_width, new_height, padded_height, top = hd_layout(*image.size, self.num_crops, self.crop_size)
        if transposed:
            image = image.transpose(Image.Transpose.TRANSPOSE)
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (new_width, padded_height), (255, 255, 255))
        canvas.paste(image, (0, top))
        return canvas.transpose(Image.Transpose.TRANSPOSE) if transposed else canvas

    def __call__(self, images: list[Image.Image], return_tensors: str = "pt") -> BatchFeature:
        if return_tensors != "pt":
            raise ValueError(f"return_tensors: only 'pt' is supported, got {return_tensors!r}")
        canvases = []
        for image in images:
            array = np.array(self.hd_canvas(image), dtype=np.uint8)
            canvases.append(torch.from_numpy(array).permute(2, 0, 1).float().div(255))
        views = [self._views(self._normalise(canvas[None]))[0] for canvas in canvases]
        sizes = torch.tensor([list(canvas.shape[-2:]) for canvas in canvases], dtype=torch.long)
        tokens = [self.num_image_tokens(image.width, image.height) for image in images]
        return BatchFeature({"pixel_values": torch.stack(views), "image_sizes": sizes,
                             "num_img_tokens": torch.tensor(tokens)})

    # -- the torch path ---------------------------------------------------------------------------------------
    def tensor_views(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float BCHW pixels in [0, 1] -> (pixel_values, image_sizes) as `__call__` makes them, keeping the graph.

        Bilinear resizing with antialiasing stands in for PIL's (equal up to PIL's rounding to 8 bits); transposing
        does not change a float separable resize, so the canvas is computed in the image's own orientation.
        """
        batch, _, height, width = pixels.shape
        transposed, new_width, new_height, padded_height, top = hd_layout(width, height, self.num_crops,
                                                                          self.crop_size)
        size = (new_width, new_height) if transposed else (new_height, new_width)
        if size != (height, width):
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
        bottom = padded_height - new_height - top
        padding = (top, bottom, 0, 0) if transposed else (0, 0, top, bottom)  # (left, right, top, bottom)
        canvas = F.pad(pixels, padding, value=1.0)
        sizes = torch.tensor([list(canvas.shape[-2:])] * batch, dtype=torch.long)
        return self._views(self._normalise(canvas)), sizes

    # -- shared -----------------------------------------------------------------------------------------------
    def _normalise(self, canvas: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.image_mean, dtype=canvas.dtype, device=canvas.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, dtype=canvas.dtype, device=canvas.device).view(1, -1, 1, 1)
        return (canvas - mean) / std

    def _views(self, canvas: torch.Tensor) -> torch.Tensor:
        """Normalised canvases (B, 3, H, W) -> (B, num_crops + 1, 3, crop, crop): global view, sub-crops by rows,
        zero views up to num_crops + 1."""
        crop = self.crop_size
        batch, channels, height, width = canvas.shape
        global_view = F.interpolate(canvas, size=(crop, crop), mode="bicubic", align_corners=False)
        crops = canvas.reshape(batch, channels, height // crop, crop, width // crop, crop)
        crops = crops.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels, crop, crop)
        views = torch.cat([global_view[:, None], crops], dim=1)
        return F.pad(views, (0, 0, 0, 0, 0, 0, 0, self.num_crops + 1 - views.shape[1]))
