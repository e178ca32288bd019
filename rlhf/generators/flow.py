"""What the flow-matching families (SD3/3.5, FLUX.1) share as policies: a LoRA on the transformer's attention,
the stochastic step with its log-prob (Flow-GRPO's SDE, DanceGRPO's SDE or CPS), the resolution-shifted
schedule, VAE decoding, and export in diffusers' LoRA format.

A family subclass adds only what differs: its pipeline class, how prompts become conditioning, the latent layout
the transformer reads, and one transformer call (`predict`).
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from peft.utils import get_peft_model_state_dict

from rlhf.generators.flow_scheduling import (
    cps_step_with_logprob,
    dance_sde_step_with_logprob,
    flow_sde_step_with_logprob,
    flow_sigmas,
)
from rlhf.generators.base import LORA_WEIGHT_NAME, GeneratorAdapter, StepResult

#: the `sde_type` names and the step each one takes (see rlhf/generators/flow_scheduling.py)
SDE_STEPS: dict[str, Callable[..., StepResult]] = {
    "flow_sde": flow_sde_step_with_logprob,  # Flow-GRPO
    "dance": dance_sde_step_with_logprob,  # DanceGRPO
    "cps": cps_step_with_logprob,  # coefficients-preserving sampling
}

#: the transformer's attention projections, image and text streams (Flow-GRPO's SD3 LoRA targets)
DEFAULT_FLOW_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
)


class FlowMatchingAdapter(GeneratorAdapter):
    """A diffusers flow-matching pipeline (its transformer sampled with `FlowMatchEulerDiscreteScheduler`) as a policy.

    Timesteps are the scheduler's own values (`scheduler.timesteps`, i.e. sigma * 1000 after the shift) everywhere:
    `set_timesteps` returns them, `predict` and `step` take them (one per call or one per sample); a family whose
    transformer reads another scale (FLUX: sigma) converts inside `predict`.

    Args:
        pipeline: a pipeline of the subclass's `pipeline_class`.
        use_lora: train a LoRA on the transformer's attention (peft's `transformer.add_adapter`); otherwise the
            whole transformer is trainable.
        lora_rank, lora_alpha, lora_target_modules: the adapter's shape; ignored when the transformer already
            carries an adapter (one loaded by `from_pretrained` from a saved policy).
        lora_seed: seeds the adapter's random initialisation (LoRA B starts at zero: the policy starts as the base).
        sde_type: the stochastic step `step` takes: "flow_sde" (Flow-GRPO), "dance" (DanceGRPO) or "cps".
        max_sequence_length: T5's padded prompt length (the diffusers pipeline's default when None).
        base_model, base_revision: where the pipeline came from, recorded next to saved LoRA weights.
    """

    #: `max_shift` of the family's `calculate_shift` when the scheduler config does not set it (SD3 1.16, FLUX 1.15)
    default_max_shift: ClassVar[float]
    #: T5's padded prompt length in the diffusers pipeline's `__call__`
    default_max_sequence_length: ClassVar[int]

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        *,
        use_lora: bool = True,
        lora_rank: int = 4,
        lora_alpha: float = 4.0,
        lora_target_modules: Sequence[str] = DEFAULT_FLOW_LORA_TARGETS,
        lora_seed: int = 0,
        sde_type: str = "flow_sde",
        max_sequence_length: int | None = None,
        base_model: str = "",
        base_revision: str = "main",
    ) -> None:
        if not isinstance(pipeline, self.pipeline_class):
            raise TypeError(
                f"pipeline: expected a diffusers {self.pipeline_class.__name__}, got {type(pipeline).__name__}"
            )
        if not isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler):
            raise TypeError(
                f"pipeline.scheduler: expected a FlowMatchEulerDiscreteScheduler (the steps with log-prob read its "
                f"sigmas), got {type(pipeline.scheduler).__name__}"
            )
        if sde_type not in SDE_STEPS:
            raise ValueError(f"sde_type: expected one of {sorted(SDE_STEPS)}, got {sde_type!r}")
        self.pipeline = pipeline
        self.use_lora = use_lora
        self.sde_type = sde_type
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.base_model = base_model
        self.base_revision = base_revision
        self._set_up_policy(use_lora, lora_rank, lora_alpha, lora_target_modules, lora_seed)

    # ---- components ---------------------------------------------------------------------------------------

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def step_function(self) -> Callable[..., StepResult]:
        """The `rlhf.generators.flow_scheduling` step `sde_type` names."""
        return SDE_STEPS[self.sde_type]

    # ---- the policy ---------------------------------------------------------------------------------------

    def _save_lora_weights(self, output_dir: Path) -> None:
        layers = get_peft_model_state_dict(self.transformer)
        self.pipeline_class.save_lora_weights(
            output_dir,
            transformer_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in layers.items()},
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
            weight_name=LORA_WEIGHT_NAME,
        )

    # ---- the schedule and the step ------------------------------------------------------------------------

    @abstractmethod
    def image_seq_len(self, height: int, width: int) -> int:
        """The transformer's image token count at this size (what the resolution-dependent shift reads)."""

    def _schedule_sigmas(self, num_inference_steps: int) -> np.ndarray | None:
        """Sigmas to hand the scheduler (None: its own linear spacing)."""
        return None

    def _use_shift_mu(self) -> bool:
        """Whether the family's pipeline passes `mu` (the resolution-dependent shift) to the scheduler."""
        return bool(self.scheduler.config.get("use_dynamic_shifting", False))

    def set_timesteps(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """The schedule the family's diffusers pipeline uses at this resolution: with dynamic shifting, `mu` from the
        image token count (`calculate_shift` over the scheduler config's base/max sequence lengths and shifts)."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected at least 1, got {num_inference_steps}")
        tokens = self.image_seq_len(height, width)
        kwargs: dict[str, Any] = {}
        if self._use_shift_mu():
            config = self.scheduler.config
            kwargs["mu"] = calculate_shift(
                tokens,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", self.default_max_shift),
            )
        sigmas = self._schedule_sigmas(num_inference_steps)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, self.device, sigmas=sigmas, **kwargs)
        return timesteps

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        *,
        noise_level: float,
        prev_sample: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> StepResult:
        """The `sde_type` step at the scheduler's `timestep` (one, or one per sample); `noise_level` 0 is
        diffusers' Euler ODE step."""
        return self.step_function(
            self.scheduler, model_output, timestep, sample, noise_level=noise_level, prev_sample=prev_sample,
            generator=generator,
        )

    def predicted_clean(
        self, model_output: torch.Tensor, timestep: torch.Tensor | float, sample: torch.Tensor
    ) -> torch.Tensor:
        """x0-hat = sample - sigma * v in float32 (the flow path x = (1 - sigma) x0 + sigma noise, v = noise - x0),
        in the sample's layout (packed for FLUX)."""
        sigma, _ = flow_sigmas(self.scheduler, timestep, sample)
        return sample.float() - sigma * model_output.float()

    # ---- the denoising objective: rectified flow matching, as SD3 and FLUX.1 were trained ------------------------

    def training_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` timesteps as diffusers' SD3/FLUX training scripts draw them (`weighting_scheme="logit_normal"`,
        mean 0, std 1: Esser et al. 2024's choice): u = sigmoid(n), n ~ N(0, 1), picks the index round-down(u * N)
        of the scheduler's N training timesteps (its config's `shift` applied, the schedule it was trained on)."""
        u = torch.sigmoid(torch.randn(count, generator=generator))
        indices = (u * self.scheduler.config.num_train_timesteps).long()
        return self._training_schedule()[indices]

    def _training_schedule(self) -> torch.Tensor:
        """The N training timesteps (sigma * N), from the scheduler's config as a fresh scheduler sets them (the
        pipeline's scheduler holds the sampling schedule instead)."""
        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config).timesteps

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The flow path (1 - sigma) x0 + sigma noise at sigma = timestep / num_train_timesteps (what the flow
        scheduler's timesteps are), any timestep, one or one per sample."""
        sigma = self._sigmas(timestep, clean)
        return (1 - sigma) * clean + sigma * noise

    def training_target(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The velocity noise - x0, which the transformer predicts (rectified flow)."""
        return noise - clean

    def _sigmas(self, timestep: torch.Tensor | float, latents: torch.Tensor) -> torch.Tensor:
        """sigma = timestep / num_train_timesteps, one per sample, shaped to broadcast over `latents`."""
        sigma = self._timesteps_per_sample(timestep, latents).float() / self.scheduler.config.num_train_timesteps
        return sigma.reshape(-1, *[1] * (latents.ndim - 1))

    # ---- helpers for the families -------------------------------------------------------------------------

    def _check_size(self, height: int, width: int, multiple: int) -> None:
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(
                f"height/width: expected positive multiples of {multiple} for this model, got {height}x{width}"
            )

    def _decode_unpacked(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] latents -> float32 images [B, 3, H, W] in [0, 1] (the pipeline's shift and scale undone);
        with grad enabled the graph reaches `latents` (reward back-propagation decodes through it)."""
        vae = self.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @staticmethod
    def _prompt_list(prompts: Sequence[str], field: str = "prompts") -> list[str]:
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{field}: expected a non-empty list of strings, got {prompts!r}")
        return list(prompts)
