"""The one denoising loop of the RL trainers over any `GeneratorAdapter`: sample a batch recording the latents and
the log-probs of a window of stochastic steps, and replay recorded steps under the current policy in one batched
denoiser call (new log-prob, step mean and std: what PPO's ratio and the closed-form KL read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf.generators.base import GeneratorAdapter


@dataclass
class Trajectories:
    """One sampled batch.

    Attributes:
        latents: [B, S + 1, ...] float32, the initial noise then the latents after each of the S steps.
        log_probs: [B, S] float32, each step's log-prob (0 on deterministic steps, which are never trained).
        timesteps: [S] the schedule sampled with (the values `predict`/`step` were called with).
        stochastic: [S] bool, which steps drew with `noise_level` (the SDE window); the rest were the ODE step.
        conditioning: the adapter's per-sample conditioning (batch-first tensors), guidance halves included.
        images: [B, 3, H, W] float32 in [0, 1].
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    timesteps: torch.Tensor
    stochastic: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    images: torch.Tensor

    @property
    def window(self) -> torch.Tensor:
        """The indices of the stochastic steps: the ones a trainer replays."""
        return self.stochastic.nonzero().squeeze(1)


def sde_window(num_steps: int, size: int, start_range: Sequence[int] | None, generator: torch.Generator) -> torch.Tensor:
    """A [num_steps] bool mask of the stochastic steps: `size` consecutive steps starting at an index drawn uniformly
    from `start_range` = (first, last) inclusive (MixGRPO / Flow-GRPO-Fast); `size` 0 makes every step stochastic.

    The start is drawn from `generator` even when it has one possible value, so that how far the generator
    advances does not depend on the range.
    """
    if size < 0 or size > num_steps:
        raise ValueError(f"sde_window_size: expected a value in [0, {num_steps}] (the sampling steps), got {size}")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if size == 0:
        return mask.fill_(True)
    first, last = (0, num_steps - size) if not start_range else (int(start_range[0]), int(start_range[1]))
    if not 0 <= first <= last <= num_steps - size:
        raise ValueError(f"sde_window_range: expected 0 <= first <= last <= num_steps - sde_window_size = "
                         f"{num_steps - size}, got {list(start_range or [])}")
    start = first + int(torch.randint(last - first + 1, (1,), generator=generator))
    mask[start : start + size] = True
    return mask


@torch.no_grad()
def sample_trajectories(
    adapter: GeneratorAdapter,
    prompts: list[str] | None,
    *,
    num_steps: int,
    guidance_scale: float,
    noise_level: float,
    height: int,
    width: int,
    generator: torch.Generator | list[torch.Generator] | None,
    stochastic: torch.Tensor | None = None,
    negative_prompts: list[str] | None = None,
    conditioning: dict[str, torch.Tensor] | None = None,
    initial_latents: torch.Tensor | None = None,
) -> Trajectories:
    """Sample `len(prompts)` images with `num_steps` steps, the steps of `stochastic` (default all) drawn with
    `noise_level` and the others with the deterministic step (noise_level 0). Guidance applies when
    `guidance_scale > 1` (classifier-free); a guidance-distilled family reads the scale itself. Every draw comes
    from `generator` (one, or one per image). A precomputed `conditioning` skips the text encoders; given
    `initial_latents` (float32, scaled) replace the first draw. `prompts` may be None when both are given."""
    guided = guidance_scale > 1.0
    if prompts is None and (conditioning is None or initial_latents is None):
        raise ValueError("prompts: needed unless both conditioning and initial_latents are given")
    if conditioning is None:
        conditioning = adapter.encode_prompt(prompts, negative_prompts, guidance=guided, height=height, width=width)
    timesteps = adapter.set_timesteps(num_steps, height, width)
    if stochastic is None:
        stochastic = torch.ones(len(timesteps), dtype=torch.bool)
    if len(stochastic) != len(timesteps):
        raise ValueError(f"stochastic: expected one flag per step ({len(timesteps)}), got {len(stochastic)}")
    if initial_latents is None:
        initial_latents = adapter.initial_latents(len(prompts), height, width, generator)
    latents = initial_latents.float()
    all_latents, log_probs = [latents], []
    # inference mode skips autograd's per-op bookkeeping (~10% of a tiny-pipeline sampling call); its tensors
    # cannot enter a graph, so what a trainer keeps (the stacks, the images) is made from them outside it
    with torch.inference_mode():
        for index, timestep in enumerate(timesteps):
            prediction = adapter.predict(latents, timestep, conditioning, guidance_scale)
            level = noise_level if bool(stochastic[index]) else 0.0
            latents, log_prob, _, _ = adapter.step(prediction, timestep, latents, noise_level=level, generator=generator)
            latents = latents.float()
            all_latents.append(latents)
            log_probs.append(log_prob.float() if level > 0 else torch.zeros_like(log_prob, dtype=torch.float32))
        images = adapter.decode(latents)
    return Trajectories(
        latents=torch.stack(all_latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        timesteps=timesteps.detach().clone(),
        stochastic=stochastic.clone(),
        conditioning=conditioning,
        images=images.clone(),
    )


def replay_steps(
    adapter: GeneratorAdapter,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: dict[str, torch.Tensor],
    *,
    guidance_scale: float,
    noise_level: float,
    denoiser: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score recorded steps under the current policy: N (latents, next_latents, timestep) triples, each with its
    own conditioning row, in ONE denoiser call (not one per timestep). Returns (log_prob [N], mean, std) of the
    steps' Gaussians, differentiable when grad is enabled. The adapter's scheduler must hold the schedule the
    steps were sampled with (`set_timesteps` with the same count and size)."""
    prediction = adapter.predict(latents, timesteps, conditioning, guidance_scale, denoiser=denoiser)
    _, log_prob, mean, std = adapter.step(
        prediction, timesteps, latents, noise_level=noise_level, prev_sample=next_latents
    )
    return log_prob, mean, std
