"""Stable Diffusion 1.x/2.x and SDXL as a `GeneratorAdapter`: a UNet policy with a LoRA, DDIM steps with
log-probs, diffusers-format LoRA files."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from rlhf.generators.base import GeneratorAdapter, StepResult
from rlhf.generators.scheduling import ddim_step

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")


class StableDiffusionAdapter(GeneratorAdapter):
    """A diffusers Stable Diffusion pipeline as a policy: a trainable LoRA on the UNet and DDIM steps with log-probs.

    Args:
        sd_pipeline: a `StableDiffusionPipeline` (SD 1.x/2.x) or `StableDiffusionXLPipeline`; its scheduler is
            replaced by a `DDIMScheduler` with the same config.
        use_lora: train a LoRA adapter on the UNet (attached with peft's `unet.add_adapter`); otherwise the whole
            UNet is trainable.
        lora_rank, lora_alpha, lora_target_modules: the adapter's shape (TRL 0.23: r=4, alpha=4, attention
            projections), ignored if the UNet already carries an adapter (e.g. one loaded by `from_pretrained`).
        lora_seed: seeds the adapter's random initialisation (LoRA B starts at zero, so the policy starts as
            the base model whatever the seed).
        base_model, base_revision: the name or path (and revision) the pipeline came from, recorded next to
            exported LoRA weights.
    """

    frozen_component_names = ("vae", "text_encoder", "text_encoder_2")

    def __init__(
        self,
        sd_pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline,
        *,
        use_lora: bool = True,
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
        lora_seed: int = 0,
        base_model: str = "",
        base_revision: str = "main",
    ) -> None:
        if not isinstance(sd_pipeline, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise TypeError(
                f"sd_pipeline: expected a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline, "
                f"got {type(sd_pipeline).__name__}"
            )
        self.sd_pipeline = sd_pipeline
        self.sd_pipeline.scheduler = DDIMScheduler.from_config(sd_pipeline.scheduler.config)
        if getattr(sd_pipeline, "safety_checker", None) is not None:
            # the safety checker blacks out images, which a reward would read as signal
            self.sd_pipeline.safety_checker = None
        self.use_lora = use_lora
        self.base_model = base_model
        self.base_revision = base_revision
        self.is_sdxl = isinstance(sd_pipeline, StableDiffusionXLPipeline)
        self._set_up_policy(use_lora, lora_rank, lora_alpha, lora_target_modules, lora_seed)

    # ---- components (TRL 0.23's properties) ----------------------------------------------------------------

    @property
    def pipeline(self) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        return self.sd_pipeline

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.sd_pipeline.unet

    @property
    def unet(self) -> torch.nn.Module:
        return self.sd_pipeline.unet

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.sd_pipeline.text_encoder

    @property
    def tokenizer(self) -> Any:
        return self.sd_pipeline.tokenizer

    @property
    def default_size(self) -> int:
        """The image side the UNet was configured for, in pixels."""
        return self.unet.config.sample_size * self.sd_pipeline.vae_scale_factor

    # ---- prompts and the UNet ------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(
        self,
        prompts: Sequence[str] | None,
        negative_prompts: Sequence[str] | None = None,
        *,
        guidance: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample conditioning for `predict`; negatives only when `guidance` (an empty one = unconditional)."""
        negatives = None if negative_prompts is None or all(n == "" for n in negative_prompts) else list(negative_prompts)
        prompts = list(prompts) if prompts is not None else None
        if self.is_sdxl:
            embeds, negative_embeds, pooled, negative_pooled = self.sd_pipeline.encode_prompt(
                prompt=prompts,
                device=self.device,
                do_classifier_free_guidance=guidance,
                negative_prompt=negatives,
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_prompt_embeds,
            )
            height, width = height or self.default_size, width or self.default_size
            # SDXL's micro-conditioning: original size, crop top-left, target size
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=embeds.dtype)
            conditioning = {
                "prompt_embeds": embeds,
                "pooled_prompt_embeds": pooled,
                "add_time_ids": time_ids.expand(len(embeds), -1),
            }
            if guidance:
                conditioning["negative_prompt_embeds"] = negative_embeds
                conditioning["negative_pooled_prompt_embeds"] = negative_pooled
            return conditioning
        embeds, negative_embeds = self.sd_pipeline.encode_prompt(
            prompts,
            self.device,
            1,
            guidance,
            negative_prompt=negatives,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
        )
        conditioning = {"prompt_embeds": embeds}
        if guidance:
            conditioning["negative_prompt_embeds"] = negative_embeds
        return conditioning

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor | int,
        conditioning: dict[str, torch.Tensor],
        guidance_scale: float,
        denoiser: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The (guided) UNet prediction in float32 for latents [N, ...] at timesteps (scalar or [N]).

        With `negative_prompt_embeds` in `conditioning` the conditional and unconditional halves run in one UNet
        call and are combined with `guidance_scale`. `denoiser` overrides the module called (the trainer passes its
        distributed wrapper, so that gradients are synchronised).
        """
        unet = denoiser or self.unet
        guided = "negative_prompt_embeds" in conditioning
        timesteps = self._timesteps_per_sample(timesteps, latents)
        embeds = conditioning["prompt_embeds"]
        added = None
        if self.is_sdxl:
            added = {"text_embeds": conditioning["pooled_prompt_embeds"], "time_ids": conditioning["add_time_ids"]}
        if guided:
            latents = torch.cat([latents, latents])
            timesteps = torch.cat([timesteps, timesteps])
            embeds = torch.cat([conditioning["negative_prompt_embeds"], embeds])
            if added is not None:
                added = {
                    "text_embeds": torch.cat([conditioning["negative_pooled_prompt_embeds"], added["text_embeds"]]),
                    "time_ids": torch.cat([added["time_ids"], added["time_ids"]]),
                }
        dtype = self.denoiser_dtype
        if added is not None:
            added = {k: v.to(dtype) for k, v in added.items()}
        prediction = unet(
            latents.to(dtype), timesteps, encoder_hidden_states=embeds.to(dtype), added_cond_kwargs=added
        ).sample.float()
        if not guided:
            return prediction
        unconditional, conditional = prediction.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    def set_timesteps(self, num_inference_steps: int, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """DDIM's timesteps for a sampling run (they do not depend on the image size)."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        return self.scheduler.timesteps

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | int,
        sample: torch.Tensor,
        *,
        noise_level: float,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> StepResult:
        """One DDIM step with `eta = noise_level`: (prev_sample, log_prob, mean, std) as the flow families return.

        `noise_level = 0` is diffusers' deterministic DDIM step (log-prob 0: the step it takes is certain), which
        has no density to score a given `prev_sample` with."""
        if noise_level == 0:
            if prev_sample is not None:
                raise ValueError("noise_level: a deterministic step (noise_level=0) has no density to score prev_sample")
            prev_sample = self.scheduler.step(model_output, timestep, sample, eta=0.0).prev_sample
            log_prob = torch.zeros(len(sample), device=sample.device)
            std = torch.zeros((len(sample),) + (1,) * (sample.ndim - 1), device=sample.device)
            return prev_sample, log_prob, prev_sample.float(), std
        return ddim_step(
            self.scheduler, model_output, timestep, sample, eta=noise_level, prev_sample=prev_sample,
            generator=generator,
        )

    def predicted_clean(self, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor) -> torch.Tensor:
        """DDIM's x0-hat (the scheduler's `pred_original_sample`; a deterministic step draws nothing)."""
        return self.scheduler.step(model_output, timestep, sample, eta=0.0).pred_original_sample

    # ---- latents and images --------------------------------------------------------------------------------

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        factor = self.sd_pipeline.vae_scale_factor
        # the UNet halves the latent (len(blocks) - 1) times, so each side must divide by that too
        multiple = factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % multiple or width % multiple:
            raise ValueError(f"height/width: expected multiples of {multiple} for this model, got {height}x{width}")
        return (batch_size, self.unet.config.in_channels, height // factor, width // factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 images [B, 3, H, W] in [0, 1]; with grad enabled the graph reaches `latents` (the
        VAE itself is frozen, so no graph is built for latents that need none)."""
        vae = self.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ---- export --------------------------------------------------------------------------------------------

    def _save_lora_weights(self, output_dir: Path) -> None:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        type(self.sd_pipeline).save_lora_weights(
            output_dir,
            unet_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in layers.items()},
            unet_lora_adapter_metadata=self.unet.peft_config["default"].to_dict(),
        )
