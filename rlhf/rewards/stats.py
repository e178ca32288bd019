"""Reward statistics that turn rewards into advantages: per-prompt tracking, prompt groups, whole batches."""

from __future__ import annotations

from collections import deque
from typing import Any, Hashable, Sequence

import numpy as np
import torch

EPS = 1e-6


def _as_float_tensor(rewards: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor:
    # float64 keeps normalisation exact for rewards that differ by ~1e-3 (fp16/bf16 would round them away)
    tensor = torch.as_tensor(np.asarray(rewards.detach().cpu() if isinstance(rewards, torch.Tensor) else rewards))
    if tensor.ndim != 1:
        raise ValueError(f"rewards: expected a 1-D sequence of numbers, got shape {tuple(tensor.shape)}")
    return tensor.to(torch.float64)


def batch_advantages(rewards: torch.Tensor | np.ndarray | Sequence[float], eps: float = EPS) -> torch.Tensor:
    """(r - mean) / (std + eps) over the whole batch (population std), as float32 [N]."""
    values = _as_float_tensor(rewards)
    return ((values - values.mean()) / (values.std(unbiased=False) + eps)).float()


def group_advantages(
    rewards: torch.Tensor | np.ndarray | Sequence[float], group_ids: Sequence[Hashable] | torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """GRPO-style advantages: each reward normalised by the mean and population std of its own group, float32 [N].

    A group of one sample gets advantage 0 (nothing to compare it with).
    """
    values = _as_float_tensor(rewards)
    ids = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    if len(ids) != len(values):
        raise ValueError(f"group_ids: expected one id per reward ({len(values)}), got {len(ids)}")
    advantages = torch.zeros_like(values)
    for group in dict.fromkeys(ids):
        members = torch.tensor([i for i, g in enumerate(ids) if g == group])
        group_values = values[members]
        advantages[members] = (group_values - group_values.mean()) / (group_values.std(unbiased=False) + eps)
    return advantages.float()


class PerPromptStatTracker:
    """Normalises each prompt's rewards by that prompt's own recent history (ddpo-pytorch's tracker).

    Args:
        buffer_size: how many recent rewards are kept per prompt.
        min_count: until a prompt has this many rewards in its buffer, its rewards are normalised by the
            statistics of the whole batch passed to `update` instead.
    """

    def __init__(self, buffer_size: int, min_count: int) -> None:
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count: expected positive integers, got {buffer_size}, {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor | np.ndarray | Sequence[float]) -> torch.Tensor:
        """Add `rewards` to their prompts' buffers and return their advantages, float32 [N]."""
        values = _as_float_tensor(rewards)
        prompts = list(prompts)
        if len(prompts) != len(values):
            raise ValueError(f"prompts: expected one prompt per reward ({len(values)}), got {len(prompts)}")
        batch_mean, batch_std = values.mean(), values.std(unbiased=False)
        advantages = torch.zeros_like(values)
        for prompt in dict.fromkeys(prompts):
            members = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[members].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                history = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = history.mean(), history.std(unbiased=False)
            advantages[members] = (values[members] - mean) / (std + EPS)
        return advantages.float()

    def get_stats(self) -> dict[str, dict[str, float]]:
        """Per prompt: mean, std and count of its buffer."""
        return {
            prompt: {"mean": float(np.mean(buffer)), "std": float(np.std(buffer)), "count": len(buffer)}
            for prompt, buffer in self.buffers.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buffer) for prompt, buffer in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.buffers = {prompt: deque(values, maxlen=self.buffer_size) for prompt, values in state["buffers"].items()}
