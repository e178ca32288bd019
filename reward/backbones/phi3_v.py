"""Phi-3-vision and Phi-3.5-vision: a CLIP tower over HD crops, 2x2-merged features with learned separators, an MLP
projector; loaded natively (`phi3_v_model`), without the checkpoint's remote code."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .base import Backbone, PixelInputs
from .phi3_v_model import Phi3VForCausalLM
from .phi3_v_processing import Phi3VImageProcessor

IMAGE_TAG = re.compile(r"<\|image_\d+\|>")


class Phi3VBackbone(Backbone):
    """Phi-3(.5)-vision. The image is `<|image_1|>` in the prompt; its visual tokens count (h*w + 1) g^2 + 1 +
    (h + 1) g for an h x w crop grid (g = 12 for the published tower), so they depend on the image's size.

    `pixel_inputs.image_sizes` holds each image's HD canvas (height, width), as the remote processor's does.
    """

    model_types = ("phi3_v",)
    projector_path = "model.vision_embed_tokens.img_projection"

    @classmethod
    def load_parts(cls, path_or_id: str | Path, dtype: torch.dtype) -> tuple[torch.nn.Module, object, object]:
        # sdpa whatever the checkpoint's config asks for: a Phi-3-vision config may name flash-attention, which
        # we do not install
        model = Phi3VForCausalLM.from_pretrained(path_or_id, dtype=dtype, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        image_processor = Phi3VImageProcessor.from_pretrained(path_or_id)
        embedding = model.model.vision_embed_tokens
        if image_processor.crop_size != embedding.crop_size:
            raise ValueError(f"{path_or_id}: the image processor cuts {image_processor.crop_size}-pixel crops but the "
                             f"vision tower takes {embedding.crop_size}; set hd_crop_size in preprocessor_config.json")
        if image_processor.num_img_tokens != embedding.grid ** 2:
            raise ValueError(f"{path_or_id}: preprocessor_config.json num_img_tokens is "
                             f"{image_processor.num_img_tokens}, the vision tower gives {embedding.grid ** 2} per crop")
        image_token_id = model.config.image_token_id
        if not 0 <= image_token_id < model.config.vocab_size or (
                image_token_id < len(tokenizer) and image_token_id != tokenizer.unk_token_id):
            raise ValueError(f"{path_or_id}: config.image_token_id {image_token_id} must be an embedding row "
                             f"(< vocab_size {model.config.vocab_size}) that text never produces: the tokenizer's "
                             f"unknown token or a row past its {len(tokenizer)} tokens")
        return model, tokenizer, image_processor

    def language_model_linear_names(self) -> list[str]:
        layers = self.model.model.layers
        return sorted({name.rsplit(".", 1)[-1] for name, module in layers.named_modules()
                       if isinstance(module, torch.nn.Linear)})

    def lora_target_regex(self) -> str:
        # Phi-3's decoder layers sit at model.layers, beside (not under) the vision tower
        return rf"model\.layers\.\d+\..*\.({'|'.join(self.language_model_linear_names())})"

    # -- text -----------------------------------------------------------------------------------------------
    def render_prompt(self, prompt: str) -> str:
        """The user turn of Phi-3.5's chat template (its content a plain string): image tag, newline, prompt."""
        messages = [{"role": "user", "content": f"<|image_1|>\n{prompt}"}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def prompt_ids(self, rendered: str) -> list[int]:
        """As Phi's processor tokenises: the text around each image tag on its own, one `image_token_id` per tag;
        the tokenizer's special tokens (Phi's leading `<s>`) once, at the start."""
        chunks = IMAGE_TAG.split(rendered)
        ids = self.tokenizer(chunks[0])["input_ids"]
        for chunk in chunks[1:]:
            ids += [self.image_token_id] + self.tokenizer(chunk, add_special_tokens=False)["input_ids"]
        return ids

    # -- pixels and vision ----------------------------------------------------------------------------------
    def pixel_inputs_differentiable(self, pixels: torch.Tensor) -> PixelInputs:
        views, sizes = self.image_processor.tensor_views(pixels)
        return PixelInputs(views.to(self.device, self.dtype), image_sizes=sizes.to(self.device))

    def _image_features(self, inputs: PixelInputs) -> list[torch.Tensor]:
        return self.model.get_image_features(inputs.pixel_values, inputs.image_sizes)

    def _split(self, projected: torch.Tensor, inputs: PixelInputs) -> list[torch.Tensor]:
        counts = self.model.model.vision_embed_tokens.token_counts(inputs.image_sizes)
        return list(torch.split(projected, counts))
