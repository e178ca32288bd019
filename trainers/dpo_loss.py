"""The Diffusion-DPO loss (Wallace et al. 2023) on per-image denoising errors of the policy and the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def diffusion_dpo_loss(
    model_mse_chosen: torch.Tensor,
    model_mse_rejected: torch.Tensor,
    reference_mse_chosen: torch.Tensor,
    reference_mse_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Diffusion-DPO losses [B] and implicit reward margins [B] (see `trainers.dpo.DiffusionDPOConfig` for the formulas).

    The margin is `implicit_reward_chosen - implicit_reward_rejected`, each `beta / 2 * (mse_reference - mse_policy)`;
    it is positive when the policy, relative to the reference, denoises the chosen image better than the rejected one.
    """
    scale = beta / 2
    logits = (reference_mse_chosen - reference_mse_rejected) - (model_mse_chosen - model_mse_rejected)
    margin = scale * logits
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(margin)
    elif loss_type == "hinge":
        losses = F.relu(1 - margin)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * scale)) ** 2
    else:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    return losses, margin
