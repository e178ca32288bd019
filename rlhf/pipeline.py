"""Stable Diffusion (1.x/2.x, SDXL) sampling that records every latent and DDIM log-prob, or keeps the graph to a
LoRA policy for reward back-propagation."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image

from rlhf.generators.base import GeneratorAdapter, StepResult
from rlhf.scheduling import ddim_posterior, ddim_step_with_logprob

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# written next to an exported LoRA so that `from_pretrained(export_dir)` knows which base model it belongs to
BASE_MODEL_FILE = "ddpo_base_model.json"
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")


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
class RGBWithGradOutput:
    """What `rgb_with_grad` returns.

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


@dataclass
class DDPOSchedulerOutput:
    """TRL 0.23's return type of `scheduler_step`: the next latents and their log-probs [B]."""

    latents: torch.Tensor
    log_probs: torch.Tensor


class DDPOStableDiffusionPipeline(GeneratorAdapter):
    """A diffusers Stable Diffusion pipeline as a DDPO policy: sampling with log-probs and a trainable LoRA.

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
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.unet.requires_grad_(not use_lora)
        if use_lora:
            if not getattr(self.unet, "_hf_peft_config_loaded", False):
                # peft draws the initial LoRA A from the global RNG: pin it, so that a run reproduces from its seed
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(lora_seed)
                    self.unet.add_adapter(
                        LoraConfig(
                            r=lora_rank,
                            lora_alpha=lora_alpha,
                            init_lora_weights="gaussian",
                            target_modules=list(lora_target_modules),
                        )
                    )
            for name, parameter in self.unet.named_parameters():
                parameter.requires_grad_("lora_" in name)
        self.to(dtype=self.unet.dtype)

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name: str | Path,
        *,
        revision: str = "main",
        torch_dtype: torch.dtype = torch.float32,
        use_lora: bool = True,
        **lora_options: Any,
    ) -> "DDPOStableDiffusionPipeline":
        """Load an SD 1.x/2.x or SDXL pipeline from a path or the Hugging Face cache.

        A directory written by `save_pretrained` with LoRA weights loads its base model, then that LoRA, which
        becomes the trainable adapter (training continues from it).
        """
        source = Path(pretrained_model_name)
        exported_lora = (source / BASE_MODEL_FILE).is_file() and (source / LORA_WEIGHT_NAME).is_file()
        base = json.loads((source / BASE_MODEL_FILE).read_text()) if exported_lora else {}
        base_name = base.get("base_model", str(pretrained_model_name))
        sd_pipeline = DiffusionPipeline.from_pretrained(
            base_name, revision=base.get("revision", revision), dtype=torch_dtype
        )
        if exported_lora:
            sd_pipeline.load_lora_weights(source, weight_name=LORA_WEIGHT_NAME, adapter_name="default")
            use_lora = True
        return cls(
            sd_pipeline,
            use_lora=use_lora,
            base_model=base_name,
            base_revision=base.get("revision", revision),
            **lora_options,
        )

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
    def vae(self) -> torch.nn.Module:
        return self.sd_pipeline.vae

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

    def _frozen_modules(self) -> list[torch.nn.Module]:
        names = ("vae", "text_encoder", "text_encoder_2")
        return [getattr(self.sd_pipeline, n) for n in names if getattr(self.sd_pipeline, n, None) is not None]

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.sd_pipeline.set_progress_bar_config(**kwargs)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "DDPOStableDiffusionPipeline":
        """Move every component; frozen weights take `dtype`, trainable ones stay float32.

        Trainable parameters in fp16 would underflow in Adam and break accelerate's gradient unscaling; a VAE
        whose config asks `force_upcast` (SDXL's) stays float32, since it overflows to NaN in fp16.
        """
        # trainable weights keep their float32 values exactly: never round-tripped through a lower precision
        trainable = {parameter: parameter.data.float() for parameter in self.trainable_parameters()}
        for module in (self.unet, *self._frozen_modules()):
            module.to(device=device)
        if dtype is not None:
            for module in (self.unet, *self._frozen_modules()):
                upcast = module is self.vae and getattr(module.config, "force_upcast", False) and dtype == torch.float16
                target = torch.float32 if upcast else dtype
                if module.dtype != target:  # a no-op cast still makes diffusers warn
                    module.to(dtype=target)
        for parameter, data in trainable.items():
            parameter.data = data.to(parameter.device)
        return self

    # ---- the policy ----------------------------------------------------------------------------------------

    def get_trainable_layers(self) -> torch.nn.Module:
        """The module whose trainable parameters the trainer optimises (TRL 0.23's name): the UNet."""
        return self.unet

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights (the adapter in peft's naming, or the whole UNet): what a checkpoint stores."""
        state = get_peft_model_state_dict(self.unet) if self.use_lora else self.unet.state_dict()
        return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}

    def load_policy_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if not self.use_lora:
            self.unet.load_state_dict(state_dict)
            return
        result = set_peft_model_state_dict(self.unet, state_dict)
        if result.unexpected_keys:
            raise ValueError(f"LoRA state dict: keys {result.unexpected_keys[:5]} do not match this UNet's adapter")

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
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(len(latents))
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
        dtype = self.unet.dtype
        if added is not None:
            added = {k: v.to(dtype) for k, v in added.items()}
        prediction = unet(
            latents.to(dtype), timesteps, encoder_hidden_states=embeds.to(dtype), added_cond_kwargs=added
        ).sample.float()
        if not guided:
            return prediction
        unconditional, conditional = prediction.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

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
        mean, std = ddim_posterior(self.scheduler, model_output, timestep, sample, noise_level)
        prev_sample, log_prob = ddim_step_with_logprob(
            self.scheduler, model_output, timestep, sample, eta=noise_level, prev_sample=prev_sample,
            generator=generator,
        )
        return prev_sample, log_prob, mean, std

    def predicted_clean(self, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor) -> torch.Tensor:
        """DDIM's x0-hat (the scheduler's `pred_original_sample`; a deterministic step draws nothing)."""
        return self.scheduler.step(model_output, timestep, sample, eta=0.0).pred_original_sample

    # ---- sampling ------------------------------------------------------------------------------------------

    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, int, int, int]:
        factor = self.sd_pipeline.vae_scale_factor
        # the UNet halves the latent (len(blocks) - 1) times, so each side must divide by that too
        multiple = factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height % multiple or width % multiple:
            raise ValueError(f"height/width: expected multiples of {multiple} for this model, got {height}x{width}")
        return (batch_size, self.unet.config.in_channels, height // factor, width // factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float32 images [B, 3, H, W] in [0, 1]."""
        return self._decode_latents(latents)

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def _prepare_sampling(
        self,
        prompt: str | Sequence[str] | None,
        height: int | None,
        width: int | None,
        num_inference_steps: int,
        guidance_scale: float,
        negative_prompt: str | Sequence[str] | None,
        num_images_per_prompt: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The conditioning and the scaled initial latents of a sampling call; sets the scheduler's timesteps."""
        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        if prompts is not None:
            prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if prompts is None and prompt_embeds is None:
            raise ValueError("prompt: pass prompts or prompt_embeds")
        batch_size = len(prompts) if prompts is not None else len(prompt_embeds)
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != batch_size:
                negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
            if len(negatives) != batch_size:
                raise ValueError(f"negative_prompt: expected one per prompt ({batch_size}), got {len(negative_prompt)}")
        height, width = height or self.default_size, width or self.default_size
        guidance = guidance_scale > 1.0
        conditioning = self.encode_prompt(
            prompts,
            negatives,
            guidance=guidance,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            height=height,
            width=width,
        )
        shape = self.latent_shape(batch_size, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        return conditioning, latents.to(self.device, torch.float32) * self.scheduler.init_noise_sigma

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
        """Sample images with stochastic DDIM (`eta` > 0), recording every latent and step log-prob.

        Every random draw (initial noise, per-step noise) comes from `generator`, so a call reproduces from
        its seed; without one the global torch RNG is used, as in diffusers. `height`/`width` default to the
        UNet's configured size. Guidance applies when `guidance_scale > 1`.
        """
        conditioning, latents = self._prepare_sampling(
            prompt, height, width, num_inference_steps, guidance_scale, negative_prompt, num_images_per_prompt,
            generator, latents, prompt_embeds, negative_prompt_embeds,
        )
        all_latents, all_log_probs = [latents], []
        with self.sd_pipeline.progress_bar(total=num_inference_steps) as progress:
            for timestep in self.scheduler.timesteps:
                noise_pred = self.predict(latents, timestep, conditioning, guidance_scale)
                latents, log_prob = ddim_step_with_logprob(
                    self.scheduler, noise_pred, timestep, latents, eta=eta, generator=generator
                )
                all_latents.append(latents)
                all_log_probs.append(log_prob)
                progress.update()
        images = self.decode(latents)
        if output_type in ("pil", "np"):
            arrays = (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
            images = [Image.fromarray(a) for a in arrays] if output_type == "pil" else arrays
        elif output_type != "pt":
            raise ValueError(f"output_type: expected 'pt', 'pil' or 'np', got {output_type!r}")
        return DDPOPipelineOutput(images, all_latents, all_log_probs, self.scheduler.timesteps.clone(), conditioning)

    def backprop_steps(
        self,
        num_inference_steps: int,
        *,
        truncated_backprop: bool = True,
        truncated_backprop_rand: bool = True,
        truncated_backprop_timestep: int = 49,
        truncated_rand_backprop_minmax: tuple[int, int] = (0, 50),
    ) -> int:
        """K, how many of the last denoising steps `rgb_with_grad` back-propagates through (TRL 0.23's options).

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
        O(K)). K is `backprop_steps` if given, else `self.backprop_steps(...)` from TRL's truncation options.
        With the same generator and K = N the images equal `__call__`'s; `eta = 0` is deterministic DDIM. Called
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
        if lv_copies < 0:
            raise ValueError(f"lv_copies: expected a count >= 0, got {lv_copies}")
        conditioning, latents = self._prepare_sampling(
            prompt, height, width, num_inference_steps, guidance_scale, negative_prompt, num_images_per_prompt,
            generator, latents, prompt_embeds, negative_prompt_embeds,
        )
        timesteps = self.scheduler.timesteps
        steps = len(timesteps)
        if lv_copies:
            backprop_steps = 0  # the chain runs without a graph; the copies take the graph-building last step
        elif backprop_steps is None:
            backprop_steps = self.backprop_steps(
                steps,
                truncated_backprop=truncated_backprop,
                truncated_backprop_rand=truncated_backprop_rand,
                truncated_backprop_timestep=truncated_backprop_timestep,
                truncated_rand_backprop_minmax=truncated_rand_backprop_minmax,
            )
        elif not 1 <= backprop_steps <= steps:
            raise ValueError(f"backprop_steps: expected K in [1, {steps}], got {backprop_steps}")

        graph_allowed = torch.is_grad_enabled()  # under no_grad this is a plain sampler (eta = 0 included)

        def step(sample: torch.Tensor, timestep: torch.Tensor, step_conditioning: dict[str, torch.Tensor],
                 step_generator: Any, with_grad: bool) -> torch.Tensor:
            with_grad = with_grad and graph_allowed
            with torch.set_grad_enabled(with_grad):
                if with_grad and gradient_checkpoint:
                    noise_pred = torch.utils.checkpoint.checkpoint(
                        self.predict, sample, timestep, step_conditioning, guidance_scale, unet,
                        use_reentrant=False,
                    )
                else:
                    noise_pred = self.predict(sample, timestep, step_conditioning, guidance_scale, unet)
                if eta > 0:
                    return ddim_step_with_logprob(
                        self.scheduler, noise_pred, timestep, sample, eta=eta, generator=step_generator
                    )[0]
                return ddim_posterior(self.scheduler, noise_pred, timestep, sample, eta)[0]

        first_with_grad = steps - backprop_steps
        for index, timestep in enumerate(timesteps):
            latents = step(latents, timestep, conditioning, generator, index >= first_with_grad)
        if lv_copies:
            latents = self._draft_lv_last_step(latents, conditioning, lv_copies, generator, step)
        if decode_checkpoint and latents.requires_grad:
            images = torch.utils.checkpoint.checkpoint(self._decode_latents, latents, use_reentrant=False)
        else:
            with torch.set_grad_enabled(latents.requires_grad):
                images = self._decode_latents(latents)
        return RGBWithGradOutput(images, max(backprop_steps, 1), timesteps.clone(), lv_copies)

    def _draft_lv_last_step(
        self,
        final_latents: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        copies: int,
        generator: torch.Generator | list[torch.Generator] | None,
        step: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        """DRaFT-LV: `copies` re-noisings of each x_0 to the last timestep, each denoised by one graph-building
        step; [B * copies] latents, sample-major."""
        last = self.scheduler.timesteps[-1]
        noise = torch.stack(
            [randn_tensor(final_latents.shape, generator=generator, device=self.device, dtype=torch.float32)
             for _ in range(copies)],
            dim=1,
        ).flatten(0, 1)
        repeated = final_latents.repeat_interleave(copies, dim=0)
        noisy = self.scheduler.add_noise(repeated, noise, last.expand(len(repeated)))
        copy_conditioning = {key: value.repeat_interleave(copies, dim=0) for key, value in conditioning.items()}
        # one generator per image does not cover the copies: their step noise comes from the first generator
        copy_generator = generator[0] if isinstance(generator, list) else generator
        return step(noisy, last, copy_conditioning, copy_generator, True)

    # ---- export --------------------------------------------------------------------------------------------

    def save_pretrained(self, output_dir: str | Path, is_main_process: bool = True) -> None:
        """Write the policy: the LoRA in diffusers format (`pytorch_lora_weights.safetensors`, loadable by a plain
        `StableDiffusionPipeline.load_lora_weights(output_dir)`) plus the base model's name; without LoRA, the
        whole pipeline."""
        if not is_main_process:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if not self.use_lora:
            self.sd_pipeline.save_pretrained(output_dir)
            return
        adapter_config = self.unet.peft_config["default"]
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        type(self.sd_pipeline).save_lora_weights(
            output_dir,
            unet_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in layers.items()},
            unet_lora_adapter_metadata=adapter_config.to_dict(),
        )
        record = {"base_model": self.base_model, "revision": self.base_revision}
        (output_dir / BASE_MODEL_FILE).write_text(json.dumps(record, indent=2))


class DefaultDDPOStableDiffusionPipeline(DDPOStableDiffusionPipeline):
    """TRL 0.23's constructor: `DefaultDDPOStableDiffusionPipeline(pretrained_model_name, use_lora=True)`."""

    def __init__(
        self, pretrained_model_name: str, *, pretrained_model_revision: str = "main", use_lora: bool = True
    ) -> None:
        loaded = DDPOStableDiffusionPipeline.from_pretrained(
            pretrained_model_name, revision=pretrained_model_revision, use_lora=use_lora
        )
        self.__dict__.update(loaded.__dict__)
