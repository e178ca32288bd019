"""One adapter per VLM family: prompt layout, reward token, visual tokens and the differentiable pixel path.

A family is chosen from the model's `config.model_type`, never from a path. Adding a family is one subclass
registered in `BACKBONES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer


@dataclass
class PixelInputs:
    """What the vision tower takes for a batch of images, whichever path made it."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor | None = None


@dataclass
class TextInputs:
    """Token ids with each image placeholder expanded, and where each row's reward token sits."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    reward_positions: torch.Tensor
    truncated: list[int]


class Backbone:
    """Wraps one loaded VLM with the knowledge of how its family lays out an image and a prompt."""

    model_types: tuple[str, ...] = ()
    projector_path: str = ""

    def __init__(self, model: torch.nn.Module, tokenizer, image_processor, max_prompt_tokens: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_prompt_tokens = max_prompt_tokens
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: the reward token is the end-of-sequence token, but this tokenizer has none")
        self.reward_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.reward_token_id

    # -- construction -------------------------------------------------------------------------------------
    @staticmethod
    def from_pretrained(path_or_id: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        max_prompt_tokens: int = 256) -> "Backbone":
        """Load a VLM, its tokenizer and image processor from a path or the local Hugging Face cache."""
        config = AutoConfig.from_pretrained(path_or_id)
        family = next((cls for cls in BACKBONES if config.model_type in cls.model_types), None)
        if family is None:
            supported = sorted(t for cls in BACKBONES for t in cls.model_types)
            raise ValueError(f"backbone {path_or_id}: model_type {config.model_type!r} is not supported; "
                             f"supported: {supported}")
        model = AutoModelForImageTextToText.from_pretrained(path_or_id, dtype=dtype).to(device)
        model.requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        # the PIL image processors need no torchvision, which we do not install
        image_processor = AutoImageProcessor.from_pretrained(path_or_id, backend="pil")
        if getattr(tokenizer, "chat_template", None) is None:
            tokenizer.chat_template = _processor_chat_template(path_or_id)
        return family(model, tokenizer, image_processor, max_prompt_tokens)

    # -- properties shared by every family ------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def projector(self) -> torch.nn.Module:
        return self.model.get_submodule(self.projector_path)

    def language_model_linear_names(self) -> list[str]:
        """Leaf names of the language model's Linear layers: the LoRA targets, found rather than hard-coded."""
        language_model = self.model.model.language_model
        return sorted({name.rsplit(".", 1)[-1] for name, module in language_model.named_modules()
                       if isinstance(module, torch.nn.Linear)})

    # -- text -----------------------------------------------------------------------------------------------
    def render_prompt(self, prompt: str) -> str:
        """The chat template's user turn holding one image and the prompt; no generation prompt."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def text_inputs(self, prompts: list[str], image_token_counts: list[int]) -> TextInputs:
        """Tokenise each rendered prompt, expand its image placeholder and append the reward token."""
        rows, truncated = [], []
        for i, (prompt, count) in enumerate(zip(prompts, image_token_counts)):
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if len(prompt_ids) > self.max_prompt_tokens:
                truncated.append(i)
                prompt = self.tokenizer.decode(prompt_ids[: self.max_prompt_tokens])
            ids = self.tokenizer(self.render_prompt(prompt), add_special_tokens=False)["input_ids"]
            if ids.count(self.image_token_id) != 1:
                raise ValueError(f"chat template: expected one image placeholder per prompt, found "
                                 f"{ids.count(self.image_token_id)} in row {i}")
            at = ids.index(self.image_token_id)
            rows.append(ids[:at] + [self.image_token_id] * count + ids[at + 1:] + [self.reward_token_id])
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        # the reward token is each row's last attended position, whatever side the padding is on
        positions = torch.arange(length).expand(len(rows), -1)
        reward_positions = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values
        return TextInputs(input_ids, attention_mask, reward_positions, truncated)

    # -- pixels ---------------------------------------------------------------------------------------------
    def pixel_inputs(self, images: list[Image.Image]) -> PixelInputs:
        """The black-box path: the model's own image processor."""
        out = self.image_processor(images=images, return_tensors="pt")
        grid = out.get("image_grid_thw")
        return PixelInputs(out["pixel_values"].to(self.device, self.dtype),
                           None if grid is None else grid.to(self.device))

    def pixel_inputs_differentiable(self, pixels: torch.Tensor) -> PixelInputs:
        """The torch path for float BCHW pixels in [0, 1], keeping the graph to them."""
        raise NotImplementedError

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.image_processor.image_mean, device=pixels.device, dtype=pixels.dtype)
        std = torch.tensor(self.image_processor.image_std, device=pixels.device, dtype=pixels.dtype)
        return (pixels - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    # -- vision ---------------------------------------------------------------------------------------------
    def encode_images(self, inputs: PixelInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the vision tower once: (the projector's input, the projector's output split per image)."""
        captured = {}

        def keep_input(module, args, output) -> None:  # returns None so the output is left as it is
            captured["input"] = args[0]

        hook = self.projector().register_forward_hook(keep_input)
        try:
            features = self._image_features(inputs)
        finally:
            hook.remove()
        return captured["input"], features

    def project(self, projector: torch.nn.Module, projector_input: torch.Tensor, inputs: PixelInputs
                ) -> list[torch.Tensor]:
        """Apply a (perspective's own) projector copy to the captured projector input, split per image."""
        return self._split(projector(projector_input), inputs)

    def _image_features(self, inputs: PixelInputs) -> list[torch.Tensor]:
        raise NotImplementedError

    def _split(self, projected: torch.Tensor, inputs: PixelInputs) -> list[torch.Tensor]:
        raise NotImplementedError

    def position_ids(self, text: TextInputs, inputs: PixelInputs) -> torch.Tensor | None:
        """Position ids for the language model, or None to let it count 0..n-1 itself."""
        return None


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


def _processor_chat_template(path_or_id: str | Path) -> str:
    """Some checkpoints keep the chat template with the processor only; read it from there."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            found = cached_file(str(path_or_id), name)
        except OSError:
            continue
        if found:
            text = Path(found).read_text()
            if name.endswith(".json"):
                import json

                text = json.loads(text)["chat_template"]
            return text
    raise ValueError(f"backbone {path_or_id}: no chat template in its tokenizer or processor files")


BACKBONES: list[type[Backbone]] = [LlavaBackbone, Qwen2VLBackbone]
