"""Shared fixtures: tiny VLMs built once per test session."""

from __future__ import annotations

import pytest
import torch

from reward.testing import build_tiny_vlm

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_vlm_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {family: build_tiny_vlm(root / family, family) for family in ("llava", "qwen2_vl")}


@pytest.fixture(params=["llava", "qwen2_vl"])
def tiny_vlm(request, tiny_vlm_paths):
    return tiny_vlm_paths[request.param]


def perturb_adapters(model, seed: int = 1) -> None:
    """Fresh LoRA B matrices are zero, so every perspective would read the same state: make them differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
