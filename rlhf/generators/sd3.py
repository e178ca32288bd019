"""Stable Diffusion 3 / 3.5 as a policy: `SD3Transformer2DModel` over its two CLIP encoders and (optional) T5, with
classifier-free guidance, sampled by a flow SDE whose steps carry log-probs."""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from diffusers import StableDiffusion3Pipeline

from rlhf.generators.flow import FlowMatchingAdapter


class SD3Adapter(FlowMatchingAdapter):
    """A diffusers `StableDiffusion3Pipeline` as a policy (see `FlowMatchingAdapter` for the constructor).

    Conditioning keys (batch-first): `prompt_embeds` [B, CLIP tokens + `max_sequence_length` T5 tokens,
    joint_attention_dim],
    `pooled_prompt_embeds` [B, pooled_projection_dim]; with guidance also `negative_prompt_embeds` and
    `negative_pooled_prompt_embeds`. Latents are [B, 16, H / 8, W / 8] (the VAE's scale factor), as the transformer
    reads them. A pipeline loaded with `text_encoder_3=None` runs without T5 (zeros in its place, as diffusers does).
    """

    pipeline_class: ClassVar[type[StableDiffusion3Pipeline]] = StableDiffusion3Pipeline
    default_max_shift: ClassVar[float] = 1.16
    default_max_sequence_length: ClassVar[int] = 256
    frozen_component_names: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")

    @property
    def default_size(self) -> int:
        """The image side the transformer was configured for (`sample_size` latents), in pixels."""
        return self.pipeline.default_sample_size * self.pipeline.vae_scale_factor

    @torch.no_grad()
    def encode_prompt(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str] | None = None,
        *,
        guidance: bool = True,
        height: int | None = None,
        width: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """SD3's conditioning; with `guidance` the negatives' too (an absent or empty one is the empty prompt, as
        in diffusers). `height`/`width` do not change SD3's conditioning."""
        prompts = self._prompt_list(prompts)
        negatives = None
        if negative_prompts is not None:
            negatives = self._prompt_list(negative_prompts, "negative_prompts") if len(negative_prompts) else None
            if negatives is not None and len(negatives) != len(prompts):
                raise ValueError(
                    f"negative_prompts: expected one per prompt ({len(prompts)}), got {len(negatives)}"
                )
        embeds, negative_embeds, pooled, negative_pooled = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guidance,
            negative_prompt=negatives,
            max_sequence_length=self.max_sequence_length,
        )
        conditioning = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if guidance:
            conditioning["negative_prompt_embeds"] = negative_embeds
            conditioning["negative_pooled_prompt_embeds"] = negative_pooled
        return conditioning

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        factor = self.pipeline.vae_scale_factor
        config = self.transformer.config
        self._check_size(height, width, factor * config.patch_size)
        latent_height, latent_width = height // factor, width // factor
        # the positional embedding is cropped from a pos_embed_max_size^2 grid: larger latents have none
        limit = config.pos_embed_max_size
        if limit is not None and max(latent_height, latent_width) // config.patch_size > limit:
            side = limit * config.patch_size * factor
            raise ValueError(f"height/width: at most {side} px for this model, got {height}x{width}")
        return (batch_size, config.in_channels, latent_height, latent_width)

    def image_seq_len(self, height: int, width: int) -> int:
        _, _, latent_height, latent_width = self.latent_shape(1, height, width)
        patch = self.transformer.config.patch_size
        return (latent_height // patch) * (latent_width // patch)

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor | float,
        conditioning: dict[str, torch.Tensor],
        guidance_scale: float,
        denoiser: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The velocity in float32, guided when `conditioning` holds the negatives (both halves in one call, as
        diffusers). `timesteps` are the scheduler's values; SD3's transformer reads them as they are."""
        transformer = denoiser or self.transformer
        timesteps = self._timesteps_per_sample(timesteps, latents)
        embeds, pooled = conditioning["prompt_embeds"], conditioning["pooled_prompt_embeds"]
        guided = "negative_prompt_embeds" in conditioning
        if guided:
            latents, timesteps = torch.cat([latents, latents]), torch.cat([timesteps, timesteps])
            embeds = torch.cat([conditioning["negative_prompt_embeds"], embeds])
            pooled = torch.cat([conditioning["negative_pooled_prompt_embeds"], pooled])
        dtype = self.denoiser_dtype
        prediction = transformer(
            hidden_states=latents.to(dtype),
            timestep=timesteps,
            encoder_hidden_states=embeds.to(dtype),
            pooled_projections=pooled.to(dtype),
            return_dict=False,
        )[0].float()
        if not guided:
            return prediction
        unconditional, conditional = prediction.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, 16, h, w] -> float32 images [B, 3, H, W] in [0, 1]; a graph to `latents` when grad is on."""
        return self._decode_unpacked(latents)
