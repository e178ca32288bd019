"""User images and prompts -> validated inputs for the reward model, with errors that name what was wrong.

Paths, PIL images and uint8 arrays become RGB PIL images for the model's own processor (the black-box path);
float tensors BCHW in [0, 1] stay tensors and take the differentiable torch path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

ImageBatch = Union[torch.Tensor, np.ndarray, Sequence[Any]]


def validate_prompts(prompts: Sequence[str] | str, batch_size: int) -> list[str]:
    """Prompts as a list of strings, one per image."""
    if isinstance(prompts, str):
        raise TypeError("prompts: expected a list of strings (one per image), got a single string")
    prompts = list(prompts)
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}]: expected str, got {type(prompt).__name__}")
    if len(prompts) != batch_size:
        raise ValueError(f"prompts: got {len(prompts)} prompts for {batch_size} images; expected one per image")
    return prompts


def _channels_to_rgb(pixels: torch.Tensor) -> torch.Tensor:
    channels = pixels.shape[1]
    if channels == 1:
        return pixels.expand(-1, 3, -1, -1)
    if channels == 4:  # RGBA: alpha dropped, as PIL's convert("RGB") does
        return pixels[:, :3]
    if channels != 3:
        raise ValueError(f"images: expected 1, 3 or 4 channels in dimension 1 (BCHW), got shape {tuple(pixels.shape)}")
    return pixels


def validate_float_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """A float BCHW tensor in [0, 1], finite, as RGB."""
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(0)
    if pixels.ndim != 4:
        raise ValueError(f"images: a float tensor must be BCHW (or CHW), got shape {tuple(pixels.shape)}")
    if pixels.shape[0] == 0:
        raise ValueError("images: the batch is empty")
    if not torch.isfinite(pixels).all():
        raise ValueError("images: the tensor holds NaN or inf values")
    low, high = pixels.min().item(), pixels.max().item()
    if low < 0.0 or high > 1.0:
        raise ValueError(f"images: float pixels must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")
    return _channels_to_rgb(pixels)


def _to_pil(item: Any, where: str) -> Image.Image:
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise ValueError(f"{where}: no such image file {path}")
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{where}: cannot read image file {path} ({exc})") from exc
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, torch.Tensor) and item.is_floating_point():  # one CHW image inside a list
        item = (validate_float_pixels(item.detach().cpu())[0].permute(1, 2, 0) * 255).round().to(torch.uint8)
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            item = item[..., None]
        if item.ndim != 3 or item.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{where}: an array image must be HWC with 1, 3 or 4 channels, got shape {item.shape}")
        if item.dtype != np.uint8:
            raise ValueError(f"{where}: an array image must be uint8 HWC (or pass a float BCHW tensor), got {item.dtype}")
        return Image.fromarray(item[..., 0] if item.shape[-1] == 1 else item).convert("RGB")
    raise TypeError(f"{where}: expected a path, PIL image, uint8 array or float tensor, got {type(item).__name__}")


def load_images(images: ImageBatch) -> list[Image.Image] | torch.Tensor:
    """Validated images: a float BCHW tensor (torch path) or a list of RGB PIL images (processor path)."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        return validate_float_pixels(images)
    if isinstance(images, (torch.Tensor, np.ndarray)):
        if images.ndim == 4:  # a uint8 NHWC batch
            images = list(images)
        elif images.ndim in (2, 3):
            images = [images]
        else:
            raise ValueError(f"images: an array batch must be NHWC uint8, got shape {tuple(images.shape)}")
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("images: the batch is empty")
    return [_to_pil(item, f"images[{i}]") for i, item in enumerate(images)]


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB PIL images of one size -> float BCHW in [0, 1]."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
