"""Sampling that keeps the graph from the images back to the trainable weights, for reward back-propagation
(AlignProp, DRaFT-K, DRaFT-LV), on any `GeneratorAdapter`."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from rlhf.generators.base import GeneratorAdapter


@dataclass
class RGBWithGradOutput:
    """What `sample_with_grad` (and TRL's `rgb_with_grad`) returns.

    Attributes:
        images: float32 [B, 3, H, W] in [0, 1] with the graph to the trainable weights ([B * lv_copies] with
            DRaFT-LV, sample-major).
        backprop_steps: K, the number of final denoising steps the graph goes through.
        timesteps: [num_steps] the scheduler's timesteps, in sampling order.
        lv_copies: DRaFT-LV's re-noised copies per sample (0 = off).
    """

    images: torch.Tensor
    backprop_steps: int
    timesteps: torch.Tensor
    lv_copies: int = 0


def backprop_steps(
    num_inference_steps: int,
    *,
    truncated_backprop: bool = True,
    truncated_backprop_rand: bool = True,
    truncated_backprop_timestep: int = 49,
    truncated_rand_backprop_minmax: tuple[int, int] = (0, 50),
) -> int:
    """K, how many of the last denoising steps are back-propagated through, from TRL 0.23's truncation options.

    Steps are indexed 0..N-1 in sampling order and gradients flow through steps `i >= start`: `start` is
    `truncated_backprop_timestep`, or with `truncated_backprop_rand` drawn once per call with Python's
    `random.randint` over `truncated_rand_backprop_minmax` (inclusive, as TRL; the trainers reseed `random`
    per epoch). A drawn start past the last step is clamped to it, so K >= 1 (TRL's K = 0 trained nothing).
    Without `truncated_backprop`, K = N.
    """
    steps = num_inference_steps
    if not truncated_backprop:
        return steps
    if truncated_backprop_rand:
        low, high = truncated_rand_backprop_minmax
        if not 0 <= low <= high:
            raise ValueError(
                f"truncated_rand_backprop_minmax: expected 0 <= min <= max, got {tuple(truncated_rand_backprop_minmax)}"
            )
        return steps - min(random.randint(low, high), steps - 1)
    if not 0 <= truncated_backprop_timestep < steps:
        raise ValueError(
            f"truncated_backprop_timestep: expected a step index in [0, {steps - 1}], got {truncated_backprop_timestep}"
        )
    return steps - truncated_backprop_timestep


def sample_with_grad(
    generator_model: GeneratorAdapter,
    conditioning: dict[str, torch.Tensor],
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    guidance_scale: float,
    eta: float,
    generator: torch.Generator | list[torch.Generator] | None,
    backprop_steps: int,
    gradient_checkpoint: bool = True,
    decode_checkpoint: bool = False,
    lv_copies: int = 0,
    denoiser: torch.nn.Module | None = None,
) -> RGBWithGradOutput:
    """Denoise `latents` over `timesteps` (from `prepare_sampling`), keeping the graph through the last K steps.

    The first N - K steps run under `no_grad`; each of the last K denoiser calls builds a graph, recomputed in
    the backward pass instead of stored when `gradient_checkpoint` (activation memory O(1) in K instead of
    O(K)). `eta` is the step's noise level (0: the family's deterministic sampler). Called under
    `torch.no_grad()` it builds no graph: a sampler (the trainers evaluate with it).

    DRaFT-LV (`lv_copies = n > 0`, K must be 0): the whole chain runs without a graph; its final latent x_0 is
    re-noised n times to the last timestep (fresh noise from `generator`) and each copy takes that last step
    with a graph. Images are then [B * n], sample-major (each sample's n copies adjacent): average the
    reward over them.

    `decode_checkpoint` recomputes the VAE decode in the backward pass (its activations dominate at high
    resolution). `denoiser` overrides the module called; a DDP wrapper would need `static_graph=True` for K
    forwards before one backward, so `AlignPropTrainer` calls the bare denoiser and averages the LoRA gradients
    itself.
    """
    if lv_copies < 0:
        raise ValueError(f"lv_copies: expected a count >= 0, got {lv_copies}")
    steps = len(timesteps)
    if lv_copies:
        backprop_steps = 0  # the chain runs without a graph; the copies take the graph-building last step
    elif not 1 <= backprop_steps <= steps:
        raise ValueError(f"backprop_steps: expected K in [1, {steps}], got {backprop_steps}")
    graph_allowed = torch.is_grad_enabled()  # under no_grad this is a plain sampler (eta = 0 included)

    def step(sample: torch.Tensor, timestep: torch.Tensor, step_conditioning: dict[str, torch.Tensor],
             step_generator: Any, with_grad: bool) -> torch.Tensor:
        with_grad = with_grad and graph_allowed
        with torch.set_grad_enabled(with_grad):
            if with_grad and gradient_checkpoint:
                prediction = torch.utils.checkpoint.checkpoint(
                    generator_model.predict, sample, timestep, step_conditioning, guidance_scale, denoiser,
                    use_reentrant=False,
                )
            else:
                prediction = generator_model.predict(sample, timestep, step_conditioning, guidance_scale, denoiser)
            return generator_model.step(prediction, timestep, sample, noise_level=eta, generator=step_generator)[0]

    first_with_grad = steps - backprop_steps
    for index, timestep in enumerate(timesteps):
        latents = step(latents, timestep, conditioning, generator, index >= first_with_grad)
    if lv_copies:
        latents = _draft_lv_last_step(generator_model, latents, timesteps[-1], conditioning, lv_copies, generator, step)
    if decode_checkpoint and latents.requires_grad:
        images = torch.utils.checkpoint.checkpoint(generator_model.decode, latents, use_reentrant=False)
    else:
        with torch.set_grad_enabled(latents.requires_grad):
            images = generator_model.decode(latents)
    return RGBWithGradOutput(images, max(backprop_steps, 1), timesteps.clone(), lv_copies)


def _draft_lv_last_step(
    generator_model: GeneratorAdapter,
    final_latents: torch.Tensor,
    last: torch.Tensor,
    conditioning: dict[str, torch.Tensor],
    copies: int,
    generator: torch.Generator | list[torch.Generator] | None,
    step: Any,
) -> torch.Tensor:
    """DRaFT-LV: `copies` re-noisings of each x_0 to the last timestep, each denoised by one graph-building
    step; [B * copies] latents, sample-major."""
    noise = torch.stack(
        [randn_tensor(final_latents.shape, generator=generator, device=final_latents.device, dtype=torch.float32)
         for _ in range(copies)],
        dim=1,
    ).flatten(0, 1)
    repeated = final_latents.repeat_interleave(copies, dim=0)
    noisy = generator_model.add_noise(repeated, noise, last)
    copy_conditioning = {key: value.repeat_interleave(copies, dim=0) for key, value in conditioning.items()}
    # one generator per image does not cover the copies: their step noise comes from the first generator
    copy_generator = generator[0] if isinstance(generator, list) else generator
    return step(noisy, last, copy_conditioning, copy_generator, True)
