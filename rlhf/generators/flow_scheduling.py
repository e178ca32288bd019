"""Stochastic steps for flow-matching samplers (SD3/3.5, FLUX.1) that also return the log-probability of the step
they took: the policies of Flow-GRPO (its SDE and its coefficients-preserving step, CPS) and of DanceGRPO.

Each step reads the current and the next sigma of diffusers' `FlowMatchEulerDiscreteScheduler` schedule
(x_sigma = (1 - sigma) * x0 + sigma * noise, the model predicting the velocity v = noise - x0), draws
x_next ~ N(mean, std^2) or scores a given x_next, and returns `(prev_sample, log_prob, prev_sample_mean, std)`.
All arithmetic is float32 whatever the dtype of the model, because the log-prob differences PPO clips are far
below fp16/bf16 resolution. `std` is always the standard deviation of the step's Gaussian (broadcastable over
the sample), so a closed-form KL between two policies' steps is |mean - mean_ref|^2 / (2 std^2) for all three.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from rlhf.generators.scheduling import _LOG_SQRT_2PI, _per_sample

StepResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def flow_sigmas(
    scheduler: FlowMatchEulerDiscreteScheduler, timestep: float | torch.Tensor, sample: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The current and next sigma (float32, shape [B, 1, ...] on `sample`'s device) of the step at `timestep`.

    `timestep` is a value of `scheduler.timesteps` (a number, a 0-d tensor, or one per sample as a [B] tensor, since
    the batched training forward mixes timesteps), looked up by exact equality as diffusers does (the first match
    where a value repeats).
    """
    if getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler: call scheduler.set_timesteps(num_inference_steps) before stepping")
    if scheduler.config.invert_sigmas:
        raise ValueError("scheduler: invert_sigmas=True (sigmas rising towards the data) is not supported")
    batch_size = sample.shape[0]
    timesteps = torch.as_tensor(timestep).detach().cpu().reshape(-1)
    if timesteps.numel() not in (1, batch_size):
        raise ValueError(
            f"timestep: expected one timestep or one per sample ({batch_size}), got {timesteps.numel()}"
        )
    schedule = scheduler.timesteps.detach().cpu()
    matches = timesteps[:, None] == schedule[None, :]
    found = matches.any(dim=1)
    if not found.all():
        raise ValueError(
            f"timestep: {timesteps[~found].tolist()} not in scheduler.timesteps {schedule.tolist()}"
        )
    # the first match: argmax returns the first maximal element
    index = matches.int().argmax(dim=1)
    sigmas = scheduler.sigmas.detach().cpu().to(torch.float32)
    sigma = _per_sample(sigmas[index].expand(batch_size), sample)
    sigma_next = _per_sample(sigmas[index + 1].expand(batch_size), sample)
    return sigma, sigma_next


def _check_inputs(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    prev_sample: torch.Tensor | None,
    generator: torch.Generator | list[torch.Generator] | None,
) -> None:
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model_output: expected the shape of sample {tuple(sample.shape)}, got {tuple(model_output.shape)}"
        )
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(
            f"prev_sample: expected the shape of sample {tuple(sample.shape)}, got {tuple(prev_sample.shape)}"
        )
    if not noise_level >= 0:
        raise ValueError(f"noise_level: expected a value >= 0, got {noise_level}")
    if prev_sample is not None and generator is not None:
        raise ValueError("prev_sample and generator: pass one or the other (a given prev_sample is not drawn)")


