"""The flow-matching steps with log-prob against their published formulas (recomputed here in float64), diffusers'
own Euler step and StableDiffusion3Pipeline's sampling loop, and the PPO replay they exist for."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor
from torch.distributions import Normal

from rlhf.generators.flow_scheduling import cps_step_with_logprob, dance_sde_step_with_logprob, flow_sde_step_with_logprob
from rlhf.testing import build_tiny_sd3

STEPS = 8
SHAPE = (3, 4, 6, 6)
STEP_FUNCTIONS = [flow_sde_step_with_logprob, dance_sde_step_with_logprob, cps_step_with_logprob]


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """SD3's scheduler (shift 3): its first sigma is exactly 1 and its last step ends at sigma 0."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(STEPS)
    assert scheduler.sigmas[0] == 1 and scheduler.sigmas[-1] == 0
    return scheduler


def random_tensors(seed: int, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=generator) for _ in range(3))  # type: ignore[return-value]


def published(
    name: str, scheduler: FlowMatchEulerDiscreteScheduler, v: torch.Tensor, index: int, x: torch.Tensor, level: float
) -> tuple[torch.Tensor, float]:
    """(mean, std) of each step in float64, written from the references (see rlhf/generators/flow_scheduling.py)."""
    sigma, sigma_next = float(scheduler.sigmas[index]), float(scheduler.sigmas[index + 1])
    x, v = x.double(), v.double()
    dt = sigma_next - sigma
    if name == "flow_sde_step_with_logprob":
        # flow_grpo sd3_sde_with_logprob.py: sigma == 1 divides by 1 - sigmas[1] instead of 0
        denominator = 1 - (float(scheduler.sigmas[1]) if sigma == 1 else sigma)
        s = level * math.sqrt(sigma / denominator)
        mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        return mean, s * math.sqrt(-dt)
    if name == "dance_sde_step_with_logprob":
        x0 = x - sigma * v
        score = -(x - x0 * (1 - sigma)) / sigma**2
        return x + dt * v + (-0.5 * level**2 * score) * dt, level * math.sqrt(-dt)
    std = sigma_next * math.sin(level * math.pi / 2)
    x0, x1 = x - sigma * v, x + v * (1 - sigma)
    return x0 * (1 - sigma_next) + x1 * math.sqrt(sigma_next**2 - std**2), std


def published_log_prob(name: str, prev: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    dims = tuple(range(1, prev.ndim))
    if name == "cps_step_with_logprob":
        return -((prev.double() - mean) ** 2).mean(dim=dims)
    return Normal(mean, std).log_prob(prev.double()).mean(dim=dims)


@pytest.mark.parametrize("step", STEP_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("level", [0.3, 0.7, 1.0])
def test_every_step_matches_its_published_formula(step: Callable, level: float) -> None:
    scheduler = make_scheduler()
    name = step.__name__
    sample, output, other = random_tensors(0)
    for index, t in enumerate(scheduler.timesteps):
        expected_mean, expected_std = published(name, scheduler, output, index, sample, level)
        noise_seed = 100 + index
        prev, log_prob, mean, std = step(
            scheduler, output, t, sample, noise_level=level, generator=torch.Generator().manual_seed(noise_seed)
        )
        assert log_prob.shape == (SHAPE[0],) and log_prob.dtype == torch.float32
        assert mean.dtype == std.dtype == torch.float32 and std.shape == (SHAPE[0], 1, 1, 1)
        torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
        expected_std_tensor = torch.full(std.shape, expected_std, dtype=torch.float64)
        torch.testing.assert_close(std.double(), expected_std_tensor, rtol=1e-5, atol=1e-7)
        # the drawn sample is mean + std * noise, the noise from the generator ...
        noise = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(noise_seed))
        torch.testing.assert_close(prev.double(), expected_mean + expected_std * noise.double(), rtol=1e-5, atol=1e-5)
        if expected_std == 0:  # CPS's last step is deterministic; its squared-error log-prob is 0 there
            assert name == "cps_step_with_logprob" and torch.equal(log_prob, torch.zeros(SHAPE[0]))
            continue
        # ... and carries the log-prob the formula gives it, as does any other sample (PPO's replay)
        expected = published_log_prob(name, prev, expected_mean, expected_std)
        torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-5)
        _, replay, _, _ = step(scheduler, output, t, sample, noise_level=level, prev_sample=other)
        expected_replay = published_log_prob(name, other, expected_mean, expected_std)
        torch.testing.assert_close(replay.double(), expected_replay, rtol=1e-5, atol=1e-4)


