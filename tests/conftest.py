"""Shared fixtures: tiny VLMs built once per test session; a tiny random Stable Diffusion pipeline per module,
and the trainer tests' single-threaded, accelerator-resetting isolation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from reward.testing import build_tiny_vlm
from rlhf.testing import build_tiny_sd

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_vlm_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {family: build_tiny_vlm(root / family, family) for family in ("llava", "qwen2_vl", "llava_next", "phi3_v")}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture()
def isolated_accelerator():
    """For trainer tests (`pytestmark = pytest.mark.usefixtures("isolated_accelerator")`): one thread (the tiny
    models are latency-bound; extra threads only contend on a shared CPU) and a fresh accelerate state after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reset_accelerator_state()


def reset_accelerator_state() -> None:
    """Forget accelerate's process-wide state, so the next `Accelerator` in this process starts fresh (another
    mixed precision, another project directory). accelerate has no public way: its own test cases call this."""
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(params=["llava", "qwen2_vl", "llava_next", "phi3_v"])
def tiny_vlm(request, tiny_vlm_paths):
    return tiny_vlm_paths[request.param]


def perturb_adapters(model, seed: int = 1) -> None:
    """Fresh LoRA B matrices are zero, so every perspective would read the same state: make them differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def assert_resumed_run_matches(resumed_pipeline, expected: dict, uninterrupted_dir: Path, resumed_dir: Path) -> None:
    """A run resumed after a crash in its second epoch ends bit for bit where the uninterrupted run did: the same
    trained LoRA, both epochs in its history, the same metrics.json."""
    for name, value in resumed_pipeline.policy_state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert any(value.abs().max() > 0 for name, value in expected.items() if "lora_B" in name)  # it trained
    history = [json.loads(line) for line in (resumed_dir / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [0, 1]
    metrics = [json.loads((run / "metrics.json").read_text()) for run in (uninterrupted_dir, resumed_dir)]
    assert metrics[0] == metrics[1]
