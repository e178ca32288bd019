"""TRL 0.23's `DDPOStableDiffusionPipeline` API over the SD adapter: sampling that records every latent and DDIM
log-prob, `rgb_with_grad` (reward back-propagation) and `scheduler_step`, kept for TRL scripts; our trainers call
the adapter interface and `rlhf.generators.sampling` / `rlhf.generators.backprop` directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from PIL import Image

from rlhf.generators.backprop import RGBWithGradOutput, backprop_steps, sample_with_grad
from rlhf.generators.base import BASE_MODEL_FILE, LORA_WEIGHT_NAME
from rlhf.generators.sampling import sample_trajectories
from rlhf.generators.stable_diffusion import DEFAULT_LORA_TARGETS, StableDiffusionAdapter
from rlhf.generators.scheduling import ddim_step_with_logprob

__all__ = [
    "BASE_MODEL_FILE", "DEFAULT_LORA_TARGETS", "LORA_WEIGHT_NAME", "DDPOPipelineOutput", "DDPOSchedulerOutput",
    "DDPOStableDiffusionPipeline", "DefaultDDPOStableDiffusionPipeline", "RGBWithGradOutput",
]


@dataclass
class DDPOPipelineOutput:
    """What one sampling call returns; enough to replay every step for PPO.

    Attributes:
        images: float [B, 3, H, W] in [0, 1] (`output_type="pt"`), or PIL images / a uint8 NHWC array.
        latents: `num_steps + 1` float32 tensors [B, C, h, w]: the initial noise, then each step's output.
        log_probs: `num_steps` float32 tensors [B]: the log-prob of each step (see `ddim_step_with_logprob`).
        timesteps: [num_steps] the scheduler's timesteps, in sampling order.
        conditioning: per-sample tensors the UNet was conditioned on (`prompt_embeds`, and with guidance
            `negative_prompt_embeds`; for SDXL also `pooled_prompt_embeds`, `negative_pooled_prompt_embeds`,
            `add_time_ids`), each batch-first, to pass back to `DDPOStableDiffusionPipeline.predict`.
    """

    images: Any
    latents: list[torch.Tensor]
    log_probs: list[torch.Tensor]
    timesteps: torch.Tensor
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def prompt_embeds(self) -> torch.Tensor:
        return self.conditioning["prompt_embeds"]

    @property
    def negative_prompt_embeds(self) -> torch.Tensor | None:
        return self.conditioning.get("negative_prompt_embeds")


@dataclass
class DDPOSchedulerOutput:
    """TRL 0.23's return type of `scheduler_step`: the next latents and their log-probs [B]."""

    latents: torch.Tensor
    log_probs: torch.Tensor