def test_first_step_at_sigma_one_is_finite_as_in_the_reference() -> None:
    scheduler = make_scheduler()
    sample, output, _ = random_tensors(1)
    first = scheduler.timesteps[0]
    prev, log_prob, mean, std = flow_sde_step_with_logprob(
        scheduler, output, first, sample, generator=torch.Generator()
    )
    for value in (prev, log_prob, mean, std):
        assert torch.isfinite(value).all()
    # the reference's substitute: 1 - sigma becomes 1 - sigmas[1], so s = 0.7 * sqrt(1 / (1 - sigmas[1]))
    dt = float(scheduler.sigmas[1] - scheduler.sigmas[0])
    expected = 0.7 * math.sqrt(1 / (1 - float(scheduler.sigmas[1]))) * math.sqrt(-dt)
    torch.testing.assert_close(std.flatten(), torch.full((SHAPE[0],), expected), rtol=1e-6, atol=0)


@pytest.mark.parametrize("step", STEP_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replaying_a_drawn_step_gives_ratio_exactly_one(step: Callable, dtype: torch.dtype) -> None:
    scheduler = make_scheduler()
    sample, output, _ = random_tensors(2)
    sample, output = sample.to(dtype), output.to(dtype)
    for t in scheduler.timesteps:
        prev, log_prob, _, _ = step(scheduler, output, t, sample, generator=torch.Generator().manual_seed(3))
        assert prev.dtype == dtype
        _, replay, _, _ = step(scheduler, output, t, sample, prev_sample=prev)
        assert torch.equal(torch.exp(replay - log_prob), torch.ones_like(log_prob))
        sample = prev


@pytest.mark.parametrize("step", STEP_FUNCTIONS, ids=lambda f: f.__name__)
def test_low_precision_inputs_are_computed_in_float32(step: Callable) -> None:
    scheduler = make_scheduler()
    sample, output, target = random_tensors(4)
    t = scheduler.timesteps[3]
    _, half, half_mean, _ = step(scheduler, output.bfloat16(), t, sample.bfloat16(), prev_sample=target.bfloat16())
    rounded = [tensor.bfloat16().float() for tensor in (output, sample, target)]
    _, full, full_mean, _ = step(scheduler, rounded[0], t, rounded[1], prev_sample=rounded[2])
    assert half_mean.dtype == torch.float32
    assert torch.equal(half, full) and torch.equal(half_mean, full_mean)


@pytest.mark.parametrize("step", STEP_FUNCTIONS, ids=lambda f: f.__name__)
def test_noise_level_zero_is_diffusers_euler_step(step: Callable) -> None:
    ours, theirs = make_scheduler(), make_scheduler()
    sample, output, _ = random_tensors(5)
    for t in ours.timesteps:
        prev, log_prob, mean, std = step(ours, output, t, sample, noise_level=0.0, generator=torch.Generator())
        expected = theirs.step(output, t, sample).prev_sample
        torch.testing.assert_close(prev, expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(prev, mean) and torch.equal(std, torch.zeros_like(std))
        assert torch.equal(log_prob, torch.zeros(SHAPE[0]))


def test_per_sample_timesteps_equal_one_call_per_timestep() -> None:
    scheduler = make_scheduler()
    sample, output, target = random_tensors(6)
    timesteps = scheduler.timesteps[[0, 4, 7]]
    for step in STEP_FUNCTIONS:
        _, batched, batched_mean, batched_std = step(scheduler, output, timesteps, sample, prev_sample=target)
        for i, t in enumerate(timesteps):
            one = slice(i, i + 1)
            _, single, mean, std = step(scheduler, output[one], t, sample[one], prev_sample=target[one])
            assert torch.equal(batched[one], single) and torch.equal(batched_mean[one], mean)
            assert torch.equal(batched_std[one], std)


def test_packed_latents_and_gradients_through_the_mean() -> None:
    """FLUX packs latents as [B, tokens, channels]; the log-prob is differentiable in the model output only."""
    scheduler = make_scheduler()
    sample, output, target = random_tensors(7, shape=(2, 9, 64))
    output.requires_grad_(True)
    for step in STEP_FUNCTIONS:
        prev, log_prob, _, _ = step(scheduler, output, scheduler.timesteps[2], sample, prev_sample=target)
        assert log_prob.shape == (2,) and not prev.requires_grad
        (gradient,) = torch.autograd.grad(log_prob.sum(), output)
        assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_bad_arguments_are_named() -> None:
    scheduler = make_scheduler()
    sample = torch.randn(SHAPE)
    t = scheduler.timesteps[1]
    for step in STEP_FUNCTIONS:
        with pytest.raises(ValueError, match="timestep"):
            step(scheduler, sample, float(t) + 0.5, sample)
        with pytest.raises(ValueError, match="timestep"):
            step(scheduler, sample, scheduler.timesteps[:2], sample)
        with pytest.raises(ValueError, match="model_output"):
            step(scheduler, sample[:, :2], t, sample)
        with pytest.raises(ValueError, match="prev_sample"):
            step(scheduler, sample, t, sample, prev_sample=sample[:1])
        with pytest.raises(ValueError, match="noise_level"):
            step(scheduler, sample, t, sample, noise_level=-0.1)
        with pytest.raises(ValueError, match="prev_sample and generator"):
            step(scheduler, sample, t, sample, prev_sample=sample, generator=torch.Generator())
        with pytest.raises(ValueError, match="set_timesteps"):
            step(FlowMatchEulerDiscreteScheduler(), sample, t, sample)
        with pytest.raises(ValueError, match="invert_sigmas"):
            inverted = FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
            inverted.set_timesteps(STEPS)
            step(inverted, sample, inverted.timesteps[1], sample)
    with pytest.raises(ValueError, match="noise_level"):
        cps_step_with_logprob(scheduler, sample, t, sample, noise_level=1.5)
    # a deterministic Gaussian step has no density for a given sample
    for step in (flow_sde_step_with_logprob, dance_sde_step_with_logprob):
        with pytest.raises(ValueError, match="noise_level"):
            step(scheduler, sample, t, sample, noise_level=0.0, prev_sample=sample)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory: pytest.TempPathFactory) -> StableDiffusion3Pipeline:
    path = build_tiny_sd3(Path(tmp_path_factory.mktemp("tiny_sd3")) / "pipeline")
    pipeline = StableDiffusion3Pipeline.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def guided_velocity(
    pipeline: StableDiffusion3Pipeline, latents: torch.Tensor, t: torch.Tensor, embeds: dict, guidance: float
) -> torch.Tensor:
    """One transformer call with classifier-free guidance, as StableDiffusion3Pipeline.__call__ makes it."""
    velocity = pipeline.transformer(
        hidden_states=torch.cat([latents] * 2),
        timestep=t.expand(2 * latents.shape[0]),
        encoder_hidden_states=torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]]),
        pooled_projections=torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]]),
        return_dict=False,
    )[0]
    unconditional, conditional = velocity.chunk(2)
    return unconditional + guidance * (conditional - unconditional)


