"""Phi-3-vision / Phi-3.5-vision on transformers' own parts: Phi-3's language model, a CLIP vision tower and the
HD image embedding (2x2-merged crop features, learned row and global separators, an MLP projection).

Transformers has no Phi3V class and we run no remote code: the module tree below reproduces the published
checkpoint's parameter names (`model.vision_embed_tokens.img_processor.vision_model.*`, `...glb_GN`, `...sub_GN`,
`...img_projection.{0,2}.*`, and Phi-3's `model.layers.*`, `model.norm`, `lm_head`; the token embedding stored as
`model.vision_embed_tokens.wte.weight` or `model.embed_tokens.weight`), so `from_pretrained` reads the published
safetensors unchanged. Importing this module registers `phi3_v` with `AutoConfig` and
`AutoModelForCausalLM`, which then take the local classes over the checkpoint's `auto_map`.
"""

from __future__ import annotations

import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    Phi3Config,
    Phi3ForCausalLM,
    Phi3Model,
)
from transformers import initialization as init
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.models.phi3.modeling_phi3 import Phi3PreTrainedModel

# openai/clip-vit-large-patch14-336, the tower every published Phi-3(.5)-vision checkpoint names in `img_processor`
CLIP_VIT_L14_336 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
    dropout=0.0, initializer_range=0.02, initializer_factor=1.0, num_channels=3,
)


@strict
class Phi3VConfig(Phi3Config):
    """Phi-3's language-model fields plus the vision fields of the published `config.json`.

    embd_layer: the HD image embedding (`embedding_cls` "image", `use_hd_transform`, `with_learnable_separator`,
        `hd_transform_order` "sub_glb" or "glb_sub", `projection_cls` "mlp").
    img_processor: the vision tower (`name` "clip_vision_model", `model_name`, `image_dim_out`, `num_img_tokens`,
        optional `layer_idx` (-2) and `type_feature` ("patch")). Optional `vision_config`, a dict of
        `CLIPVisionConfig` arguments, replaces the ViT-L/14-336 tower (tiny test checkpoints store theirs here).
    image_token_id: the id that marks image positions in `input_ids`. The published config has none: the remote
        processor writes negative ids, which the remote model clamps to 0 (`<unk>`, which Phi's byte-fallback
        tokenizer never produces from text) before embedding them; 0 is the default here too.
    """

    model_type = "phi3_v"

    embd_layer: dict | None = None
    img_processor: dict | None = None
    image_token_id: int = 0

    def convert_rope_params_to_dict(self, default_theta: int | float = 10_000.0, ignore_keys: set | None = None,
                                    **kwargs):
        # The published configs name LongRoPE by its old names. Phi3Config renames "su" only after it has decided
        # which keys the scaling needs, and then refuses its own result, so rename first. "yarn" is LongRoPE with
        # the remote code's own attention factor, 0.1 ln(s) + 1, which LongRoPE takes as `attention_factor`.
        scaling = kwargs.get("rope_scaling")
        kind = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
        if kind in ("su", "yarn"):
            scaling = {**scaling, "type": "longrope", "rope_type": "longrope"}
            if kind == "yarn":
                scale = self.max_position_embeddings / self.original_max_position_embeddings
                scaling.setdefault("attention_factor", 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0)
            kwargs["rope_scaling"] = scaling
        return super().convert_rope_params_to_dict(default_theta, ignore_keys, **kwargs)

    def clip_vision_config(self) -> CLIPVisionConfig:
        """The vision tower's config: `img_processor["vision_config"]` if given, else CLIP ViT-L/14-336."""
        img_processor = self.img_processor or {}
        overrides = img_processor.get("vision_config")
        if overrides is not None and not isinstance(overrides, dict):
            raise ValueError(f"config.img_processor.vision_config: expected a dict of CLIPVisionConfig arguments, "
                             f"got {type(overrides).__name__}")
        return CLIPVisionConfig(**(CLIP_VIT_L14_336 if overrides is None else overrides))