def _draw_or_take(
    mean: torch.Tensor,
    std: torch.Tensor,
    sample: torch.Tensor,
    prev_sample: torch.Tensor | None,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """x_next in float32: drawn from N(mean, std^2) (differentiable through the mean), or the given one.

    A drawn sample is rounded to `sample.dtype` before it is scored, so the log-prob returned with it is the one a
    replay of the stored (rounded) sample computes: the PPO ratio of an unchanged policy is exactly 1 in bf16 too.
    The noise is drawn at noise_level 0 as well, so a generator advances the same way whichever steps are
    deterministic (an SDE window moved along the trajectory keeps the other steps' noise).
    """
    if prev_sample is not None:
        return prev_sample.detach().float()
    noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
    return (mean + std * noise).to(sample.dtype).float()


def _gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, noise_level: float, replay: bool
) -> torch.Tensor:
    """log N(x; mean, std^2) averaged over all but the batch dimension: [B].

    The mean (not the sum) is the convention of `ddim_step_with_logprob`, so one PPO clip range fits both.
    A deterministic step (noise_level 0) has probability one of the step it takes (log-prob 0) and no density
    for any other, so a replay of it cannot be scored.
    """
    if noise_level == 0:
        if replay:
            raise ValueError("noise_level: a deterministic step (noise_level=0) has no density to score prev_sample")
        return torch.zeros(x.shape[0], device=x.device)
    log_density = -((x - mean) ** 2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI
    return log_density.mean(dim=tuple(range(1, log_density.ndim)))


def flow_sde_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepResult:
    """One Euler-Maruyama step of Flow-GRPO's reverse SDE (arXiv 2505.05470), with its log-prob.

    With dt = sigma_next - sigma < 0 and the diffusion coefficient
    `s = noise_level * sqrt(sigma / (1 - sigma))` (at sigma = 1, where it is infinite, `1 - sigma` is replaced by
    `1 - scheduler.sigmas[1]` as the reference does), the step is Gaussian with

        mean = sample * (1 + s^2 / (2 sigma) * dt) + v * (1 + s^2 (1 - sigma) / (2 sigma)) * dt
        std  = s * sqrt(-dt)

    `noise_level = 0` is diffusers' Euler ODE step (`scheduler.step`).

    Args:
        scheduler: a `FlowMatchEulerDiscreteScheduler` on which `set_timesteps` has been called.
        model_output: the transformer's velocity prediction (after guidance), shape of `sample`.
        timestep: a value of `scheduler.timesteps`: a number, a 0-d tensor, or a [B] tensor, one per sample.
        sample: x at `timestep`, shape [B, ...] (packed FLUX latents [B, tokens, channels] work too).
        noise_level: the SDE's noise scale (`noise_level` of Flow-GRPO, 0.7 in its configs); >= 0.
        prev_sample: if given, the step is not drawn: the log-prob of this x_next is returned (PPO's replay).
        generator: the generator(s) the noise is drawn from; never combined with `prev_sample`.

    Returns:
        `prev_sample` in `sample.dtype`, `log_prob` [B] (the Gaussian log-density averaged over all but the batch
        dimension, 0 for a drawn step at noise_level 0), `prev_sample_mean` (float32) and `std` (float32,
        [B, 1, ...]; the reference returns `s` instead, without the `sqrt(-dt)`).
    """
    _check_inputs(model_output, sample, noise_level, prev_sample, generator)
    sigma, sigma_next = flow_sigmas(scheduler, timestep, sample)
    dt = sigma_next - sigma
    x, v = sample.float(), model_output.float()

    second_sigma = float(scheduler.sigmas[1])
    diffusion = noise_level * (sigma / (1 - torch.where(sigma == 1, second_sigma, sigma))).sqrt()
    mean = x * (1 + diffusion**2 / (2 * sigma) * dt) + v * (1 + diffusion**2 * (1 - sigma) / (2 * sigma)) * dt
    std = diffusion * (-dt).sqrt()

    x_next = _draw_or_take(mean, std, sample, prev_sample, generator)
    log_prob = _gaussian_log_prob(x_next.detach(), mean, std, noise_level, replay=prev_sample is not None)
    return x_next.to(sample.dtype), log_prob, mean, std


def dance_sde_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.3,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepResult:
    """One step of DanceGRPO's reverse SDE with a constant diffusion coefficient (arXiv 2505.07818), with its log-prob.

    With `noise_level` = DanceGRPO's `eta` (0.3 in its FLUX scripts), dt = sigma_next - sigma < 0, the predicted
    data x0 = sample - sigma * v and the score estimate `score = -(sample - (1 - sigma) * x0) / sigma^2`, the step
    is Gaussian with

        mean = sample + dt * v - 0.5 * eta^2 * score * dt
        std  = eta * sqrt(-dt)

    `noise_level = 0` is diffusers' Euler ODE step. Arguments and returns as `flow_sde_step_with_logprob`.
    """
    _check_inputs(model_output, sample, noise_level, prev_sample, generator)
    sigma, sigma_next = flow_sigmas(scheduler, timestep, sample)
    dt = sigma_next - sigma
    x, v = sample.float(), model_output.float()

    predicted_x0 = x - sigma * v
    score = -(x - (1 - sigma) * predicted_x0) / sigma**2
    mean = x + dt * v - 0.5 * noise_level**2 * score * dt
    std = noise_level * (-dt).sqrt()

    x_next = _draw_or_take(mean, std, sample, prev_sample, generator)
    log_prob = _gaussian_log_prob(x_next.detach(), mean, std, noise_level, replay=prev_sample is not None)
    return x_next.to(sample.dtype), log_prob, mean, std


def cps_step_with_logprob(
    scheduler: FlowMatchEulerDiscreteScheduler,
    model_output: torch.Tensor,
    timestep: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepResult:
    """One coefficients-preserving sampling step (CPS, arXiv 2509.05952), with the log-prob its authors train on.

    CPS is DDIM on the flow path: with the predicted data x0 = sample - sigma * v and noise
    x1 = sample + (1 - sigma) * v, it re-mixes them at sigma_next so that the coefficients of data and noise
    in x_next stay (1 - sigma_next) and sigma_next:

        std  = sigma_next * sin(noise_level * pi / 2)
        mean = (1 - sigma_next) * x0 + sqrt(sigma_next^2 - std^2) * x1

    `noise_level` is in [0, 1]: 0 is diffusers' Euler ODE step, 1 re-draws all the noise. The last step
    (sigma_next = 0) is deterministic whatever the noise level.

    The log-prob is the reference's (Flow-GRPO's `sde_type="cps"` branch, FlowCPS): `-(prev_sample - mean)^2`
    averaged over all but the batch dimension, i.e. the Gaussian log-density with its constants and its
    1 / (2 std^2) dropped. It is not a normalised density: a PPO ratio built from it is
    exp(-(|x - mean_new|^2 - |x - mean_old|^2) / D), finite at every step including the deterministic last one
    (where std = 0) and not inflated at low-noise steps. It is defined for a replay at noise_level 0 too.
    Arguments and the other returns as `flow_sde_step_with_logprob`.
    """
    _check_inputs(model_output, sample, noise_level, prev_sample, generator)
    if noise_level > 1:
        raise ValueError(f"noise_level: expected a value in [0, 1] for the CPS step, got {noise_level}")
    sigma, sigma_next = flow_sigmas(scheduler, timestep, sample)
    x, v = sample.float(), model_output.float()

    std = sigma_next * math.sin(noise_level * math.pi / 2)
    predicted_x0 = x - sigma * v
    predicted_x1 = x + (1 - sigma) * v
    mean = (1 - sigma_next) * predicted_x0 + (sigma_next**2 - std**2).sqrt() * predicted_x1

    x_next = _draw_or_take(mean, std, sample, prev_sample, generator)
    squared_error = (x_next.detach() - mean) ** 2
    log_prob = -squared_error.mean(dim=tuple(range(1, squared_error.ndim)))
    return x_next.to(sample.dtype), log_prob, mean, std
