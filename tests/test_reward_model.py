"""RewardModel on tiny LLaVA and Qwen2-VL: mixed perspectives, padding, gradients, input paths, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reward import PerspectiveConfig, RewardModel
from tests.conftest import perturb_adapters

PROMPTS = ["a red circle", "a big blue square on a white background with a small yellow mark", "cat"]


@pytest.fixture
def model(tiny_vlm):
    model = RewardModel.from_backbone(
        tiny_vlm,
        ["alignment", PerspectiveConfig("fidelity", lora_r=4, train_projector=True), "safety"],
        lora_r=4,
    )
    perturb_adapters(model)
    with torch.no_grad():  # a projector copy equal to the shared one would hide a wrong routing
        for param in model.projectors["fidelity"].parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def quantised_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=generator).float() / 255


def test_mixed_perspectives_equal_each_alone(model):
    images = quantised_images(3)
    mixed = model.score(images, PROMPTS)
    assert set(mixed) == {"alignment", "fidelity", "safety"}
    assert not torch.allclose(mixed["alignment"], mixed["safety"])  # the adapters really differ
    for name in model.perspectives:
        alone = model.score(images, PROMPTS, perspectives=[name])[name]
        torch.testing.assert_close(mixed[name], alone, atol=1e-5, rtol=0)
        model.eval()
        with torch.no_grad():  # the training path (set_adapter, no mixed batch) reads the same scores
            trained_path = model(images, PROMPTS, name)
        torch.testing.assert_close(mixed[name], trained_path, atol=1e-5, rtol=0)


def test_score_does_not_depend_on_batch_mates(model):
    images = quantised_images(3)
    batch = model.score(images, PROMPTS)
    for i in range(3):
        alone = model.score(images[i: i + 1], PROMPTS[i: i + 1])
        for name in model.perspectives:
            torch.testing.assert_close(alone[name], batch[name][i: i + 1], atol=1e-5, rtol=0)


def test_small_max_batch_size_gives_same_scores(model):
    images = quantised_images(3)
    full = model.score(images, PROMPTS)
    model.max_batch_size = 1
    chunked = model.score(images, PROMPTS)
    for name in full:
        torch.testing.assert_close(full[name], chunked[name], atol=1e-5, rtol=0)


def test_scores_are_differentiable_wrt_pixels(model):
    pixels = quantised_images(2).requires_grad_(True)
    scores = model.score(pixels, PROMPTS[:2])
    assert all(s.requires_grad for s in scores.values())
    sum(s.sum() for s in scores.values()).backward()
    assert torch.isfinite(pixels.grad).all()
    assert pixels.grad.abs().sum() > 0


def test_processor_path_and_torch_path_agree_at_native_size(model):
    images = quantised_images(2)
    as_pil = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in images]
    tensor_scores = model.score(images, PROMPTS[:2])
    pil_scores = model.score(as_pil, PROMPTS[:2])
    for name in tensor_scores:
        torch.testing.assert_close(tensor_scores[name], pil_scores[name], atol=1e-4, rtol=0)


def test_save_then_load_gives_identical_scores(model, tmp_path):
    images = quantised_images(3)
    before = model.score(images, PROMPTS)
    model.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.perspectives == model.perspectives
    after = loaded.score(images, PROMPTS)
    for name in before:
        torch.testing.assert_close(before[name], after[name], atol=0, rtol=0)
    only_safety = RewardModel.from_pretrained(tmp_path / "rm", perspectives=["safety"])
    torch.testing.assert_close(only_safety.score(images, PROMPTS)["safety"], before["safety"], atol=0, rtol=0)


def test_accepts_paths_pil_arrays_grayscale_and_rgba(model, tmp_path):
    rgb = (quantised_images(1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    from_path = model.score([path], PROMPTS[:1])
    from_array = model.score(rgb[None], PROMPTS[:1])
    for name in from_path:
        torch.testing.assert_close(from_path[name], from_array[name], atol=0, rtol=0)
    gray = Image.fromarray(rgb[..., 0])
    rgba = Image.fromarray(np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1))
    scores = model.score([gray, rgba, torch.rand(4, 32, 32)], ["a", "b", "c"])
    assert all(s.shape == (3,) and torch.isfinite(s).all() for s in scores.values())
    rgba_scores = model.score([rgba], ["a"])
    torch.testing.assert_close(rgba_scores["alignment"], model.score([rgb], ["a"])["alignment"], atol=0, rtol=0)


def test_over_long_prompt_is_truncated_with_a_warning(model):
    model.backbone.max_prompt_tokens = 8
    with pytest.warns(UserWarning, match="truncated"):
        scores = model.score(quantised_images(1), ["red " * 50])
    assert torch.isfinite(scores["alignment"]).all()


@pytest.mark.parametrize(
    "images, prompts, error, match",
    [
        (lambda p: [p / "missing.png"], ["a"], ValueError, r"images\[0\]: no such image file"),
        (lambda p: [p / "corrupt.png"], ["a"], ValueError, r"images\[0\]: cannot read image file"),
        (lambda p: torch.rand(1, 1, 1, 3, 32, 32), ["a"], ValueError, "BCHW"),
        (lambda p: torch.rand(1, 2, 32, 32), ["a"], ValueError, "channels"),
        (lambda p: torch.rand(1, 3, 32, 32) * 2, ["a"], ValueError, r"\[0, 1\]"),
        (lambda p: torch.full((1, 3, 32, 32), float("nan")), ["a"], ValueError, "NaN"),
        (lambda p: torch.rand(2, 3, 32, 32), ["a"], ValueError, "2 images"),
        (lambda p: torch.rand(1, 3, 32, 32), [3], TypeError, r"prompts\[0\]: expected str"),
        (lambda p: torch.rand(1, 3, 32, 32), "a", TypeError, "single string"),
        (lambda p: torch.rand(0, 3, 32, 32), [], ValueError, "empty"),
        (lambda p: [], [], ValueError, "empty"),
        (lambda p: [np.zeros((32, 32, 3), np.float64)], ["a"], ValueError, "uint8"),
        (lambda p: [object()], ["a"], TypeError, r"images\[0\]: expected a path"),
    ],
)
def test_bad_inputs_get_clear_errors(model, tmp_path, images, prompts, error, match):
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    with pytest.raises(error, match=match):
        model.score(images(tmp_path), prompts)


def test_unknown_perspective_and_bad_options_are_errors(tiny_vlm_paths, model):
    with pytest.raises(ValueError, match=r"perspectives: unknown \['style'\]"):
        model.score(quantised_images(1), ["a"], perspectives=["style"])
    with pytest.raises(ValueError, match="dtype"):
        RewardModel.from_backbone(tiny_vlm_paths["llava"], ["a1"], dtype="float64")
    with pytest.raises(ValueError, match="skipca_heads"):
        RewardModel.from_backbone(tiny_vlm_paths["llava"], ["a1"], skipca_heads=3)


def test_unsupported_family_is_named(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=10).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        RewardModel.from_backbone(tmp_path, ["a"])
