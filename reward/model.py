"""RewardModel: one base VLM with named reward perspectives (LoRA + SkipCA + head each); score, save, load."""

from __future__ import annotations

import copy
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from . import official as official_format
from .backbones import Backbone, PixelInputs, TextInputs
from .inputs import ImageBatch, load_images, validate_prompts
from .skipca import OfficialHead, RewardHead, padded_keys

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
    official: empty for our own reading; for a released LLaVA-Reward checkpoint, the official reading it was
        trained with (`reward.official.OfficialReading` as a dict: prompt text, SkipCA keys, head), which
        `RewardModel.from_official` fills in.
    """

    name: str
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    hidden_layer: int = -1
    skipca_heads: int = 1
    train_projector: bool = False
    official: dict = field(default_factory=dict)


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
        if not perspectives:
            raise ValueError("perspectives: expected at least one perspective name")
        model = cls._on_base(path_or_id, dtype, device, max_batch_size, max_prompt_tokens)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for perspective in perspectives:
                config = perspective if isinstance(perspective, PerspectiveConfig) else \
                    PerspectiveConfig(name=perspective, **options)
                model.add_perspective(config)
        return model

    @classmethod
    def _on_base(cls, path_or_id: str | Path, dtype: str, device: str, max_batch_size: int,
                 max_prompt_tokens: int) -> "RewardModel":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
        backbone = Backbone.from_pretrained(path_or_id, _DTYPES[dtype], device, max_prompt_tokens)
        return cls(backbone, str(path_or_id), max_batch_size, dtype)

    @classmethod
    def from_official(cls, checkpoint_dir: str | Path, base: str | Path, perspective: str = "overall",
                      dtype: str = "float32", device: str = "cpu", max_batch_size: int = 16,
                      max_prompt_tokens: int = 256) -> "RewardModel":
        """A released LLaVA-Reward checkpoint (the official directory layout) on its base VLM, as perspective
        `perspective`, scoring as the official code does (see `reward.official`). `load_official` adds more."""
        model = cls._on_base(base, dtype, device, max_batch_size, max_prompt_tokens)
        model.load_official(checkpoint_dir, perspective)
        return model

    def load_official(self, checkpoint_dir: str | Path, perspective: str) -> None:
        """Add a released checkpoint on this model's base as perspective `perspective`."""
        model_type = self.backbone.model.config.model_type
        checkpoint = official_format.read_official_checkpoint(checkpoint_dir, model_type)
        reading = official_format.official_reading(model_type, checkpoint.reward_config)
        lora = checkpoint.lora_config
        self.add_perspective(PerspectiveConfig(
            name=perspective, lora_r=int(lora["r"]), lora_alpha=lora["lora_alpha"],
            lora_dropout=float(lora.get("lora_dropout") or 0.0), train_projector=bool(checkpoint.projector_state),
            official=asdict(reading),
        ))
        where = Path(checkpoint_dir)
        expected = {re.sub(rf"\.{re.escape(perspective)}\.weight$", ".weight", name)
                    for name, _ in self.peft_model.named_parameters() if f".{perspective}." in name}
        missing, unexpected = sorted(expected - set(checkpoint.lora_state)), sorted(set(checkpoint.lora_state) - expected)
        if missing or unexpected:
            self._remove_perspective(perspective)
            raise ValueError(f"{where / 'lora'}: the adapter does not fit this base's language model: "
                             f"{len(missing)} LoRA weights missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                             f"(e.g. {unexpected[:2]})")
        set_peft_model_state_dict(self.peft_model, checkpoint.lora_state, adapter_name=perspective)
        head = self.heads[perspective]
        wanted = head.state_dict()
        absent = sorted(set(wanted) - set(checkpoint.head_state))
        if absent:
            self._remove_perspective(perspective)
            raise ValueError(f"{where / 'pytorch_model.bin'}: missing {absent} (reward_config.yaml says "
                             f"add_cross_attention={checkpoint.reward_config['add_cross_attention']})")
        head.load_state_dict({key: checkpoint.head_state[key] for key in wanted})
        if perspective in self.projectors:
            self.projectors[perspective].load_state_dict(checkpoint.projector_state)

    def _remove_perspective(self, name: str) -> None:
        """Undo `add_perspective` (a perspective whose weights could not be loaded)."""
        self.peft_model.delete_adapter(name)
        del self.configs[name], self.heads[name]
        if name in self.projectors:
            del self.projectors[name]

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
        if config.official:
            reading = official_format.OfficialReading(**config.official)
            head = OfficialHead(self.backbone.hidden_size, reading.skipca, reading.norm_eps, reading.value_head_dim)
        else:
            head = RewardHead(self.backbone.hidden_size, config.skipca_heads)
        self.heads[config.name] = head.to(device)
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
        vector_heads = [name for name in names if self._reading(name) and self._reading(name).general_preference]
        if vector_heads:
            raise ValueError(f"perspectives {vector_heads}: a General Preference head gives each image a vector, "
                             "not a score (the official code scores it only against another image); "
                             "use preference(images_a, images_b, prompts) or head_outputs")
        return {name: value[:, 0] for name, value in self.head_outputs(images, prompts, names).items()}

    def head_outputs(self, images: ImageBatch, prompts: Sequence[str], perspectives: Sequence[str] | None = None
                     ) -> dict[str, torch.Tensor]:
        """Each perspective's head output [B, D]: D = 1 (its score) except a General Preference head's
        `value_head_dim`-vector. Differentiable as `score` is."""
        names = self._check_perspectives(perspectives)
        loaded = load_images(images)
        return self._evaluate(loaded, validate_prompts(prompts, len(loaded)), names)

    def preference(self, images_a: ImageBatch, images_b: ImageBatch, prompts: Sequence[str],
                   perspectives: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """P(image a preferred to image b) per pair and perspective: the General Preference model's
        `sigmoid((a0 b1 - a1 b0) / tau)` for such heads, `sigmoid((a - b) / tau)` for an official Bradley-Terry
        head (its `general_preference_tau`, as the official evaluation computes it), `sigmoid(a - b)` for ours."""
        names = self._check_perspectives(perspectives)
        first, second = load_images(images_a), load_images(images_b)
        if len(first) != len(second):
            raise ValueError(f"images_b: got {len(second)} images for {len(first)} in images_a; expected pairs")
        prompts = validate_prompts(prompts, len(first))
        values_a, values_b = self._evaluate(first, prompts, names), self._evaluate(second, prompts, names)
        probabilities = {}
        for name in names:
            reading = self._reading(name)
            if reading and reading.general_preference:
                probabilities[name] = official_format.general_preference(values_a[name], values_b[name],
                                                                         reading.general_preference_tau)
            else:
                tau = reading.general_preference_tau if reading else 1.0
                probabilities[name] = torch.sigmoid((values_a[name][:, 0] - values_b[name][:, 0]) / tau)
        return probabilities

    def forward(self, images: ImageBatch, prompts: Sequence[str], perspective: str) -> torch.Tensor:
        """Training forward of one perspective (its adapter made active): a 1-D tensor of scores with a graph."""
        names = self._check_perspectives([perspective])
        loaded = load_images(images)
        prompts = validate_prompts(prompts, len(loaded))
        self.peft_model.set_adapter(perspective)
        return self._score_chunk(loaded, prompts, names, mixed=False)[perspective][:, 0]

    def _check_perspectives(self, perspectives: Sequence[str] | None) -> list[str]:
        if perspectives is None:
            return self.perspectives
        if isinstance(perspectives, str):
            perspectives = [perspectives]
        unknown = [p for p in perspectives if p not in self.configs]
        if unknown or not perspectives:
            raise ValueError(f"perspectives: unknown {unknown or 'empty list'}; this model has {self.perspectives}")
        return list(perspectives)

    def _reading(self, name: str) -> official_format.OfficialReading | None:
        official = self.configs[name].official
        return official_format.OfficialReading(**official) if official else None

    def _evaluate(self, images: list | torch.Tensor, prompts: list[str], names: list[str]) -> dict[str, torch.Tensor]:
        """Head outputs [B, D] per perspective, in eval mode, chunked by `max_batch_size`. Perspectives that read
        the inputs alike (ours; or one official family) share one forward with a mixed-adapter batch."""
        groups: dict[str | None, list[str]] = {}
        for name in names:
            groups.setdefault(self.configs[name].official.get("family"), []).append(name)
        differentiable = isinstance(images, torch.Tensor) and images.requires_grad
        was_training = self.training
        self.eval()
        values = {}
        try:
            with torch.set_grad_enabled(differentiable):
                for group in groups.values():
                    chunks = [self._score_chunk(images[i: i + self.max_batch_size],
                                                prompts[i: i + self.max_batch_size], group, mixed=True)
                              for i in range(0, len(prompts), self.max_batch_size)]
                    values.update({name: torch.cat([chunk[name] for chunk in chunks]) for name in group})
        finally:
            self.train(was_training)
        return {name: values[name] for name in names}

    def _pixel_inputs(self, images: list | torch.Tensor, reading: official_format.OfficialReading | None
                      ) -> PixelInputs:
        if reading is not None:
            return official_format.official_pixels(self.backbone, reading, images)
        if isinstance(images, torch.Tensor):
            return self.backbone.pixel_inputs_differentiable(images.to(self.backbone.device))
        return self.backbone.pixel_inputs(images)

    def _score_chunk(self, images, prompts: list[str], names: list[str], mixed: bool) -> dict[str, torch.Tensor]:
        """Head outputs [B, D] of perspectives that read the inputs alike (see `_evaluate`)."""
        backbone = self.backbone
        reading = self._reading(names[0])
        pixels = self._pixel_inputs(images, reading)
        projector_input, shared = backbone.encode_images(pixels)
        counts = [f.shape[0] for f in shared]
        text = official_format.official_text_inputs(backbone, reading, prompts, counts) if reading \
            else backbone.text_inputs(prompts, counts)
        if text.truncated:
            warnings.warn(f"prompts {text.truncated}: longer than {backbone.max_prompt_tokens} tokens, truncated")
        input_ids = text.input_ids.to(backbone.device)
        attention_mask = text.attention_mask.to(backbone.device)
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
        inputs_embeds = torch.cat(embeds)
        kwargs = dict(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.repeat(repeat, 1),
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
        values = {}
        for i, name in enumerate(names):
            own = slice(i * len(prompts), (i + 1) * len(prompts))
            query = hidden_states[self.configs[name].hidden_layer][own][rows, positions].float()
            if reading is not None:
                keys, mask = official_format.official_keys(reading, visual[name], inputs_embeds[own], input_ids,
                                                           attention_mask)
                values[name] = self.heads[name](query, keys, mask)
                continue
            keys, mask = padded_keys(visual[name])
            values[name] = self.heads[name](query, keys, mask).unsqueeze(-1)
        return values

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