def _checked_vision_config(config: Phi3VConfig) -> CLIPVisionConfig:
    """The vision tower's config; a config whose vision part the HD embedding cannot build is refused by field."""
    embd, proc = config.embd_layer, config.img_processor
    if not isinstance(embd, dict):
        raise ValueError(f"config.embd_layer: expected a dict (embedding_cls 'image', use_hd_transform true, ...), "
                         f"got {embd!r}")
    if not isinstance(proc, dict):
        raise ValueError(f"config.img_processor: expected a dict (name 'clip_vision_model', image_dim_out, "
                         f"num_img_tokens, ...), got {proc!r}")
    expected = {"embedding_cls": "image", "use_hd_transform": True, "with_learnable_separator": True,
                "projection_cls": "mlp"}
    for key, value in expected.items():
        if embd.get(key) != value:
            raise ValueError(f"config.embd_layer.{key}: expected {value!r}, got {embd.get(key)!r}")
    if embd.get("hd_transform_order", "glb_sub") not in ("sub_glb", "glb_sub"):
        raise ValueError(f"config.embd_layer.hd_transform_order: expected 'sub_glb' or 'glb_sub', "
                         f"got {embd['hd_transform_order']!r}")
    vision = config.clip_vision_config()
    if proc.get("name") != "clip_vision_model":
        raise ValueError(f"config.img_processor.name: expected 'clip_vision_model', got {proc.get('name')!r}")
    if proc.get("type_feature", "patch") != "patch":
        raise ValueError(f"config.img_processor.type_feature: expected 'patch', got {proc['type_feature']!r}")
    if proc.get("image_dim_out") != vision.hidden_size:
        raise ValueError(f"config.img_processor.image_dim_out: expected the vision tower's width "
                         f"{vision.hidden_size}, got {proc.get('image_dim_out')!r}")
    layer_idx, depth = proc.get("layer_idx", -2), vision.num_hidden_layers
    if not isinstance(layer_idx, int) or not -depth - 1 <= layer_idx <= depth:
        raise ValueError(f"config.img_processor.layer_idx: expected a hidden state of the {depth}-layer tower "
                         f"({-depth - 1}..{depth}), got {layer_idx!r}")
    side, rest = divmod(vision.image_size, vision.patch_size)
    if rest or side % 2:
        raise ValueError(f"config.img_processor.vision_config: image_size / patch_size must be an even whole number "
                         f"for the 2x2 merge, got {vision.image_size} / {vision.patch_size}")
    if proc.get("num_img_tokens") != (side // 2) ** 2:
        raise ValueError(f"config.img_processor.num_img_tokens: expected {(side // 2) ** 2} (the tower's "
                         f"{side}x{side} patches merged 2x2), got {proc.get('num_img_tokens')!r}")
    return vision


class Phi3VImageEmbedding(nn.Module):
    """The HD image embedding: CLIP over each crop, 2x2 patch merge, separators, MLP projection.

    One image arrives as a global view plus an h x w grid of sub-crops, each the tower's input size. Every crop's
    patch features (CLS dropped, taken at `layer_idx`) are merged 2x2 into a g x g grid of 4x wider features; the
    sub-crops are stitched into one (h*g) x (w*g) grid. `sub_GN` ends every row of the stitched grid and of the
    global grid, and `glb_GN` stands between the two, sub-crops first for "sub_glb" (Phi-3.5-vision).
    """

    def __init__(self, config: Phi3VConfig):
        super().__init__()
        vision = _checked_vision_config(config)
        self.img_processor = CLIPVisionModel(vision)
        self.crop_size = vision.image_size
        self.grid = vision.image_size // vision.patch_size // 2  # g: merged features per crop side
        self.layer_idx = config.img_processor.get("layer_idx", -2)
        self.order = config.embd_layer.get("hd_transform_order", "glb_sub")
        width = 4 * vision.hidden_size
        self.glb_GN = nn.Parameter(torch.zeros(1, 1, width))
        self.sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))
        self.img_projection = nn.Sequential(
            nn.Linear(width, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )

    def crop_grids(self, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
        """(rows, columns) of sub-crops per image, from the HD canvas sizes (height, width) in pixels."""
        return [(int(h) // self.crop_size, int(w) // self.crop_size) for h, w in image_sizes.tolist()]

    def token_counts(self, image_sizes: torch.Tensor) -> list[int]:
        """Visual tokens per image: the processor's `num_img_tokens`, (h*w + 1) g^2 + 1 + (h + 1) g."""
        g = self.grid
        return [(rows * cols + 1) * g * g + 1 + (rows + 1) * g for rows, cols in self.crop_grids(image_sizes)]

    def tower_features(self, crops: torch.Tensor) -> torch.Tensor:
        """CLIP's hidden state `layer_idx` (0 = the embeddings after `pre_layrnorm`), the layers past it not run.

        Run by hand rather than through `output_hidden_states`: this tower sits inside Phi-3's decoder model, whose
        output capturing installs a second set of hooks on the tower's layers, after which the tower's own
        `hidden_states` list each layer twice.
        """
        tower = self.img_processor
        layers = tower.encoder.layers
        depth = self.layer_idx % (len(layers) + 1)
        hidden = tower.pre_layrnorm(tower.embeddings(crops))
        for layer in layers[:depth]:
            hidden = layer(hidden, None)
        return hidden

    def merged_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """The projection's input for a batch: every image's separated feature sequence, concatenated.

        pixel_values: (images, views, 3, crop, crop), the global view first, then the sub-crops row by row, then
        zero padding up to `num_crops + 1` views; image_sizes: (images, 2) HD canvas (height, width).
        """
        grids = self.crop_grids(image_sizes)
        # the padding views never reach the tower: each crop is encoded on its own, so this changes no feature
        crops = torch.cat([pixel_values[i, : 1 + rows * cols] for i, (rows, cols) in enumerate(grids)])
        hidden = self.tower_features(crops)[:, 1:]  # CLS dropped ("patch" features)
        g = self.grid
        channels = hidden.shape[-1]
        # 2x2 merge: each merged cell holds its (top-left, top-right, bottom-left, bottom-right) patches' features
        merged = hidden.reshape(-1, g, 2, g, 2, channels).permute(0, 1, 3, 2, 4, 5).reshape(-1, g, g, 4 * channels)
        sequences, start = [], 0
        for rows, cols in grids:
            glb = self._with_row_ends(merged[start])
            sub = merged[start + 1: start + 1 + rows * cols].reshape(rows, cols, g, g, -1)
            sub = self._with_row_ends(sub.permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, -1))
            parts = [sub, self.glb_GN[0], glb] if self.order == "sub_glb" else [glb, self.glb_GN[0], sub]
            sequences.extend(parts)
            start += 1 + rows * cols
        return torch.cat(sequences)

    def _with_row_ends(self, grid: torch.Tensor) -> torch.Tensor:
        """(rows, columns, width) -> (rows * (columns + 1), width): `sub_GN` after every row."""
        row_ends = self.sub_GN[0].expand(grid.shape[0], 1, -1)
        return torch.cat([grid, row_ends], dim=1).flatten(0, 1)

    def forward(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens of every image, concatenated in image order: (tokens, hidden)."""
        merged = self.merged_features(pixel_values, image_sizes)
        target = self.img_projection[0].weight
        return self.img_projection(merged.to(target.device, target.dtype))


class Phi3VModel(Phi3Model):
    """Phi-3's decoder with the HD image embedding beside its token embedding, as `vision_embed_tokens`."""

    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig):
        super().__init__(config)
        self.vision_embed_tokens = Phi3VImageEmbedding(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Phi3VImageEmbedding):  # the remote code starts its separators at zero
            init.zeros_(module.glb_GN)
            init.zeros_(module.sub_GN)


class Phi3VForCausalLM(Phi3ForCausalLM):
    """Phi-3(.5)-vision: `Phi3VModel` under a language-model head. Its forward takes `inputs_embeds` (text
    embeddings with the visual tokens scattered in, see `get_image_features`), as Phi-3's does."""

    config_class = Phi3VConfig

    def __init__(self, config: Phi3VConfig):
        # Phi3ForCausalLM.__init__ would first build a text-only Phi3Model only to have it replaced
        Phi3PreTrainedModel.__init__(self, config)
        self.model = Phi3VModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """Each image's visual tokens (tokens, hidden), in the order the image positions take them."""
        embedding = self.model.vision_embed_tokens
        return list(torch.split(embedding(pixel_values, image_sizes), embedding.token_counts(image_sizes)))


AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig)
AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM)
# The remote model reaches its token embedding under two names (`vision_embed_tokens.wte` is `embed_tokens`) and
# the published safetensors keep the tensor once, under `model.vision_embed_tokens.wte.weight`
register_checkpoint_conversion_mapping(Phi3VConfig.model_type, [
    WeightRenaming(source_patterns=r"^model\.vision_embed_tokens\.wte\.", target_patterns="model.embed_tokens."),
])
