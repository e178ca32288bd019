"""One adapter per VLM family (prompt layout, reward token, visual tokens, the differentiable pixel path),
found by the checkpoint's `model_type` in `BACKBONES`. Importing a family's module registers it."""

from .base import BACKBONES, Backbone, PixelInputs, TextInputs
from .llava import LlavaBackbone
from .llava_next import LlavaNextBackbone
from .phi3_v import Phi3VBackbone
from .qwen2_vl import Qwen2VLBackbone

__all__ = ["BACKBONES", "Backbone", "LlavaBackbone", "LlavaNextBackbone", "Phi3VBackbone", "PixelInputs",
           "Qwen2VLBackbone", "TextInputs"]
