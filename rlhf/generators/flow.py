"""What the flow-matching families (SD3/3.5, FLUX.1) share as policies: a LoRA on the transformer's attention,
the stochastic step with its log-prob (Flow-GRPO's SDE, DanceGRPO's SDE or CPS), the resolution-shifted
schedule, VAE decoding, and export in diffusers' LoRA format.

A family subclass adds only what differs: its pipeline class, how prompts become conditioning, the latent layout
the transformer reads, and one transformer call (`predict`).
"""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from rlhf.flow_scheduling import (
    cps_step_with_logprob,
    dance_sde_step_with_logprob,
    flow_sde_step_with_logprob,
    flow_sigmas,
)
from rlhf.generators.base import BASE_MODEL_FILE, LORA_WEIGHT_NAME, GeneratorAdapter, StepResult

#: the `sde_type` names and the step each one takes (see rlhf/flow_scheduling.py)
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

    #: the diffusers pipeline class this family wraps
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    #: `max_shift` of the family's `calculate_shift` when the scheduler config does not set it (SD3 1.16, FLUX 1.15)
    default_max_shift: ClassVar[float]
    #: T5's padded prompt length in the diffusers pipeline's `__call__`
    default_max_sequence_length: ClassVar[int]
    #: the pipeline's text encoders and VAE, frozen
    frozen_component_names: ClassVar[tuple[str, ...]]

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
        for module in self._frozen_modules():
            module.requires_grad_(False)
        transformer = self.transformer
        transformer.requires_grad_(not use_lora)
        if use_lora:
            if not getattr(transformer, "_hf_peft_config_loaded", False):
                # peft draws the initial LoRA A from the global RNG: pin it, so that a run reproduces from its seed
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(lora_seed)
                    transformer.add_adapter(
                        LoraConfig(
                            r=lora_rank,
                            lora_alpha=lora_alpha,
                            init_lora_weights="gaussian",
                            target_modules=list(lora_target_modules),
                        )
                    )
            for name, parameter in transformer.named_parameters():
                parameter.requires_grad_("lora_" in name)
        self.to(dtype=transformer.dtype)

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name: str | Path,
        *,
        revision: str = "main",
        torch_dtype: torch.dtype = torch.float32,
        use_lora: bool = True,
        pipeline_options: dict[str, Any] | None = None,
        **options: Any,
    ) -> "FlowMatchingAdapter":
        """Load the family's pipeline from a path or the Hugging Face cache.

        A directory written by `save_pretrained` with LoRA weights loads its base model, then that LoRA, which
        becomes the trainable adapter (training continues from it). `pipeline_options` go to the diffusers
        pipeline's `from_pretrained` (e.g. `{"text_encoder_3": None, "tokenizer_3": None}`: SD3 without T5);
        `options` to the constructor (LoRA shape, `sde_type`, ...).
        """
        source = Path(pretrained_model_name)
        exported_lora = (source / BASE_MODEL_FILE).is_file() and (source / LORA_WEIGHT_NAME).is_file()
        record = json.loads((source / BASE_MODEL_FILE).read_text()) if exported_lora else {}
        base_name = record.get("base_model", str(pretrained_model_name))
        base_revision = record.get("revision", revision)
        pipeline = cls.pipeline_class.from_pretrained(
            base_name, revision=base_revision, dtype=torch_dtype, **(pipeline_options or {})
        )
        if exported_lora:
            pipeline.load_lora_weights(source, weight_name=LORA_WEIGHT_NAME, adapter_name="default")
            use_lora = True
        return cls(pipeline, use_lora=use_lora, base_model=base_name, base_revision=base_revision, **options)

    # ---- components ---------------------------------------------------------------------------------------

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def step_function(self) -> Callable[..., StepResult]:
        """The `rlhf.flow_scheduling` step `sde_type` names."""
        return SDE_STEPS[self.sde_type]

    def _frozen_modules(self) -> list[torch.nn.Module]:
        return [
            getattr(self.pipeline, name)
            for name in self.frozen_component_names
            if getattr(self.pipeline, name, None) is not None
        ]

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.pipeline.set_progress_bar_config(**kwargs)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "FlowMatchingAdapter":
        """Move every component; frozen weights take `dtype` (a `force_upcast` VAE stays float32 under fp16),
        trainable ones stay float32 (fp16/bf16 trainable weights lose Adam's small updates and break accelerate's
        gradient unscaling)."""
        trainable = {parameter: parameter.data.float() for parameter in self.trainable_parameters()}
        for module in (self.denoiser, *self._frozen_modules()):
            module.to(device=device)
            if dtype is None:
                continue
            # a VAE whose config asks `force_upcast` overflows to NaN in fp16: it stays float32
            upcast = module is self.vae and getattr(module.config, "force_upcast", False) and dtype == torch.float16
            target = torch.float32 if upcast else dtype
            if module.dtype != target:  # a no-op cast still makes diffusers warn
                module.to(dtype=target)
        for parameter, data in trainable.items():
            parameter.data = data.to(parameter.device)
        return self

    # ---- the policy ---------------------------------------------------------------------------------------

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights (the adapter in peft's naming, or the whole transformer)."""
        state = get_peft_model_state_dict(self.denoiser) if self.use_lora else self.denoiser.state_dict()
        return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}

    def load_policy_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if not self.use_lora:
            self.denoiser.load_state_dict(state_dict)
            return
        expected = set(get_peft_model_state_dict(self.denoiser))
        if set(state_dict) != expected:
            missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
            raise ValueError(
                f"LoRA state dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]} for this "
                f"transformer's adapter"
            )
        set_peft_model_state_dict(self.denoiser, state_dict)

    def save_pretrained(self, output_dir: str | Path, is_main_process: bool = True) -> None:
        """The LoRA in diffusers' format (`pytorch_lora_weights.safetensors`, with its peft config as metadata, so
        that the plain pipeline's `load_lora_weights(output_dir)` reads it) plus the base model's name; without
        LoRA, the whole pipeline."""
        if not is_main_process:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if not self.use_lora:
            self.pipeline.save_pretrained(output_dir)
            return
        layers = get_peft_model_state_dict(self.transformer)
        self.pipeline_class.save_lora_weights(
            output_dir,
            transformer_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in layers.items()},
            transformer_lora_adapter_metadata=self.transformer.peft_config["default"].to_dict(),
            weight_name=LORA_WEIGHT_NAME,
        )
        record = {"base_model": self.base_model, "revision": self.base_revision}
        (output_dir / BASE_MODEL_FILE).write_text(json.dumps(record, indent=2))

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

    # ---- helpers for the families -------------------------------------------------------------------------

    def _timesteps_per_sample(self, timesteps: torch.Tensor | float, latents: torch.Tensor) -> torch.Tensor:
        """[N] timesteps on the latents' device, from one timestep or one per sample."""
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.ndim == 0:
            return timesteps.expand(len(latents))
        if timesteps.shape != (len(latents),):
            raise ValueError(
                f"timesteps: expected one timestep or one per sample ({len(latents)}), "
                f"got shape {tuple(timesteps.shape)}"
            )
        return timesteps

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
