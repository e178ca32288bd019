"""The arithmetic of GRPO on diffusion trajectories: group-normalised advantages (optionally with one global std),
the clipped per-step policy loss and the statistics logged with it (DDPO's too), the closed-form KL of two Gaussian
steps."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from rlhf.rewards.stats import EPS, group_advantages


def grpo_advantages(
    rewards: torch.Tensor | Sequence[float],
    group_ids: Sequence[Hashable],
    global_std: bool = False,
    eps: float = EPS,
) -> torch.Tensor:
    """(r - mean of r's group) / (std + eps), float32 [N], in float64 arithmetic.

    `std` is the group's own population std, or with `global_std` the population std of all N rewards (Flow-GRPO's
    `global_std`: a group whose K images score alike is not blown up to unit variance).
    """
    values = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    if not global_std:
        return group_advantages(values, list(group_ids), eps)
    ids = list(group_ids)
    if len(ids) != len(values):
        raise ValueError(f"group_ids: expected one id per reward ({len(values)}), got {len(ids)}")
    first = {group: number for number, group in enumerate(dict.fromkeys(ids))}
    index = torch.tensor([first[group] for group in ids])
    sums = torch.zeros(len(first), dtype=torch.float64).index_add_(0, index, values)
    means = (sums / torch.bincount(index, minlength=len(first)))[index]
    return ((values - means) / (values.std(unbiased=False) + eps)).float()


def gaussian_step_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussian steps of one std: |mean - mean_ref|^2 / (2 std^2), averaged over all but the batch
    dimension as the step log-probs are (so `kl_coef` weighs it against per-step ratios of the same scale): [N]."""
    kl = (mean.float() - reference_mean.float()) ** 2 / (2 * std.float() ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def clipped_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per (sample, step) pair: max(-A r, -A clip(r, 1 - eps, 1 + eps)) with the
    per-step ratio r = exp(log_prob - old_log_prob) and A clipped to +-adv_clip_max. Shapes broadcast
    (advantages [N, 1] against log-probs [N, J]). Returns (per-pair loss, ratio)."""
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_probs - old_log_probs)
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(-advantages * ratio, -advantages * clipped), ratio


def ratio_statistics(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, ratio: torch.Tensor, clip_range: float, weight: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Detached sums over weighted pairs (approx-KL as 0.5 (log r)^2, clip fraction, ratio) and min/max ratio."""
    with torch.no_grad():
        kept = weight > 0
        return {
            "approx_kl": (0.5 * (log_probs - old_log_probs) ** 2 * weight).sum(),
            "clipfrac": (((ratio - 1).abs() > clip_range).float() * weight).sum(),
            "ratio": (ratio * weight).sum(),
            "ratio_min": ratio[kept].min() if kept.any() else ratio.new_tensor(float("inf")),
            "ratio_max": ratio[kept].max() if kept.any() else ratio.new_tensor(float("-inf")),
        }
