"""One stochastic DDIM step that also returns the log-probability of the step it took (the DDPO policy)."""

from __future__ import annotations

import math

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or a per-sample [B] tensor over the non-batch dimensions of `like`."""
    values = values.to(device=like.device, dtype=torch.float32)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def ddim_posterior(
    scheduler: DDIMScheduler, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, eta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (float32) of the DDIM step x_t -> x_{t-1}."""
    config = scheduler.config
    timestep = torch.as_tensor(timestep, device="cpu").long()
    prev_timestep = (timestep - config.num_train_timesteps // scheduler.num_inference_steps).clamp(min=0)
    alphas_cumprod = scheduler.alphas_cumprod.to(dtype=torch.float32, device="cpu")
    alpha_t = _per_sample(alphas_cumprod[timestep], sample)
    alpha_prev = _per_sample(alphas_cumprod[prev_timestep], sample)
    beta_t = 1 - alpha_t

    x_t = sample.float()
    output = model_output.float()
    if config.prediction_type == "epsilon":
        x0_hat = (x_t - beta_t.sqrt() * output) / alpha_t.sqrt()
        eps_hat = output
    elif config.prediction_type == "sample":
        x0_hat = output
        eps_hat = (x_t - alpha_t.sqrt() * x0_hat) / beta_t.sqrt()
    elif config.prediction_type == "v_prediction":
        x0_hat = alpha_t.sqrt() * x_t - beta_t.sqrt() * output
        eps_hat = alpha_t.sqrt() * output + beta_t.sqrt() * x_t
    else:
        raise ValueError(f"scheduler.config.prediction_type: expected epsilon, sample or v_prediction, got {config.prediction_type}")

    if config.thresholding:
        # diffusers has no public dynamic thresholding (Imagen's); its schedulers' own step calls this private method
        x0_hat = scheduler._threshold_sample(x0_hat)
    elif config.clip_sample:
        x0_hat = x0_hat.clamp(-config.clip_sample_range, config.clip_sample_range)

    variance = (1 - alpha_prev) / beta_t * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    mean = alpha_prev.sqrt() * x0_hat + (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps_hat

    return mean, std


def ddim_step(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Take one DDIM step x_t -> x_{t-1} with noise, returning `(prev_sample, log_prob, mean, std)`.

    The step is the DDIM posterior of diffusers' `DDIMScheduler.step` (formulas 12 and 16 of the DDIM paper):
    a Gaussian with mean `sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - std^2) * eps_hat` and standard deviation
    `std = eta * sqrt(variance)`. All arithmetic is float32 whatever the dtype of `model_output` and `sample`,
    because the log-prob differences PPO works with are far below fp16/bf16 resolution; `prev_sample` is returned
    in `sample.dtype`.

    Args:
        scheduler: a `DDIMScheduler` on which `set_timesteps` has been called.
        model_output: the UNet's prediction (epsilon, sample or v, per `scheduler.config.prediction_type`).
        timestep: the current timestep: an int, a 0-d tensor, or a [B] tensor with one timestep per sample
            (the batched training forward mixes timesteps in one call).
        sample: x_t, shape [B, ...].
        eta: the DDIM noise weight; must be > 0, since a deterministic step has no density.
        prev_sample: if given, the step is not drawn: the log-prob of this x_{t-1} is returned (PPO's replay).
        generator: the generator(s) the noise is drawn from (one, or one per sample); never combined with
            `prev_sample`.

    Returns:
        `prev_sample` [B, ...], `log_prob` [B], and the step's `mean` and `std` (float32, what a closed-form KL
        reads). `log_prob` is the Gaussian log-density of `prev_sample` **averaged** (not summed) over all but the
        batch dimension. The mean keeps log-prob differences O(1e-4..1e-2) per step
        whatever the latent size, which is the scale TRL's / ddpo-pytorch's PPO clip range of 1e-4 assumes; a
        summed log-prob would be `log_prob * sample[0].numel()`.

    The previous timestep is `t - num_train_timesteps // num_inference_steps` as in diffusers; at the last step
    it is clamped to 0 (`alphas_cumprod[0]`, as ddpo-pytorch does) rather than `final_alpha_cumprod`, which with
    `set_alpha_to_one=True` would make that step deterministic and its log-prob undefined.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("scheduler: call scheduler.set_timesteps(num_inference_steps) before stepping")
    if not eta > 0:
        raise ValueError(f"eta: expected a value > 0 for a step with a log-prob, got {eta}")
    if prev_sample is not None and generator is not None:
        raise ValueError("prev_sample and generator: pass one or the other (a given prev_sample is not drawn)")

    mean, std = ddim_posterior(scheduler, model_output, timestep, sample, eta)

    if prev_sample is None:
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        prev_sample_f32 = mean + std * noise
    else:
        prev_sample_f32 = prev_sample.detach().float()

    log_density = -((prev_sample_f32 - mean) ** 2) / (2 * std**2) - std.log() - _LOG_SQRT_2PI
    log_prob = log_density.mean(dim=tuple(range(1, log_density.ndim)))
    return prev_sample_f32.to(sample.dtype), log_prob, mean, std


def ddim_step_with_logprob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ddim_step` without the step's mean and std: `(prev_sample, log_prob)`, the DDPO policy's step."""
    return ddim_step(scheduler, model_output, timestep, sample, eta, prev_sample, generator)[:2]


def ddim_step_kl(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    reference_output: torch.Tensor,
    timestep: int | torch.Tensor,
    sample: torch.Tensor,
    eta: float = 1.0,
) -> torch.Tensor:
    """KL(policy step || reference step) for one DDIM step from the same x_t, averaged over non-batch dims: [B].

    Both steps share the standard deviation, so the KL is exact and closed-form: |mean - mean_ref|^2 / (2 std^2),
    with the same mean-over-dimensions convention as `ddim_step_with_logprob`'s log-prob.
    """
    if not eta > 0:
        raise ValueError(f"eta: expected a value > 0 for a step with a log-prob, got {eta}")
    mean, std = ddim_posterior(scheduler, model_output, timestep, sample, eta)
    reference_mean, _ = ddim_posterior(scheduler, reference_output, timestep, sample, eta)
    kl = (mean - reference_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
