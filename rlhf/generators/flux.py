"""FLUX.1 as a policy: `FluxTransformer2DModel` over packed latents, conditioned on T5 tokens, CLIP's pooled output
and (FLUX.1-dev) a guidance embedding instead of classifier-free guidance."""

from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.utils.torch_utils import randn_tensor

from rlhf.generators.flow import FlowMatchingAdapter


class FluxAdapter(FlowMatchingAdapter):
    """A diffusers `FluxPipeline` as a policy (see `FlowMatchingAdapter` for the constructor).

    Latents are packed as the transformer reads them: [B, (h / 2) * (w / 2), 4 * 16] for h x w VAE latents (2x2
    patches side by side in the channels). Conditioning keys (batch-first): `prompt_embeds` [B, T5 tokens,
    joint_attention_dim], `pooled_prompt_embeds` [B, pooled_projection_dim], and `img_ids` [B, image tokens, 3]
    (the patches' rotary positions, which fix the image size: encode at the size you sample). There is no
    classifier-free guidance: `encode_prompt`'s `guidance` and negatives are ignored, and `predict`'s
    `guidance_scale` is the guidance embedding's value when the transformer has one (FLUX.1-dev; ignored by
    FLUX.1-schnell).
    """

    pipeline_class: ClassVar[type[FluxPipeline]] = FluxPipeline
    default_max_shift: ClassVar[float] = 1.15
    default_max_sequence_length: ClassVar[int] = 512
    frozen_component_names: ClassVar[tuple[str, ...]] = ("vae", "text_encoder", "text_encoder_2")

    @property
    def default_size(self) -> int:
        """The image side the model was made for: the VAE config's `sample_size` (1024 for FLUX.1, whose
        transformer records no size)."""
        return int(self.vae.config.sample_size)

    def _latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the unpacked VAE latents; both even, since 2x2 patches are packed into one token."""
        factor = self.pipeline.vae_scale_factor
        self._check_size(height, width, factor * 2)
        return height // factor, width // factor

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
        """FLUX's conditioning at `height` x `width` (default `default_size`), which sets `img_ids`; negatives and
        `guidance` are ignored (no classifier-free guidance)."""
        prompts = self._prompt_list(prompts)
        height, width = height or self.default_size, width or self.default_size
        latent_height, latent_width = self._latent_grid(height, width)
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        image_ids = self.pipeline._prepare_latent_image_ids(
            len(prompts), latent_height // 2, latent_width // 2, self.device, embeds.dtype
        )
        return {
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
            "img_ids": image_ids.unsqueeze(0).expand(len(prompts), -1, -1),
        }

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int]:
        latent_height, latent_width = self._latent_grid(height, width)
        return (batch_size, (latent_height // 2) * (latent_width // 2), self.transformer.config.in_channels)

    def image_seq_len(self, height: int, width: int) -> int:
        return self.latent_shape(1, height, width)[1]

    def initial_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Noise drawn unpacked and then packed, as `FluxPipeline` draws it: the same generator gives the same
        image as the plain pipeline."""
        latent_height, latent_width = self._latent_grid(height, width)
        channels = self.transformer.config.in_channels // 4
        noise = randn_tensor(
            (batch_size, channels, latent_height, latent_width), generator=generator, device=self.device,
            dtype=torch.float32,
        )
        return self.pipeline._pack_latents(noise, batch_size, channels, latent_height, latent_width)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents (`GeneratorAdapter.encode_images`) packed into 2x2 patches, the layout the transformer reads
        (diffusers' `_pack_latents`, as for the initial noise: there is no public form)."""
        latents = super().encode_images(pixels)
        return self.pipeline._pack_latents(latents, *latents.shape)

    def _schedule_sigmas(self, num_inference_steps: int) -> np.ndarray | None:
        # FluxPipeline spaces sigmas from 1 to 1 / N (unless the scheduler makes its own flow sigmas)
        if self.scheduler.config.get("use_flow_sigmas", False):
            return None
        return np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)

    def _use_shift_mu(self) -> bool:
        return True  # FluxPipeline always passes mu; a scheduler without dynamic shifting ignores it

    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor | float,
        conditioning: dict[str, torch.Tensor],
        guidance_scale: float,
        denoiser: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The velocity in float32 for packed latents. `timesteps` are the scheduler's values (sigma * 1000);
        FLUX's transformer reads sigma, so they are divided by 1000 here, in the transformer's dtype as diffusers."""
        transformer = denoiser or self.transformer
        image_ids = conditioning["img_ids"]
        if latents.ndim != 3 or image_ids.shape[-2] != latents.shape[1]:
            raise ValueError(
                f"height/width: latents {tuple(latents.shape)} do not match the {image_ids.shape[-2]} image tokens "
                f"the conditioning was encoded for (encode_prompt at the sampling size)"
            )
        dtype = self.denoiser_dtype
        timesteps = self._timesteps_per_sample(timesteps, latents).to(dtype) / 1000
        embeds = conditioning["prompt_embeds"]
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((len(latents),), guidance_scale, device=latents.device, dtype=torch.float32)
        text_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=image_ids.dtype)
        return transformer(
            hidden_states=latents.to(dtype),
            timestep=timesteps,
            guidance=guidance,
            pooled_projections=conditioning["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=text_ids,
            img_ids=image_ids[0],
            return_dict=False,
        )[0].float()

    def decode(self, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """Packed latents -> float32 images [B, 3, H, W] in [0, 1] (a graph to `latents` when grad is on).

        The packing drops the aspect ratio: without `height`/`width` the image is taken to be square."""
        tokens = latents.shape[1]
        if height is None or width is None:
            side = round(tokens**0.5)
            if side * side != tokens:
                raise ValueError(f"height/width: {tokens} image tokens are not a square; pass the sampling size")
            height = width = side * 2 * self.pipeline.vae_scale_factor
        if self.latent_shape(len(latents), height, width)[1] != tokens:
            raise ValueError(f"height/width: {height}x{width} does not give the latents' {tokens} image tokens")
        unpacked = self.pipeline._unpack_latents(latents, height, width, self.pipeline.vae_scale_factor)
        return self._decode_unpacked(unpacked)
