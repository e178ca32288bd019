"""LLaVA-NeXT backbone on the tiny model: the visual tokens we place are the ones LlavaNextForConditionalGeneration
and its processor place, for several aspect ratios; newline rows; projector copies; the torch pixel path's tiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextProcessor

from reward.backbones import Backbone, LlavaNextBackbone
from reward.inputs import pil_to_tensor

# (height, width): square (padded to a 1x2 grid), wide and tall (no unpadding), a 2x2 grid with padded rows cut
# away, an exact pinpoint and a large square
SIZES = [(32, 32), (24, 56), (56, 24), (40, 64), (32, 64), (64, 64)]
BASE_TOKENS = 16  # (32 / 8) ** 2 patches of the base view, CLS dropped


@pytest.fixture(scope="module")
def backbone(tiny_vlm_paths) -> LlavaNextBackbone:
    backbone = Backbone.from_pretrained(tiny_vlm_paths["llava_next"])
    assert isinstance(backbone, LlavaNextBackbone)
    return backbone


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", SIZES)
def test_our_sequence_is_the_one_the_model_and_its_processor_build(backbone, tiny_vlm_paths, size):
    image = random_image(*size)
    pixels = backbone.pixel_inputs([image])
    _, features = backbone.encode_images(pixels)
    text = backbone.text_inputs(["a red circle"], [len(features[0])])

    processor = LlavaNextProcessor.from_pretrained(tiny_vlm_paths["llava_next"])
    expected = processor(text=[backbone.render_prompt("a red circle")], images=[image], return_tensors="pt")
    # the same ids as the processor's expansion, then our reward token
    assert text.input_ids[0, :-1].tolist() == expected["input_ids"][0].tolist()
    assert text.input_ids[0, -1] == backbone.reward_token_id

    with torch.no_grad():
        own = backbone.model(input_ids=text.input_ids, attention_mask=text.attention_mask,
                             pixel_values=expected["pixel_values"], image_sizes=expected["image_sizes"],
                             output_hidden_states=True).hidden_states[-1]
        embeds = backbone.model.get_input_embeddings()(text.input_ids)
        slots = (text.input_ids == backbone.image_token_id).unsqueeze(-1).expand_as(embeds)
        ours = backbone.model(inputs_embeds=embeds.masked_scatter(slots, features[0]),
                              attention_mask=text.attention_mask, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(ours, own, atol=1e-6, rtol=0)


@pytest.mark.parametrize("size, grid", [((32, 32), (4, 4)), ((40, 64), (6, 8)), ((24, 56), (4, 8))])
def test_each_feature_row_ends_with_the_newline_embedding(backbone, size, grid):
    rows, columns = grid  # the tiles' feature grid after unpadding
    _, features = backbone.encode_images(backbone.pixel_inputs([random_image(*size)]))
    feature = features[0]
    assert len(feature) == BASE_TOKENS + rows * (columns + 1)
    newline = backbone.model.model.image_newline
    is_newline = (feature == newline).all(dim=-1)
    expected = [BASE_TOKENS + row * (columns + 1) + columns for row in range(rows)]
    assert torch.nonzero(is_newline).flatten().tolist() == expected


def test_projector_copy_reproduces_features_for_mixed_aspect_ratios(backbone):
    pixels = backbone.pixel_inputs([random_image(*size, seed=i) for i, size in enumerate(SIZES)])
    projector_input, features = backbone.encode_images(pixels)
    again = backbone.project(backbone.projector(), projector_input, pixels)
    assert [len(f) for f in again] == [len(f) for f in features]
    for mine, theirs in zip(again, features):
        torch.testing.assert_close(mine, theirs, atol=0, rtol=0)


@pytest.mark.parametrize("size", SIZES)
def test_torch_path_tiles_like_the_processor(backbone, size):
    rng = np.random.default_rng(0)  # smooth, so that resampling differences stay small where a view is resized
    image = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize(size[::-1], Image.BILINEAR)
    expected = backbone.pixel_inputs([image])
    got = backbone.pixel_inputs_differentiable(pil_to_tensor([image]))
    assert got.pixel_values.shape == expected.pixel_values.shape
    assert got.image_sizes.tolist() == expected.image_sizes.tolist() == [list(size)]
    # a view taken without resizing (padding and tiling only) is exact; a resized one differs by PIL's uint8
    # rounding and bicubic kernel (about one grey level, 0.015 in normalised units)
    tiles_resized = size in [(24, 56), (56, 24)]
    torch.testing.assert_close(got.pixel_values[:, 1:], expected.pixel_values[:, 1:],
                               atol=0.03 if tiles_resized else 1e-6, rtol=0)
    torch.testing.assert_close(got.pixel_values[:, :1], expected.pixel_values[:, :1],
                               atol=1e-6 if size == (32, 32) else 0.03, rtol=0)