def encode(pipeline: StableDiffusion3Pipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
    encoded = pipeline.encode_prompt(
        prompts,
        None,
        None,
        negative_prompt=[""] * len(prompts),
        do_classifier_free_guidance=True,
        max_sequence_length=16,
    )
    return dict(zip(names, encoded))


@torch.no_grad()
def test_tiny_sd3_loads_and_a_noise_free_loop_reproduces_the_pipeline(tiny_sd3: StableDiffusion3Pipeline) -> None:
    embeds = encode(tiny_sd3, ["a red circle", "a photo of a cat"])
    assert embeds["prompt_embeds"].shape == (2, 2 * 16, 32) and embeds["pooled_prompt_embeds"].shape == (2, 32)
    guidance, steps = 4.5, 6
    expected = tiny_sd3(
        **embeds,
        guidance_scale=guidance,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    latents = randn_tensor(expected.shape, generator=torch.Generator().manual_seed(0))
    scheduler = tiny_sd3.scheduler
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        velocity = guided_velocity(tiny_sd3, latents, t, embeds, guidance)
        latents, _, _, _ = flow_sde_step_with_logprob(scheduler, velocity, t, latents, noise_level=0.0)
    assert not torch.equal(latents, randn_tensor(expected.shape, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("step", STEP_FUNCTIONS, ids=lambda f: f.__name__)
def test_sde_trajectory_on_the_transformer_replays_with_ratio_one(
    tiny_sd3: StableDiffusion3Pipeline, step: Callable
) -> None:
    embeds = encode(tiny_sd3, ["a red circle", "a blue square"])
    scheduler = tiny_sd3.scheduler
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(1)
    latents = randn_tensor((2, 16, 8, 8), generator=generator)
    trajectory, log_probs = [latents], []
    for t in scheduler.timesteps:
        velocity = guided_velocity(tiny_sd3, latents, t, embeds, 4.5)
        latents, log_prob, _, _ = step(scheduler, velocity, t, latents, generator=generator)
        trajectory.append(latents)
        log_probs.append(log_prob)
    for index, t in enumerate(scheduler.timesteps):
        velocity = guided_velocity(tiny_sd3, trajectory[index], t, embeds, 4.5)
        _, replay, _, _ = step(scheduler, velocity, t, trajectory[index], prev_sample=trajectory[index + 1])
        assert torch.equal(replay, log_probs[index])
