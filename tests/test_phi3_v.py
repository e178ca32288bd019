"""Phi-3.5-vision specifics: the published checkpoint layout loaded without remote code, the HD transform's token
count and layout, the default ViT-L/14-336 tower, LongRoPE's old names, and clear errors for malformed configs."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

from reward import RewardModel
from reward.backbones import Backbone, Phi3VBackbone
from reward.backbones.phi3_v_model import Phi3VConfig, Phi3VForCausalLM, Phi3VImageEmbedding
from reward.backbones.phi3_v_processing import Phi3VImageProcessor, hd_layout

PUBLISHED_NAMES = [
    r"lm_head\.weight", r"model\.vision_embed_tokens\.wte\.weight", r"model\.norm\.weight",
    r"model\.layers\.\d+\.(self_attn\.(qkv_proj|o_proj)|mlp\.(gate_up_proj|down_proj)|"
    r"input_layernorm|post_attention_layernorm)\.weight",
    r"model\.vision_embed_tokens\.img_processor\.vision_model\..+",
    r"model\.vision_embed_tokens\.(glb_GN|sub_GN)", r"model\.vision_embed_tokens\.img_projection\.[02]\.(weight|bias)",
]
EMBD_LAYER = {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
              "use_hd_transform": True, "with_learnable_separator": True}
TINY_TOWER = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                  patch_size=4)


@pytest.fixture(scope="module")
def phi(tiny_vlm_paths):
    return tiny_vlm_paths["phi3_v"]


@pytest.fixture(scope="module")
def backbone(phi) -> Phi3VBackbone:
    return Backbone.from_pretrained(phi)


def _config(**img_processor) -> Phi3VConfig:
    fields = {"name": "clip_vision_model", "model_name": "openai/clip-vit-large-patch14-336", "image_dim_out": 8,
              "num_img_tokens": 4, "vision_config": TINY_TOWER, **img_processor}
    return Phi3VConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, embd_layer=dict(EMBD_LAYER), img_processor=fields)


def test_published_layout_loads_natively(phi, tmp_path):
    config = json.loads((phi / "config.json").read_text())
    assert config["model_type"] == "phi3_v" and "AutoConfig" in config["auto_map"] and "image_token_id" not in config
    assert config["rope_scaling"]["type"] == "su"
    stored = load_file(phi / "model.safetensors")
    assert all(any(re.fullmatch(pattern, name) for pattern in PUBLISHED_NAMES) for name in stored), list(stored)
    # the published config also asks for flash-attention, which this machine lacks: we load sdpa regardless
    copy = shutil.copytree(phi, tmp_path / "published")
    (copy / "config.json").write_text(json.dumps({**config, "_attn_implementation": "flash_attention_2"}))
    assert type(AutoConfig.from_pretrained(copy)) is Phi3VConfig  # the auto_map's remote code is never run
    loaded = Backbone.from_pretrained(copy)
    assert isinstance(loaded, Phi3VBackbone) and isinstance(loaded.model, Phi3VForCausalLM)
    ours = loaded.model.state_dict()
    for name, value in stored.items():
        name = name.replace("img_processor.vision_model.", "img_processor.")
        torch.testing.assert_close(ours[name.replace("vision_embed_tokens.wte.", "embed_tokens.")], value,
                                   atol=0, rtol=0)
    assert type(AutoModelForCausalLM.from_pretrained(phi)) is Phi3VForCausalLM
    # image positions carry the id the remote model embeds them with: its negative ids clamped to 0, `<unk>`
    assert loaded.image_token_id == 0 == loaded.tokenizer.unk_token_id
    # the token embedding may also be stored under its own name
    save_file({name.replace("vision_embed_tokens.wte.", "embed_tokens."): value for name, value in stored.items()},
              copy / "model.safetensors", metadata={"format": "pt"})
    renamed = Phi3VForCausalLM.from_pretrained(copy, attn_implementation="sdpa")
    torch.testing.assert_close(renamed.model.embed_tokens.weight, stored["model.vision_embed_tokens.wte.weight"],
                               atol=0, rtol=0)


def test_lora_targets_only_the_language_model(phi):
    model = RewardModel.from_backbone(phi, ["overall"], lora_r=2)
    adapted = [name for name, module in model.peft_model.named_modules() if hasattr(module, "lora_A")]
    assert adapted and all(re.search(r"\.model\.layers\.\d+\.", name) for name in adapted)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


@pytest.mark.parametrize("width, height", [(32, 32), (50, 20), (20, 50), (17, 33), (90, 12), (7, 7)])
def test_token_count_formula_equals_image_positions(backbone, width, height):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    processed = backbone.image_processor([image])
    expected = backbone.image_processor.num_image_tokens(width, height)
    assert processed["num_img_tokens"].tolist() == [expected]
    pixels = backbone.pixel_inputs([image])
    with torch.no_grad():
        _, features = backbone.encode_images(pixels)
    assert [f.shape[0] for f in features] == [expected]
    text = backbone.text_inputs(["a red circle"], [expected])
    ids = text.input_ids[0].tolist()
    assert ids.count(backbone.image_token_id) == expected
    assert ids[0] == backbone.tokenizer.bos_token_id and ids.count(backbone.tokenizer.bos_token_id) == 1
    assert ids[-1] == backbone.reward_token_id


@pytest.mark.parametrize("width, height, crops, canvas", [
    # (width, height) -> HD canvas (width, height) at the published 336-pixel crops
    (336, 336, 4, (672, 672)), (1000, 500, 4, (672, 336)), (500, 1000, 4, (336, 672)), (600, 400, 16, (1344, 1008)),
    (336, 336, 1, (336, 336)),
])
def test_hd_canvas_and_token_count_at_published_geometry(width, height, crops, canvas):
    processor = Phi3VImageProcessor(num_crops=crops)
    transposed, new_width, _, padded_height, _ = hd_layout(width, height, crops, 336)
    assert ((padded_height, new_width) if transposed else (new_width, padded_height)) == canvas
    assert processor.hd_canvas(Image.new("RGB", (width, height))).size == canvas
    rows, cols = canvas[1] // 336, canvas[0] // 336
    assert processor.num_image_tokens(width, height) == (rows * cols + 1) * 144 + 1 + (rows + 1) * 12


def test_hd_feature_layout_places_separators_and_grids():
    """Every patch feature is tagged with (crop, patch row, patch column): the merged sequence must hold, for
    "sub_glb", the stitched sub-crop grid row by row with sub_GN ending each row, glb_GN, then the global grid."""
    embedding = Phi3VImageEmbedding(_config())
    g, side = embedding.grid, 2 * embedding.grid  # 2 merged tokens (4 patches) per crop side
    with torch.no_grad():
        embedding.glb_GN.fill_(-1.0)
        embedding.sub_GN.fill_(-2.0)
    rows, cols = 1, 2
    crops = 1 + rows * cols

    def tagged(pixels):  # stands in for CLIP: (crops, 1 + patches, width), a CLS then row-major patches
        crop = torch.arange(pixels.shape[0]).view(-1, 1, 1).expand(-1, side, side)
        row = torch.arange(side).view(1, -1, 1).expand(pixels.shape[0], -1, side)
        col = torch.arange(side).view(1, 1, -1).expand(pixels.shape[0], side, -1)
        tags = torch.stack([crop, row, col], -1).reshape(pixels.shape[0], -1, 3).float()
        features = torch.cat([tags, torch.zeros(*tags.shape[:2], 5)], -1)
        return torch.cat([torch.zeros(pixels.shape[0], 1, 8), features], 1)

    embedding.tower_features = tagged
    pixels = torch.zeros(1, 5, 3, 16, 16)  # global + 2 sub-crops + 2 padding views
    merged = embedding.merged_features(pixels, torch.tensor([[16 * rows, 16 * cols]]))
    assert merged.shape == (embedding.token_counts(torch.tensor([[16, 32]]))[0], 4 * 8)
    assert merged.shape[0] == (rows * cols + 1) * g * g + 1 + (rows + 1) * g

    def cell(token, dy, dx):  # (crop, row, col) of one of the 2x2 patches merged into a token
        return token[8 * (2 * dy + dx): 8 * (2 * dy + dx) + 3].tolist()

    sub_width = cols * g + 1
    for r in range(rows * g):
        for c in range(sub_width):
            token = merged[r * sub_width + c]
            if c == cols * g:
                assert torch.all(token == -2.0)  # sub_GN ends the row
                continue
            crop = 1 + (r // g) * cols + c // g
            assert [cell(token, dy, dx) for dy in (0, 1) for dx in (0, 1)] == \
                [[crop, 2 * (r % g) + dy, 2 * (c % g) + dx] for dy in (0, 1) for dx in (0, 1)]
    start = rows * g * sub_width
    assert torch.all(merged[start] == -1.0)  # glb_GN between the sub-crops and the global view
    glb = merged[start + 1:].reshape(g, g + 1, -1)
    assert torch.all(glb[:, g] == -2.0)
    assert all(cell(glb[r, c], 0, 0) == [0, 2 * r, 2 * c] for r in range(g) for c in range(g))
    embedding.order = "glb_sub"
    swapped = embedding.merged_features(pixels, torch.tensor([[16 * rows, 16 * cols]]))
    torch.testing.assert_close(swapped, torch.cat([merged[start + 1:], merged[start: start + 1], merged[:start]]))


def test_tower_reads_the_hidden_state_layer_idx_names():
    embedding = Phi3VImageEmbedding(_config(layer_idx=-2))
    crops = torch.randn(3, 3, 16, 16)
    fresh = CLIPVisionModel(embedding.img_processor.config)
    fresh.load_state_dict(embedding.img_processor.state_dict())
    with torch.no_grad():
        expected = fresh(crops, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(embedding.tower_features(crops), expected)


def test_default_tower_is_clip_vit_l14_336():
    config = _config()
    config.img_processor = {key: value for key, value in config.img_processor.items() if key != "vision_config"}
    config.img_processor.update(image_dim_out=1024, num_img_tokens=144)
    tower = config.clip_vision_config()
    assert (tower.hidden_size, tower.intermediate_size, tower.num_hidden_layers, tower.num_attention_heads,
            tower.image_size, tower.patch_size, tower.hidden_act) == (1024, 4096, 24, 16, 336, 14, "quick_gelu")
    with torch.device("meta"):
        embedding = Phi3VImageEmbedding(config)
    assert (embedding.crop_size, embedding.grid) == (336, 12)
    assert embedding.img_projection[0].in_features == 4096


def test_longrope_old_names():
    head_dim_half = 4
    scaling = {"short_factor": [1.0] * head_dim_half, "long_factor": [2.0] * head_dim_half}
    common = dict(hidden_size=16, num_attention_heads=2, max_position_embeddings=131072,
                  original_max_position_embeddings=4096)
    su = Phi3VConfig(rope_scaling={**scaling, "type": "su"}, **common)
    assert su.rope_parameters["rope_type"] == "longrope" and "attention_factor" not in su.rope_parameters
    yarn = Phi3VConfig(rope_scaling={**scaling, "type": "yarn"}, **common)
    assert yarn.rope_parameters["attention_factor"] == pytest.approx(0.1 * math.log(32) + 1.0)


def test_processor_and_torch_paths_agree(backbone):
    rng = np.random.default_rng(1)
    for height, width in [(32, 32), (24, 40), (40, 24)]:
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        pil = backbone.image_processor([Image.fromarray(array)])
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
        views, sizes = backbone.image_processor.tensor_views(pixels)
        assert torch.equal(sizes, pil["image_sizes"])
        # equal at the native size; elsewhere PIL rounds its resized image to 8 bits
        tolerance = 0 if (height, width) == (32, 32) else 2.5 / 255 / min(backbone.image_processor.image_std)
        torch.testing.assert_close(views, pil["pixel_values"], atol=tolerance, rtol=0)


@pytest.mark.parametrize("change, match", [
    (lambda c: setattr(c, "embd_layer", None), r"config\.embd_layer: expected a dict"),
    (lambda c: c.embd_layer.update(projection_cls="linear"), r"config\.embd_layer\.projection_cls"),
    (lambda c: c.embd_layer.update(use_hd_transform=False), r"config\.embd_layer\.use_hd_transform"),
    (lambda c: c.embd_layer.update(hd_transform_order="glb_only"), r"config\.embd_layer\.hd_transform_order"),
    (lambda c: setattr(c, "img_processor", "clip"), r"config\.img_processor: expected a dict"),
    (lambda c: c.img_processor.update(name="siglip"), r"config\.img_processor\.name"),
    (lambda c: c.img_processor.update(image_dim_out=1024), r"config\.img_processor\.image_dim_out"),
    (lambda c: c.img_processor.update(num_img_tokens=144), r"config\.img_processor\.num_img_tokens: expected 4"),
    (lambda c: c.img_processor.update(layer_idx=5), r"config\.img_processor\.layer_idx"),
    (lambda c: c.img_processor.update(vision_config=[1]), r"config\.img_processor\.vision_config: expected a dict"),
    (lambda c: c.img_processor.update(vision_config={**TINY_TOWER, "image_size": 24, "patch_size": 8}),
     r"even whole number"),
])
def test_malformed_config_is_named(change, match):
    config = _config()
    change(config)
    with pytest.raises(ValueError, match=match):
        Phi3VImageEmbedding(config)


def test_mismatched_processor_or_image_id_is_named(phi, tmp_path):
    copy = shutil.copytree(phi, tmp_path / "bad")
    processor_config = json.loads((copy / "preprocessor_config.json").read_text())
    (copy / "preprocessor_config.json").write_text(json.dumps({**processor_config, "hd_crop_size": 32}))
    with pytest.raises(ValueError, match="cuts 32-pixel crops but the vision tower takes 16"):
        Backbone.from_pretrained(copy)
    (copy / "preprocessor_config.json").write_text(json.dumps({**processor_config, "image_processor_type": "X"}))
    with pytest.raises(ValueError, match="image_processor_type: expected 'Phi3VImageProcessor'"):
        Backbone.from_pretrained(copy)
    (copy / "preprocessor_config.json").write_text(json.dumps({**processor_config, "num_crops": 0}))
    with pytest.raises(ValueError, match="num_crops must be a positive integer"):
        Backbone.from_pretrained(copy)
    shutil.copy(phi / "preprocessor_config.json", copy / "preprocessor_config.json")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "image_token_id": 5}))  # a token text can produce
    with pytest.raises(ValueError, match="config.image_token_id 5 must be an embedding row .* that text never"):
        Backbone.from_pretrained(copy)
