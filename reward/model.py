"""RewardModel: one base VLM with named reward perspectives (LoRA + SkipCA + head each); score, save, load."""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .backbones import Backbone, PixelInputs, TextInputs
from .inputs import ImageBatch, load_images, validate_prompts
from .skipca import RewardHead

CONFIG_NAME = "reward_model.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PerspectiveConfig:
    """How one perspective reads the base model.

    name: the perspective's name (e.g. "alignment").
    lora_r / lora_alpha / lora_dropout: its LoRA adapter on the language model's Linear layers (16 / 32 / 0.05).
    hidden_layer: which hidden state of the reward token is read (-1, the last).
    skipca_heads: attention heads of its SkipCA (1, as in the paper).
    train_projector: whether it owns (and may fine-tune) a copy of the vision-language projector (False).
    """

    name: str
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    hidden_layer: int = -1
    skipca_heads: int = 1
    train_projector: bool = False


class RewardModel(nn.Module):
    """LLaVA-Reward: scores images against prompts from the VLM's hidden state at an appended reward token."""

    def __init__(self, backbone: Backbone, base: str, max_batch_size: int = 16, dtype: str = "float32"):
        super().__init__()
        self.backbone = backbone
        self.base = base
        self.max_batch_size = max_batch_size
        self.dtype_name = dtype
        self.configs: dict[str, PerspectiveConfig] = {}
        self.heads = nn.ModuleDict()
        self.projectors = nn.ModuleDict()
        self.peft_model: nn.Module | None = None
        self.lora_targets = ""

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, path_or_id: str | Path, perspectives: Sequence[str | PerspectiveConfig] = ("overall",),
                      dtype: str = "float32", device: str = "cpu", max_batch_size: int = 16,
                      max_prompt_tokens: int = 256, seed: int = 0, **options) -> "RewardModel":
        """New perspectives on a base VLM. `options` (lora_r, lora_alpha, lora_dropout, hidden_layer,
        skipca_heads, train_projector) apply to every perspective given by name."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        if not perspectives:
            raise ValueError("perspectives: expected at least one perspective name")
        backbone = Backbone.from_pretrained(path_or_id, _DTYPES[dtype], device, max_prompt_tokens)
        model = cls(backbone, str(path_or_id), max_batch_size, dtype)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for perspective in perspectives:
                config = perspective if isinstance(perspective, PerspectiveConfig) else \
                    PerspectiveConfig(name=perspective, **options)
                model.add_perspective(config)
        return model

    def add_perspective(self, config: PerspectiveConfig) -> None:
        """Attach a fresh LoRA adapter, SkipCA and head under `config.name`."""
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", config.name):
            raise ValueError(f"perspectives: name {config.name!r} must be letters, digits, '_' or '-'")
        if config.name in self.configs:
            raise ValueError(f"perspectives: {config.name!r} already exists")
        if self.peft_model is None:  # found before LoRA wraps the Linear layers and renames them
            self.lora_targets = self.backbone.lora_target_regex()
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=self.lora_targets,
        )
        if self.peft_model is None:
            with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; not ours to fix
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                self.peft_model = get_peft_model(self.backbone.model, lora, adapter_name=config.name)
        else:
            self.peft_model.add_adapter(config.name, lora)
        device = self.backbone.device
        self.heads[config.name] = RewardHead(self.backbone.hidden_size, config.skipca_heads).to(device)
        if config.train_projector:
            self.projectors[config.name] = copy.deepcopy(self.backbone.projector()).float()
        self.configs[config.name] = config

    @property
    def perspectives(self) -> list[str]:
        return list(self.configs)

    # -- scoring --------------------------------------------------------------------------------------------
    def score(self, images: ImageBatch, prompts: Sequence[str], perspectives: Sequence[str] | None = None
              ) -> dict[str, torch.Tensor]:
        """One 1-D float32 tensor per perspective. Float pixel tensors that require grad stay differentiable."""
        names = self._check_perspectives(perspectives)
        loaded = load_images(images)
        prompts = validate_prompts(prompts, len(loaded))
        differentiable = isinstance(loaded, torch.Tensor) and loaded.requires_grad
        was_training = self.training
        self.eval()
        try:
            with torch.set_grad_enabled(differentiable):
                chunks = [self._score_chunk(loaded[i: i + self.max_batch_size], prompts[i: i + self.max_batch_size],
                                            names, mixed=True)
                          for i in range(0, len(prompts), self.max_batch_size)]
        finally:
            self.train(was_training)
        return {name: torch.cat([chunk[name] for chunk in chunks]) for name in names}

    def forward(self, images: ImageBatch, prompts: Sequence[str], perspective: str) -> torch.Tensor:
        """Training forward of one perspective (its adapter made active): a 1-D tensor of scores with a graph."""
        names = self._check_perspectives([perspective])
        loaded = load_images(images)
        prompts = validate_prompts(prompts, len(loaded))
        self.peft_model.set_adapter(perspective)
        return self._score_chunk(loaded, prompts, names, mixed=False)[perspective]

    def _check_perspectives(self, perspectives: Sequence[str] | None) -> list[str]:
        if perspectives is None:
            return self.perspectives
        if isinstance(perspectives, str):
            perspectives = [perspectives]
        unknown = [p for p in perspectives if p not in self.configs]
        if unknown or not perspectives:
            raise ValueError(f"perspectives: unknown {unknown or 'empty list'}; this model has {self.perspectives}")
        return list(perspectives)

    def _pixel_inputs(self, images: list | torch.Tensor) -> PixelInputs:
        if isinstance(images, torch.Tensor):
            return self.backbone.pixel_inputs_differentiable(images.to(self.backbone.device))
        return self.backbone.pixel_inputs(images)

    def _score_chunk(self, images, prompts: list[str], names: list[str], mixed: bool) -> dict[str, torch.Tensor]:
        backbone = self.backbone
        pixels = self._pixel_inputs(images)
        projector_input, shared = backbone.encode_images(pixels)
        text = backbone.text_inputs(prompts, [f.shape[0] for f in shared])
        if text.truncated:
            warnings.warn(f"prompts {text.truncated}: longer than {backbone.max_prompt_tokens} tokens, truncated")
        input_ids = text.input_ids.to(backbone.device)
        base_embeds = backbone.model.get_input_embeddings()(input_ids)
        image_slots = (input_ids == backbone.image_token_id).unsqueeze(-1).expand_as(base_embeds)
        visual, embeds = {}, []
        for name in names:
            features = backbone.project(self.projectors[name], projector_input.float(), pixels) \
                if name in self.projectors else shared
            visual[name] = features
            flat = torch.cat(features).to(base_embeds.dtype)
            embeds.append(base_embeds.masked_scatter(image_slots, flat))
        repeat = len(names)
        kwargs = dict(
            inputs_embeds=torch.cat(embeds),
            attention_mask=text.attention_mask.to(backbone.device).repeat(repeat, 1),
            output_hidden_states=True,
            logits_to_keep=1,
        )
        position_ids = backbone.position_ids(text, pixels)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids.repeat(*([1] * (position_ids.ndim - 2)), repeat, 1)
        if mixed:
            kwargs["adapter_names"] = [name for name in names for _ in prompts]
        hidden_states = self.peft_model(**kwargs).hidden_states
        rows = torch.arange(len(prompts), device=backbone.device)
        positions = text.reward_positions.to(backbone.device)
        scores = {}
        for i, name in enumerate(names):
            hidden = hidden_states[self.configs[name].hidden_layer][i * len(prompts): (i + 1) * len(prompts)]
            query = hidden[rows, positions].float()
            keys = pad_sequence([f.float() for f in visual[name]], batch_first=True)
            mask = pad_sequence([torch.ones(len(f), dtype=torch.bool, device=keys.device) for f in visual[name]],
                                batch_first=True)
            scores[name] = self.heads[name](query, keys, mask)
        return scores

    # -- trainable parameters -------------------------------------------------------------------------------
    def trainable_parameters(self, perspective: str) -> dict[str, nn.Parameter]:
        """The parameters a perspective trains: its LoRA, SkipCA and head, and its projector copy if it has one."""
        self._check_perspectives([perspective])
        params = {f"lora.{n}": p for n, p in self.peft_model.named_parameters()
                  if "lora_" in n and f".{perspective}." in f"{n}."}
        params.update({f"head.{n}": p for n, p in self.heads[perspective].named_parameters()})
        if perspective in self.projectors:
            params.update({f"projector.{n}": p for n, p in self.projectors[perspective].named_parameters()})
        return params

    # -- persistence ----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, perspectives: Sequence[str] | None = None) -> Path:
        """Write the base reference and, per perspective, its adapter, SkipCA + head and projector (safetensors)."""
        directory = Path(directory)
        names = self._check_perspectives(perspectives)
        config_path = directory / CONFIG_NAME
        existing = json.loads(config_path.read_text())["perspectives"] if config_path.exists() else {}
        for name in names:
            target = directory / "perspectives" / name
            target.mkdir(parents=True, exist_ok=True)
            lora_state = get_peft_model_state_dict(self.peft_model, adapter_name=name)
            save_file({k: v.detach().float().contiguous().cpu() for k, v in lora_state.items()},
                      target / "adapter_model.safetensors")
            self.peft_model.peft_config[name].save_pretrained(target)
            head = {f"head.{k}": v.detach().cpu().contiguous() for k, v in self.heads[name].state_dict().items()}
            if name in self.projectors:
                head.update({f"projector.{k}": v.detach().cpu().contiguous()
                             for k, v in self.projectors[name].state_dict().items()})
            save_file(head, target / "head.safetensors")
            existing[name] = asdict(self.configs[name])
        base = Path(self.base)
        if base.exists() and base.resolve().is_relative_to(directory.resolve()):
            base = base.resolve().relative_to(directory.resolve())  # a base kept inside moves with the directory
        config = {"base": str(base), "dtype": self.dtype_name, "max_batch_size": self.max_batch_size,
                  "max_prompt_tokens": self.backbone.max_prompt_tokens, "perspectives": existing}
        config_path.write_text(json.dumps(config, indent=2))
        return directory

    def load_perspective(self, source: str | Path, name: str) -> None:
        """Load one saved perspective's weights (adapter, SkipCA + head, projector) into this model in place."""
        source = Path(source)
        set_peft_model_state_dict(self.peft_model, load_file(source / "adapter_model.safetensors"), adapter_name=name)
        head = load_file(source / "head.safetensors")
        self.heads[name].load_state_dict({k[5:]: v for k, v in head.items() if k.startswith("head.")})
        if name in self.projectors:
            self.projectors[name].load_state_dict({k[10:]: v for k, v in head.items() if k.startswith("projector.")})

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint the base model's layers (non-reentrant: its inputs are embeddings we compute ourselves)."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        self.backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """What `transformers.Trainer` calls for `activation_checkpointing=True` (alias `gradient_checkpointing`):
        checkpoint the base model's layers, non-reentrant unless the kwargs say otherwise."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.backbone.model.activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)

    @classmethod
    def from_pretrained(cls, directory: str | Path, base: str | Path | None = None, device: str = "cpu",
                        dtype: str | None = None, perspectives: Sequence[str] | None = None) -> "RewardModel":
        """Load a saved RewardModel; `base` overrides the stored base path (e.g. a checkpoint moved elsewhere)."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise ValueError(f"model: {directory} holds no {CONFIG_NAME}; is it a saved RewardModel directory?")
        config = json.loads(config_path.read_text())
        stored = config["perspectives"]
        names = list(stored) if perspectives is None else list(perspectives)
        unknown = [n for n in names if n not in stored]
        if unknown:
            raise ValueError(f"perspectives: {unknown} not saved in {directory}; it has {list(stored)}")
        inside = directory / config["base"]
        model = cls.from_backbone(base or (inside if inside.exists() else config["base"]), [PerspectiveConfig(**stored[n]) for n in names],
                                  dtype=dtype or config["dtype"], device=device,
                                  max_batch_size=config["max_batch_size"],
                                  max_prompt_tokens=config["max_prompt_tokens"])
        for name in names:
            model.load_perspective(directory / "perspectives" / name, name)
        return model
