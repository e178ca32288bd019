"""ddim_step_with_logprob against diffusers' own DDIM step and an independent Gaussian log-density."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from torch.distributions import Normal, kl_divergence

from rlhf.generators.scheduling import ddim_step_kl, ddim_step_with_logprob

STEPS = 10


def make_scheduler(prediction_type: str = "epsilon", set_alpha_to_one: bool = False, **options) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        set_alpha_to_one=set_alpha_to_one,
        steps_offset=1,
        prediction_type=prediction_type,
        **{"clip_sample": False, **options},
    )
    scheduler.set_timesteps(STEPS)
    return scheduler


def reference_gaussian(scheduler: DDIMScheduler, output: torch.Tensor, t: int, sample: torch.Tensor, eta: float) -> Normal:
    """The step's distribution: diffusers' noiseless step is the mean; the standard deviation is eta times the
    DDIM paper's posterior variance (its formula 16), from the scheduler's public alphas_cumprod, in float64."""
    zero_noise = torch.zeros_like(sample)
    mean = scheduler.step(output, t, sample, eta=eta, variance_noise=zero_noise).prev_sample.double()
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t, alpha_prev = scheduler.alphas_cumprod.double()[[t, prev_t]]
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    return Normal(mean, eta * variance.sqrt())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_log_prob_equals_independent_gaussian_log_density(prediction_type: str, eta: float) -> None:
    scheduler = make_scheduler(prediction_type)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 4, 8, 8, generator=generator)
    output = torch.randn(3, 4, 8, 8, generator=generator)
    for t in scheduler.timesteps[:-1].tolist():
        expected_distribution = reference_gaussian(scheduler, output, t, sample, eta)
        prev, log_prob = ddim_step_with_logprob(scheduler, output, t, sample, eta=eta, generator=generator)
        expected = expected_distribution.log_prob(prev.double()).mean(dim=(1, 2, 3))
        assert log_prob.shape == (3,) and log_prob.dtype == torch.float32
        torch.testing.assert_close(log_prob.double(), expected, rtol=1e-5, atol=1e-5)
        # the log-prob of a given sample, too (PPO's replay)
        other = torch.randn(sample.shape, generator=generator)
        _, replay = ddim_step_with_logprob(scheduler, output, t, sample, eta=eta, prev_sample=other)
        expected_replay = expected_distribution.log_prob(other.double()).mean(dim=(1, 2, 3))
        torch.testing.assert_close(replay.double(), expected_replay, rtol=1e-5, atol=1e-5)


def test_drawn_step_matches_diffusers_step_with_the_same_generator() -> None:
    scheduler = make_scheduler()
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    output = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = int(scheduler.timesteps[3])
    ours, _ = ddim_step_with_logprob(scheduler, output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(7))
    theirs = scheduler.step(output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(7)).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [dict(thresholding=True, sample_max_value=1.0, dynamic_thresholding_ratio=0.9),
                                     dict(clip_sample=True, clip_sample_range=0.5)], ids=["dynamic", "clip"])
def test_thresholded_step_matches_diffusers_step(options: dict) -> None:
    """x0-hat thresholded (Imagen's dynamic thresholding, or clipping) the way DDIMScheduler.step does it."""
    scheduler = make_scheduler(**options)
    sample = 3 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    output = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    plain = make_scheduler()
    for t in scheduler.timesteps[:-1].tolist():
        ours, _ = ddim_step_with_logprob(scheduler, output, t, sample, generator=torch.Generator().manual_seed(t))
        theirs = scheduler.step(output, t, sample, eta=1.0, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        # the thresholding is in effect: the unthresholded step lands elsewhere
        unthresholded, _ = ddim_step_with_logprob(plain, output, t, sample, generator=torch.Generator().manual_seed(t))
        assert not torch.allclose(ours, unthresholded, atol=1e-3)


def test_per_sample_timesteps_equal_one_call_per_timestep() -> None:
    scheduler = make_scheduler()
    generator = torch.Generator().manual_seed(3)
    sample = torch.randn(4, 4, 8, 8, generator=generator)
    output = torch.randn(4, 4, 8, 8, generator=generator)
    target = torch.randn(4, 4, 8, 8, generator=generator)
    timesteps = scheduler.timesteps[[0, 3, 5, 9]]
    _, batched = ddim_step_with_logprob(scheduler, output, timesteps, sample, prev_sample=target)
    for i, t in enumerate(timesteps.tolist()):
        _, single = ddim_step_with_logprob(scheduler, output[i : i + 1], t, sample[i : i + 1], prev_sample=target[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, rtol=0, atol=0)


def test_last_step_keeps_a_positive_std_when_alpha_is_set_to_one() -> None:
    scheduler = make_scheduler(set_alpha_to_one=True)
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    _, log_prob = ddim_step_with_logprob(scheduler, output, scheduler.timesteps[-1], sample, generator=torch.Generator())
    assert torch.isfinite(log_prob).all()


def test_low_precision_inputs_are_computed_in_float32() -> None:
    scheduler = make_scheduler()
    generator = torch.Generator().manual_seed(4)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    output = torch.randn(2, 4, 8, 8, generator=generator)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    t = int(scheduler.timesteps[2])
    _, full = ddim_step_with_logprob(scheduler, output, t, sample, prev_sample=target)
    prev, half = ddim_step_with_logprob(
        scheduler, output.bfloat16(), t, sample.bfloat16(), prev_sample=target.bfloat16()
    )
    assert prev.dtype == torch.bfloat16 and half.dtype == torch.float32
    # only the inputs' rounding differs, not the arithmetic
    _, rounded = ddim_step_with_logprob(
        scheduler, output.bfloat16().float(), t, sample.bfloat16().float(), prev_sample=target.bfloat16().float()
    )
    torch.testing.assert_close(half, rounded, rtol=0, atol=0)
    assert not torch.equal(half, full)


def test_kl_is_the_closed_form_gaussian_kl() -> None:
    scheduler = make_scheduler()
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    output = torch.randn(2, 4, 8, 8, generator=generator)
    reference = output + 0.05 * torch.randn(2, 4, 8, 8, generator=generator)
    t = int(scheduler.timesteps[4])
    kl = ddim_step_kl(scheduler, output, reference, t, sample)
    policy, ref = reference_gaussian(scheduler, output, t, sample, 1.0), reference_gaussian(scheduler, reference, t, sample, 1.0)
    torch.testing.assert_close(kl.double(), kl_divergence(policy, ref).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-7)
    assert torch.equal(ddim_step_kl(scheduler, output, output, t, sample), torch.zeros(2))


def test_bad_arguments_are_named() -> None:
    scheduler = make_scheduler()
    sample = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_with_logprob(scheduler, sample, 1, sample, eta=0.0)
    with pytest.raises(ValueError, match="prev_sample and generator"):
        ddim_step_with_logprob(scheduler, sample, 1, sample, prev_sample=sample, generator=torch.Generator())
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(DDIMScheduler(), sample, 1, sample)