class DDPOStableDiffusionPipeline(StableDiffusionAdapter):
    """TRL 0.23's DDPO/AlignProp pipeline: the SD adapter (constructor and `from_pretrained` as there) plus TRL's
    sampling calls. `__call__` samples with DDIM log-probs (TRL's DDPO); `rgb_with_grad` keeps the graph (TRL's
    AlignProp)."""

    # the number of final steps `rgb_with_grad` back-propagates through, from TRL's truncation options
    backprop_steps = staticmethod(backprop_steps)

    def get_trainable_layers(self) -> torch.nn.Module:
        """The module whose trainable parameters the trainer optimises (TRL 0.23's name): the UNet."""
        return self.unet

    def scheduler_step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 1.0,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> DDPOSchedulerOutput:
        """TRL 0.23's step API over `ddim_step_with_logprob`."""
        latents, log_probs = ddim_step_with_logprob(
            self.scheduler, model_output, timestep, sample, eta=eta, prev_sample=prev_sample, generator=generator
        )
        return DDPOSchedulerOutput(latents, log_probs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pt",
    ) -> DDPOPipelineOutput:
        """Sample images with DDIM at `eta` (0: deterministic, log-probs 0) through the one sampling loop
        (`rlhf.generators.sampling.sample_trajectories`), recording every latent and step log-prob.

        Every random draw (initial noise, per-step noise) comes from `generator`, so a call reproduces from
        its seed; without one the global torch RNG is used, as in diffusers. `height`/`width` default to the
        UNet's configured size. Guidance applies when `guidance_scale > 1`.
        """
        conditioning, latents, timesteps = self.prepare_sampling(
            prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
            width=width, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            generator=generator, latents=latents, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        sampled = sample_trajectories(
            self, None, num_steps=num_inference_steps, guidance_scale=guidance_scale, noise_level=eta,
            height=height or self.default_size, width=width or self.default_size, generator=generator,
            conditioning=conditioning, initial_latents=latents,
        )
        images = sampled.images
        if output_type in ("pil", "np"):
            arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
            images = [Image.fromarray(a) for a in arrays] if output_type == "pil" else arrays
        elif output_type != "pt":
            raise ValueError(f"output_type: expected 'pt', 'pil' or 'np', got {output_type!r}")
        return DDPOPipelineOutput(
            images, list(sampled.latents.unbind(1)), list(sampled.log_probs.unbind(1)), timesteps.clone(), conditioning
        )

    def rgb_with_grad(
        self,
        prompt: str | Sequence[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        truncated_backprop: bool = True,
        truncated_backprop_rand: bool = True,
        gradient_checkpoint: bool = True,
        truncated_backprop_timestep: int = 49,
        truncated_rand_backprop_minmax: tuple[int, int] = (0, 50),
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        *,
        backprop_steps: int | None = None,
        decode_checkpoint: bool = False,
        lv_copies: int = 0,
        unet: torch.nn.Module | None = None,
    ) -> "RGBWithGradOutput":
        """Sample images that keep the graph to the trainable weights (AlignProp, DRaFT-K, DRaFT-LV).

        The first N - K steps run under `no_grad`; each of the last K UNet calls builds a graph, recomputed in
        the backward pass instead of stored when `gradient_checkpoint` (activation memory O(1) in K instead of
        O(K)). K is `backprop_steps` if given, else `backprop_steps(...)` from TRL's truncation options.
        With the same generator and K = N the images equal `__call__`'s; `eta = 0` is diffusers' deterministic DDIM. Called
        under `torch.no_grad()` it builds no graph: a sampler (the trainers evaluate with it).

        DRaFT-LV (`lv_copies = n > 0`, K = 1): the whole chain runs without a graph; its final latent x_0 is
        re-noised n times to the last timestep (fresh noise from `generator`) and each copy takes that last step
        with a graph. Images are then [B * n], sample-major (each sample's n copies adjacent): average the
        reward over them.

        `decode_checkpoint` recomputes the VAE decode in the backward pass (its activations dominate at high
        resolution). `unet` overrides the module called (default: this pipeline's UNet); a DDP wrapper would need
        `static_graph=True` for K forwards before one backward, so `AlignPropTrainer` calls the bare UNet and
        averages the LoRA gradients itself.
        """
        conditioning, latents, timesteps = self.prepare_sampling(
            prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
            width=width, negative_prompt=negative_prompt, num_images_per_prompt=num_images_per_prompt,
            generator=generator, latents=latents, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        if backprop_steps is None and not lv_copies:
            backprop_steps = self.backprop_steps(
                len(timesteps),
                truncated_backprop=truncated_backprop,
                truncated_backprop_rand=truncated_backprop_rand,
                truncated_backprop_timestep=truncated_backprop_timestep,
                truncated_rand_backprop_minmax=truncated_rand_backprop_minmax,
            )
        return sample_with_grad(
            self, conditioning, latents, timesteps, guidance_scale=guidance_scale, eta=eta, generator=generator,
            backprop_steps=backprop_steps or 0, gradient_checkpoint=gradient_checkpoint,
            decode_checkpoint=decode_checkpoint, lv_copies=lv_copies, denoiser=unet,
        )


class DefaultDDPOStableDiffusionPipeline(DDPOStableDiffusionPipeline):
    """TRL 0.23's constructor: `DefaultDDPOStableDiffusionPipeline(pretrained_model_name, use_lora=True)`."""

    def __init__(
        self, pretrained_model_name: str, *, pretrained_model_revision: str = "main", use_lora: bool = True
    ) -> None:
        loaded = DDPOStableDiffusionPipeline.from_pretrained(
            pretrained_model_name, revision=pretrained_model_revision, use_lora=use_lora
        )
        self.__dict__.update(loaded.__dict__)
