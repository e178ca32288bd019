"""The one interface every fine-tunable text-to-image generator offers the algorithms (DDPO, GRPO, Diffusion-DPO,
reward back-propagation, search): prompts in, a denoiser to train, one stochastic step with its log-prob, the
denoising objective on noised images, images out (and back into latents)."""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

# diffusers' file name for LoRA weights, which every pipeline's `load_lora_weights(directory)` looks for
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# written next to a saved LoRA so that `from_pretrained(directory)` knows which base model it belongs to
BASE_MODEL_FILE = "ddpo_base_model.json"
# (prev_sample, log_prob [B], step mean (float32), step std (float32, broadcastable over the sample))
StepResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class GeneratorAdapter(ABC):
    """A diffusers pipeline seen as a policy. One subclass per family (SD 1.x/2.x and SDXL, SD3/3.5, FLUX.1).

    Conventions every implementation keeps:
    - `conditioning` is a dict of batch-first tensors (one row per sample), so a trainer can index, concatenate
      and repeat it without knowing the family; guidance halves, if any, are separate keys in the same dict.
    - latents are float32 in the layout the denoiser reads (FLUX: packed [B, tokens, channels]).
    - `predict` returns the denoiser's output in float32, guidance already applied; `step` reads it.
    - `step` draws the next latents (or scores a given `prev_sample`) and returns `StepResult`; `noise_level`
      is the family's stochasticity knob (DDIM's eta, the flow SDE's noise level); 0 is the deterministic sampler.
    - every random draw comes from the `generator` passed in, so a call reproduces from its seed.
    """

    #: diffusers pipeline wrapped (its components are the ones used)
    pipeline: Any
    #: whether the denoiser carries a trainable LoRA adapter (otherwise the whole denoiser is trained)
    use_lora: bool
    #: the name or path (and revision) the base model came from, recorded next to saved LoRA weights
    base_model: str
    base_revision: str
    #: the pipeline's components that stay frozen (text encoders, VAE)
    frozen_component_names: ClassVar[tuple[str, ...]] = ()
    #: the diffusers class that loads the family's pipelines (`DiffusionPipeline` reads it from model_index.json)
    pipeline_class: ClassVar[type[DiffusionPipeline]] = DiffusionPipeline
    #: the dtype the denoiser computes in (its frozen weights'), recorded by `to`
    denoiser_dtype: torch.dtype

    # ---- construction (shared by every family) --------------------------------------------------------------

    def _set_up_policy(
        self, use_lora: bool, lora_rank: int, lora_alpha: float, lora_target_modules: Sequence[str], lora_seed: int
    ) -> None:
        """Freeze all but the policy: a LoRA on the denoiser (kept as it is when the denoiser already carries one,
        e.g. loaded from a saved policy), or the whole denoiser; then trainable weights float32 (see `to`)."""
        for module in self._frozen_modules():
            module.requires_grad_(False)
        denoiser = self.denoiser
        denoiser.requires_grad_(not use_lora)
        if use_lora:
            if not getattr(denoiser, "_hf_peft_config_loaded", False):
                # peft draws the initial LoRA A from the global RNG: pin it, so that a run reproduces from its seed
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(lora_seed)
                    denoiser.add_adapter(
                        LoraConfig(
                            r=lora_rank,
                            lora_alpha=lora_alpha,
                            init_lora_weights="gaussian",
                            target_modules=list(lora_target_modules),
                        )
                    )
            for name, parameter in denoiser.named_parameters():
                parameter.requires_grad_("lora_" in name)
        self.to(dtype=denoiser.dtype)

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
    ) -> "GeneratorAdapter":
        """Load the family's pipeline from a path or the Hugging Face cache.

        A directory written by `save_pretrained` with LoRA weights loads its base model, then that LoRA, which
        becomes the trainable adapter (training continues from it). `pipeline_options` go to the diffusers
        pipeline's `from_pretrained` (e.g. `{"text_encoder_3": None, "tokenizer_3": None}`: SD3 without T5);
        `options` to the constructor (LoRA shape, a flow family's `sde_type`, ...).
        """
        base_name, base_revision, saved_policy = cls.saved_policy_source(pretrained_model_name, revision)
        pipeline = cls.pipeline_class.from_pretrained(
            base_name, revision=base_revision, dtype=torch_dtype, **(pipeline_options or {})
        )
        if saved_policy:
            pipeline.load_lora_weights(pretrained_model_name, weight_name=LORA_WEIGHT_NAME, adapter_name="default")
            use_lora = True
        return cls(pipeline, use_lora=use_lora, base_model=base_name, base_revision=base_revision, **options)

    @staticmethod
    def saved_policy_source(pretrained_model_name: str | Path, revision: str) -> tuple[str, str, bool]:
        """(base model, its revision, whether `pretrained_model_name` is a directory `save_pretrained` wrote with
        LoRA weights, whose base model must be loaded first)."""
        source = Path(pretrained_model_name)
        saved = (source / BASE_MODEL_FILE).is_file() and (source / LORA_WEIGHT_NAME).is_file()
        record = json.loads((source / BASE_MODEL_FILE).read_text()) if saved else {}
        return record.get("base_model", str(pretrained_model_name)), record.get("revision", revision), saved

    # ---- components --------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def denoiser(self) -> torch.nn.Module:
        """The module the algorithms train: the UNet or the transformer."""

    @property
    def scheduler(self) -> Any:
        return self.pipeline.scheduler

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    @property
    def device(self) -> torch.device:
        # diffusers' `ModelMixin.device` first walks every module of the denoiser for a group-offloading hook
        # (~2 ms a call, several calls per sampling batch: ~5% of a tiny-pipeline sampling call); a trained policy
        # is never group-offloaded, so the answer is its parameters' device, where diffusers looks next
        return next(self.denoiser.parameters()).device

    def _frozen_modules(self) -> list[torch.nn.Module]:
        names = self.frozen_component_names
        return [getattr(self.pipeline, n) for n in names if getattr(self.pipeline, n, None) is not None]

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.pipeline.set_progress_bar_config(**kwargs)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "GeneratorAdapter":
        """Move every component; frozen weights take `dtype`, trainable ones stay float32.

        Trainable parameters in fp16 would underflow in Adam and break accelerate's gradient unscaling; a VAE
        whose config asks `force_upcast` (SDXL's) stays float32, since it overflows to NaN in fp16.
        """
        # trainable weights keep their float32 values exactly: never round-tripped through a lower precision
        trainable = {parameter: parameter.data.float() for parameter in self.trainable_parameters()}
        for module in (self.denoiser, *self._frozen_modules()):
            module.to(device=device)
        if dtype is not None:
            for module in (self.denoiser, *self._frozen_modules()):
                upcast = module is self.vae and getattr(module.config, "force_upcast", False) and dtype == torch.float16
                target = torch.float32 if upcast else dtype
                if module.dtype != target:  # a no-op cast still makes diffusers warn
                    module.to(dtype=target)
        for parameter, data in trainable.items():
            parameter.data = data.to(parameter.device)
        # what `predict` casts its inputs to; diffusers' `dtype` walks every module, too slow for once per step
        self.denoiser_dtype = self.denoiser.dtype
        return self

    @property
    @abstractmethod
    def default_size(self) -> int:
        """The image side (pixels) the denoiser was configured for."""

    # ---- prompts, latents, the denoiser --------------------------------------------------------------------

    @abstractmethod
    def encode_prompt(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None = None,
        *,
        guidance: bool = True,
        height: int | None = None,
        width: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample conditioning for `predict`; the unconditional half only when `guidance` (a family without
        classifier-free guidance, FLUX.1-dev, ignores it)."""

    @abstractmethod
    def latent_shape(self, batch_size: int, height: int, width: int) -> tuple[int, ...]:
        """The shape of the initial noise for `batch_size` images of `height` x `width` pixels; a clear
        `ValueError` naming height/width when the size does not fit the model."""

    @property
    def init_noise_sigma(self) -> float:
        """What standard-normal noise is multiplied by to become the first latents (1 for flow schedulers)."""
        return float(getattr(self.scheduler, "init_noise_sigma", 1.0))

    def initial_latents(
        self, batch_size: int, height: int, width: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Initial noise (float32), scaled as the scheduler expects."""
        shape = self.latent_shape(batch_size, height, width)
        noise = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        return noise * self.init_noise_sigma

    @torch.no_grad()
    def prepare_sampling(
        self,
        prompt: str | Sequence[str] | None,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        **encode_options: Any,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """What every sampling loop starts from: (conditioning, scaled initial latents, timesteps).

        Prompts repeat `num_images_per_prompt` times each; a single negative prompt applies to all; guidance is
        on when `guidance_scale > 1`. `encode_options` (e.g. SD's `prompt_embeds`) go to `encode_prompt` when set.
        """
        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        if prompts is not None:
            prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        encode_options = {key: value for key, value in encode_options.items() if value is not None}
        if prompts is None and "prompt_embeds" not in encode_options:
            raise ValueError("prompt: pass prompts or prompt_embeds")
        batch_size = len(prompts) if prompts is not None else len(encode_options["prompt_embeds"])
        negatives = None
        if negative_prompt is not None:
            negatives = [negative_prompt] * batch_size if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != batch_size:
                negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
            if len(negatives) != batch_size:
                raise ValueError(f"negative_prompt: expected one per prompt ({batch_size}), got {len(negative_prompt)}")
        height, width = height or self.default_size, width or self.default_size
        conditioning = self.encode_prompt(
            prompts, negatives, guidance=guidance_scale > 1.0, height=height, width=width, **encode_options
        )
        shape = self.latent_shape(batch_size, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        timesteps = self.set_timesteps(num_inference_steps, height, width)
        return conditioning, latents.to(self.device, torch.float32) * self.init_noise_sigma, timesteps

    @abstractmethod
    def set_timesteps(self, num_inference_steps: int, height: int, width: int) -> torch.Tensor:
        """Set the scheduler's timesteps for a sampling run (flow families shift them by resolution) and return
        them in sampling order."""

    @abstractmethod
    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor | float,
        conditioning: dict[str, torch.Tensor],
        guidance_scale: float,
        denoiser: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The (guided) denoiser output in float32 for latents [N, ...] at timesteps (scalar or [N]).

        `denoiser` overrides the module called (a trainer passes its distributed wrapper)."""

    @abstractmethod
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
        """One stochastic step with its log-prob (DDIM for SD, the flow SDE for flow families)."""

    # ---- the denoising objective (Diffusion-DPO's, and any loss on noised data) --------------------------------

    def training_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` timesteps [count] drawn from `generator` as the family's pre-training drew them: uniform over
        the scheduler's `num_train_timesteps` (DDPM-family schedulers)."""
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (count,), generator=generator)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Clean latents noised to `timestep` (one, or one per sample) by the scheduler's forward process."""
        return self.scheduler.add_noise(clean, noise, self._timesteps_per_sample(timestep, clean))

    def training_target(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """What `predict` is trained to output for `add_noise(clean, noise, timestep)`: by the scheduler's
        `prediction_type`, the noise (epsilon), the velocity (v) or the clean latents (sample)."""
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.scheduler.get_velocity(clean, noise, self._timesteps_per_sample(timestep, clean))
        if prediction_type == "sample":
            return clean
        raise ValueError(f"scheduler prediction_type: expected epsilon, v_prediction or sample, got {prediction_type}")

    @staticmethod
    def _timesteps_per_sample(timesteps: torch.Tensor | float, latents: torch.Tensor) -> torch.Tensor:
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

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] (the VAE's range) -> float32 latents in the layout `predict` reads: the
        VAE posterior's mode (the same image always gives the same latents), shifted and scaled as the pipeline
        does before denoising."""
        vae = self.vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:  # SD3, FLUX (SD's VAE has none)
            latents = latents - shift
        return (latents * vae.config.scaling_factor).float()

    def predicted_clean(
        self, model_output: torch.Tensor, timestep: torch.Tensor | float, sample: torch.Tensor
    ) -> torch.Tensor:
        """The clean latents (x0-hat) the model output implies at this step, what FK steering scores mid-run.

        A family that cannot tell says so by name rather than guessing."""
        raise NotImplementedError(f"{type(self).__name__}: predicted_clean (x0-hat) is not available for this family")

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> float32 images [B, 3, H, W] in [0, 1]; with grad enabled the graph reaches `latents`
        (reward back-propagation decodes through it)."""

    # ---- the policy ----------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference_policy(self) -> Iterator[None]:
        """Within this context the denoiser runs without its LoRA: the reference policy, with no second copy."""
        if not self.use_lora:
            raise ValueError("kl_coef: a reference policy needs use_lora=True (the base denoiser is the reference)")
        self.denoiser.disable_adapters()
        try:
            yield
        finally:
            self.denoiser.enable_adapters()

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights (the adapter in peft's naming, or the whole denoiser): what a checkpoint stores."""
        state = get_peft_model_state_dict(self.denoiser) if self.use_lora else self.denoiser.state_dict()
        return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}

    def load_policy_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Inverse of `policy_state_dict`; an error naming the keys when they do not match."""
        if not self.use_lora:
            self.denoiser.load_state_dict(state_dict)
            return
        expected = set(get_peft_model_state_dict(self.denoiser))
        if set(state_dict) != expected:
            missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
            raise ValueError(
                f"LoRA state dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]} for this "
                f"{type(self.denoiser).__name__}'s adapter"
            )
        set_peft_model_state_dict(self.denoiser, state_dict)

    def save_pretrained(self, output_dir: str | Path, is_main_process: bool = True) -> None:
        """The LoRA in diffusers' format (`pytorch_lora_weights.safetensors` with its peft config as metadata,
        what the plain pipeline's `load_lora_weights(output_dir)` reads) plus the base model's name, which
        `from_pretrained(output_dir)` reads back; without LoRA, the whole pipeline."""
        if not is_main_process:
            return
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        if not self.use_lora:
            self.pipeline.save_pretrained(output_dir)
            return
        self._save_lora_weights(output_dir)
        record = {"base_model": self.base_model, "revision": self.base_revision}
        (output_dir / BASE_MODEL_FILE).write_text(json.dumps(record, indent=2))

    @abstractmethod
    def _save_lora_weights(self, output_dir: Path) -> None:
        """Write the denoiser's LoRA with the family's pipeline class `save_lora_weights`."""
