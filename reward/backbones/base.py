"""The backbone interface: what the reward model needs from a VLM family, and the registry by `model_type`.

A family is chosen from the model's `config.model_type`, never from a path. A subclass that names its
`model_types` registers itself in `BACKBONES`; each family lives in its own module of this package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer


BACKBONES: dict[str, type["Backbone"]] = {}
"""Each supported `model_type` and the Backbone subclass that reads it."""


@dataclass
class PixelInputs:
    """What the vision tower takes for a batch of images, whichever path made it."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None  # (height, width) per original image, for any-resolution tiling


@dataclass
class TextInputs:
    """Token ids with each image placeholder expanded, and where each row's reward token sits."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    reward_positions: torch.Tensor
    truncated: list[int]


class Backbone:
    """Wraps one loaded VLM with the knowledge of how its family lays out an image and a prompt."""

    model_types: tuple[str, ...] = ()
    projector_path: str = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for model_type in cls.model_types:
            BACKBONES[model_type] = cls

    def __init__(self, model: torch.nn.Module, tokenizer, image_processor, max_prompt_tokens: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.max_prompt_tokens = max_prompt_tokens
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: the reward token is the end-of-sequence token, but this tokenizer has none")
        self.reward_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.reward_token_id

    # -- construction -------------------------------------------------------------------------------------
    @staticmethod
    def from_pretrained(path_or_id: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        max_prompt_tokens: int = 256) -> "Backbone":
        """Load a VLM, its tokenizer and image processor from a path or the local Hugging Face cache."""
        config = AutoConfig.from_pretrained(path_or_id)
        family = BACKBONES.get(config.model_type)
        if family is None:
            raise ValueError(f"backbone {path_or_id}: model_type {config.model_type!r} is not supported; "
                             f"supported: {sorted(BACKBONES)}")
        model, tokenizer, image_processor = family.load_parts(path_or_id, dtype)
        model = model.to(device)
        model.requires_grad_(False)
        if getattr(tokenizer, "chat_template", None) is None:
            tokenizer.chat_template = _processor_chat_template(path_or_id)
        return family(model, tokenizer, image_processor, max_prompt_tokens)

    @classmethod
    def load_parts(cls, path_or_id: str | Path, dtype: torch.dtype) -> tuple[torch.nn.Module, object, object]:
        """The model, tokenizer and image processor of a checkpoint; a family without transformers classes
        overrides this."""
        model = AutoModelForImageTextToText.from_pretrained(path_or_id, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        # the PIL image processors need no torchvision, which we do not install
        image_processor = AutoImageProcessor.from_pretrained(path_or_id, backend="pil")
        return model, tokenizer, image_processor

    # -- properties shared by every family ------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def projector(self) -> torch.nn.Module:
        return self.model.get_submodule(self.projector_path)

    def language_model_linear_names(self) -> list[str]:
        """Leaf names of the language model's Linear layers: the LoRA targets, found rather than hard-coded."""
        language_model = self.model.model.language_model
        return sorted({name.rsplit(".", 1)[-1] for name, module in language_model.named_modules()
                       if isinstance(module, torch.nn.Linear)})

    def lora_target_regex(self) -> str:
        """peft's `target_modules`: the language model's Linear layers, nothing in the vision tower or projector."""
        return rf".*language_model.*\.({'|'.join(self.language_model_linear_names())})"

    # -- text -----------------------------------------------------------------------------------------------
    def render_prompt(self, prompt: str) -> str:
        """The chat template's user turn holding one image and the prompt; no generation prompt."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def prompt_ids(self, rendered: str) -> list[int]:
        """Token ids of a rendered prompt, its one image placeholder included."""
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def text_inputs(self, prompts: list[str], image_token_counts: list[int]) -> TextInputs:
        """Tokenise each rendered prompt, expand its image placeholder and append the reward token."""
        rows, truncated = [], []
        for i, (prompt, count) in enumerate(zip(prompts, image_token_counts)):
            prompt, cut = self.truncate_prompt(prompt)
            if cut:
                truncated.append(i)
            ids = self.prompt_ids(self.render_prompt(prompt))
            if ids.count(self.image_token_id) != 1:
                raise ValueError(f"chat template: expected one image placeholder per prompt, found "
                                 f"{ids.count(self.image_token_id)} in row {i}")
            at = ids.index(self.image_token_id)
            rows.append(ids[:at] + [self.image_token_id] * count + ids[at + 1:] + [self.reward_token_id])
        return self.pad_rows(rows, truncated)

    def truncate_prompt(self, prompt: str) -> tuple[str, bool]:
        """The prompt cut to `max_prompt_tokens` tokens, and whether it was cut."""
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) <= self.max_prompt_tokens:
            return prompt, False
        return self.tokenizer.decode(prompt_ids[: self.max_prompt_tokens]), True

    def pad_rows(self, rows: list[list[int]], truncated: list[int]) -> TextInputs:
        """Right-pad token rows into a batch; each row's reward token is its last attended position."""
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        positions = torch.arange(length).expand(len(rows), -1)
        reward_positions = torch.where(attention_mask.bool(), positions, -1).max(dim=1).values
        return TextInputs(input_ids, attention_mask, reward_positions, truncated)

    # -- pixels ---------------------------------------------------------------------------------------------
    def pixel_inputs(self, images: list[Image.Image]) -> PixelInputs:
        """The black-box path: the model's own image processor."""
        out = self.image_processor(images=images, return_tensors="pt")
        grid, sizes = out.get("image_grid_thw"), out.get("image_sizes")
        return PixelInputs(out["pixel_values"].to(self.device, self.dtype),
                           None if grid is None else grid.to(self.device),
                           None if sizes is None else sizes.to(self.device))

    def pixel_inputs_differentiable(self, pixels: torch.Tensor) -> PixelInputs:
        """The torch path for float BCHW pixels in [0, 1], keeping the graph to them."""
        raise NotImplementedError

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.image_processor.image_mean, device=pixels.device, dtype=pixels.dtype)
        std = torch.tensor(self.image_processor.image_std, device=pixels.device, dtype=pixels.dtype)
        return (pixels - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    # -- vision ---------------------------------------------------------------------------------------------
    def encode_images(self, inputs: PixelInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the vision tower once: (the projector's input, the projector's output split per image)."""
        captured = {}

        def keep_input(module, args, output) -> None:  # returns None so the output is left as it is
            captured["input"] = args[0]

        hook = self.projector().register_forward_hook(keep_input)
        try:
            features = self._image_features(inputs)
        finally:
            hook.remove()
        return captured["input"], features

    def project(self, projector: torch.nn.Module, projector_input: torch.Tensor, inputs: PixelInputs
                ) -> list[torch.Tensor]:
        """Apply a (perspective's own) projector copy to the captured projector input, split per image."""
        return self._split(projector(projector_input), inputs)

    def _image_features(self, inputs: PixelInputs) -> list[torch.Tensor]:
        raise NotImplementedError

    def _split(self, projected: torch.Tensor, inputs: PixelInputs) -> list[torch.Tensor]:
        raise NotImplementedError

    def position_ids(self, text: TextInputs, inputs: PixelInputs) -> torch.Tensor | None:
        """Position ids for the language model, or None to let it count 0..n-1 itself."""
        return None


def _processor_chat_template(path_or_id: str | Path) -> str:
    """Some checkpoints keep the chat template with the processor only; read it from there."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            found = cached_file(str(path_or_id), name)
        except OSError:
            continue
        if found:
            text = Path(found).read_text()
            if name.endswith(".json"):
                text = json.loads(text)["chat_template"]
            return text
    raise ValueError(f"backbone {path_or_id}: no chat template in its tokenizer or processor files")
