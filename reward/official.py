"""Released LLaVA-Reward checkpoints: their directory layout, and the "official" reading mode that scores them
exactly as the official code (sjz5202/LLaVA-Reward, f082993) does.

A released perspective is a directory holding `reward_config.yaml`, `lora/` (a PEFT adapter on the language
model) and `pytorch_model.bin` (`value_head`, SkipCA's `W_q`/`W_k`/`W_v` and `ca_layernorm`, the fine-tuned
projector). The official forward differs per backbone, and a checkpoint only scores right when read the way it
was trained; `OfficialReading` records that way for each family. What the official code does that our own
reading does not (and why it is kept here):

- the prompt is the chat template cut by a fixed number of characters (Phi `[:-22]` + EOS, Qwen `[58:-23]`,
  LLaVA-1.6 `[0:-11]` + EOS): the text it was trained on;
- Phi-3.5-vision: the processor is loaded with `num_crops=16` (the published config says 4), and it tokenises
  the text on each side of `<|image_1|>` on its own, so a second `<s>` follows the image block. SkipCA's keys
  and values are the projected image features (the vendored `Phi3VModel` appends them to `hidden_states`,
  whose last entry the official forward reads), unmasked: in a batch, shorter images' zero padding acts as
  keys, so official batched scores depend on the batch; the official mode is the batch-of-one result;
- Qwen2.5-VL: keys and values are the input embeddings at the positions holding token id 151643
  (`<|endoftext|>`, the left padding of a batch). A prompt contains no such token, so a sample alone gets no
  attention term and its score is `value_head(RMSNorm(h))`; in a padded official batch a row attends to pad
  embeddings, so official scores depend on the batch. We define the official mode by the batch-of-one
  result, which does not;
- LLaVA-1.6: the forward applies no SkipCA, whatever the checkpoint holds; transformers 4.50's processor pads
  a resized image symmetrically with `(target - size) // 2` on each side, one pixel short when the difference is
  odd, and the short tile is then resized and cropped (transformers 5 pads it whole);
- Qwen2.5-VL images are first resized by `qwen_vl_utils` (multiples of 28, PIL's bicubic) before the processor.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from .backbones import Backbone, PixelInputs, TextInputs
from .skipca import padded_keys

CONFIG_KEYS = ("add_cross_attention", "general_preference_tau", "is_general_preference", "value_head_dim")
PROJECTOR_KEYWORDS = {"phi3_v": "img_projection", "qwen2_5_vl": "merger", "llava_next": "multi_modal_projector"}

# Where transformers 4.50 (the official stack) put a module and where transformers 5 puts it.
_MODULE_RENAMES = {
    "qwen2_5_vl": [(r"^model\.(?!language_model\.|visual\.)", "model.language_model."), (r"^visual\.", "model.visual.")],
    "llava_next": [(r"^language_model\.lm_head\.", "lm_head."), (r"^language_model\.model\.", "model.language_model."),
                   (r"^vision_tower\.", "model.vision_tower."),
                   (r"^multi_modal_projector\.", "model.multi_modal_projector."),
                   (r"^image_newline", "model.image_newline")],
    "phi3_v": [],  # our Phi-3.5-vision keeps the published module names
}


@dataclass(frozen=True)
class OfficialReading:
    """How the official code reads one backbone family (stored in a perspective's config as `official`).

    message: how the user turn is built: "phi" (`<|image_1|>\\n{prompt}` as text), "image_text" (an image item,
        then the text; Qwen) or "text_image" (the text, then an image item; LLaVA-1.6).
    cut_start / cut_end / strip / append_eos: the rendered chat template (with the generation prompt) is cut
        to `[cut_start:cut_end]`, stripped if `strip`, and the tokenizer's EOS appended if `append_eos`.
    keys: where SkipCA's keys and values come from: "visual" (the perspective's projected image features),
        "token_embeddings" (input embeddings at the positions holding `key_token_id`) or "none" (no SkipCA).
    norm_eps: `ca_layernorm`'s epsilon. pre_resize: resize images as `qwen_vl_utils` does first.
    num_crops: the HD crop budget the official processor is loaded with (0: the base's own setting).
    floor_padding: pad any-resolution images as transformers 4.50 did (`(target - size) // 2` on both sides).
    skipca: whether the checkpoint's forward applies SkipCA. value_head_dim / general_preference / tau: its head.
    """

    family: str
    message: str
    cut_start: int
    cut_end: int
    strip: bool
    append_eos: bool
    keys: str
    norm_eps: float
    key_token_id: int = -1
    pre_resize: bool = False
    num_crops: int = 0
    floor_padding: bool = False
    skipca: bool = True
    value_head_dim: int = 1
    general_preference: bool = False
    general_preference_tau: float = 0.1


_FAMILY_READINGS = {
    "phi3_v": dict(message="phi", cut_start=0, cut_end=-22, strip=False, append_eos=True, keys="visual",
                   norm_eps=1e-5, num_crops=16),
    "qwen2_5_vl": dict(message="image_text", cut_start=58, cut_end=-23, strip=True, append_eos=False,
                       keys="token_embeddings", key_token_id=151643, norm_eps=1e-6, pre_resize=True),
    "llava_next": dict(message="text_image", cut_start=0, cut_end=-11, strip=False, append_eos=True, keys="none",
                       norm_eps=1e-5, floor_padding=True),
}


def official_reading(model_type: str, reward_config: dict[str, Any]) -> OfficialReading:
    """The reading of a released checkpoint on a `model_type` base, given its `reward_config.yaml`."""
    if model_type not in _FAMILY_READINGS:
        raise ValueError(f"base: official LLaVA-Reward checkpoints exist for {sorted(_FAMILY_READINGS)}; "
                         f"this base is {model_type!r}")
    family = dict(_FAMILY_READINGS[model_type])
    skipca = bool(reward_config["add_cross_attention"]) and family["keys"] != "none"
    general = bool(reward_config["is_general_preference"])
    return OfficialReading(
        family=model_type, skipca=skipca, general_preference=general,
        value_head_dim=int(reward_config["value_head_dim"]) if general else 1,
        general_preference_tau=float(reward_config["general_preference_tau"]), **family,
    )


# -- the official inputs ---------------------------------------------------------------------------------
def official_text(backbone: Backbone, reading: OfficialReading, prompt: str) -> str:
    """The text the official code tokenizes for `prompt` (with the image placeholder still unexpanded)."""
    if reading.message == "phi":
        messages = [{"role": "user", "content": f"<|image_1|>\n{prompt}"}]
    else:
        items = [{"type": "image"}, {"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": items if reading.message == "image_text" else items[::-1]}]
    rendered = backbone.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = rendered[reading.cut_start: reading.cut_end]
    if reading.strip:
        text = text.strip()
    return text + backbone.tokenizer.eos_token if reading.append_eos else text


def _official_ids(backbone: Backbone, reading: OfficialReading, text: str, image_tokens: int) -> list[int]:
    tokenizer = backbone.tokenizer
    if reading.message == "phi":
        # the official (vendored) Phi processor tokenises each piece around `<|image_1|>` with the special
        # tokens, so the piece after the image starts with its own <s>
        pieces = re.split(r"<\|image_\d+\|>", text)
        if len(pieces) != 2:
            raise ValueError(f"chat template: expected one <|image_1|> in the official Phi prompt, got {text!r}")
        before, after = (tokenizer(piece)["input_ids"] for piece in pieces)
        return before + [backbone.image_token_id] * image_tokens + after
    ids = tokenizer(text)["input_ids"]
    if ids.count(backbone.image_token_id) != 1:
        raise ValueError(f"chat template: expected one image placeholder in the official prompt, got {text!r}")
    at = ids.index(backbone.image_token_id)
    return ids[:at] + [backbone.image_token_id] * image_tokens + ids[at + 1:]


def official_text_inputs(backbone: Backbone, reading: OfficialReading, prompts: list[str],
                         image_token_counts: list[int]) -> TextInputs:
    """Token ids as the official processor makes them, right-padded; the reward is read at each row's last
    token (the official code's "eos index": the last attended position)."""
    rows, truncated = [], []
    for i, (prompt, count) in enumerate(zip(prompts, image_token_counts)):
        prompt, cut = backbone.truncate_prompt(prompt)
        if cut:
            truncated.append(i)
        rows.append(_official_ids(backbone, reading, official_text(backbone, reading, prompt), count))
    return backbone.pad_rows(rows, truncated)


def official_pixels(backbone: Backbone, reading: OfficialReading, images: list[Image.Image] | torch.Tensor
                    ) -> PixelInputs:
    """Pixel inputs as the official pipeline prepares them (Phi: 16 crops; Qwen: `qwen_vl_utils`' resize first;
    LLaVA-1.6: transformers 4.50's padding, on the processor path only)."""
    if reading.num_crops or reading.floor_padding:
        processor = copy.copy(backbone.image_processor)
        if reading.num_crops:
            processor.num_crops = reading.num_crops
        if reading.floor_padding:
            # no public switch for it: the one private method where the two versions differ is overridden
            processor.__class__ = type(f"Official{type(processor).__name__}", (type(processor),),
                                       {"_get_padding_size": _floor_padding})
        backbone = copy.copy(backbone)  # the same model, read through the official processor settings
        backbone.image_processor = processor
    if not reading.pre_resize:
        if isinstance(images, torch.Tensor):
            return backbone.pixel_inputs_differentiable(images.to(backbone.device))
        return backbone.pixel_inputs(images)
    if isinstance(images, torch.Tensor):
        height, width = _qwen_utils_size(*images.shape[-2:])
        resized = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
        return backbone.pixel_inputs_differentiable(resized.clamp(0, 1).to(backbone.device))
    resized = [image.resize(_qwen_utils_size(image.height, image.width)[::-1], Image.Resampling.BICUBIC)
               for image in images]
    return backbone.pixel_inputs(resized)


def _floor_padding(self, original_resolution: tuple, target_resolution: tuple) -> tuple:
    (height, width), (target_height, target_width) = original_resolution, target_resolution
    return ((target_height - height) // 2,) * 2, ((target_width - width) // 2,) * 2


def _qwen_utils_size(height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                     max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """`qwen_vl_utils`' target size: sides multiples of 28, area within [min_pixels, max_pixels]."""
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def official_keys(reading: OfficialReading, visual: list[torch.Tensor], inputs_embeds: torch.Tensor,
                  input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SkipCA's keys/values [B, N, D] and their mask [B, N] for one perspective's rows, as the official forward
    takes them for a sample alone (padding excluded, so scores do not depend on the batch)."""
    if reading.keys == "visual":
        return padded_keys(visual)
    if reading.keys == "token_embeddings":
        return inputs_embeds.float(), attention_mask.bool() & (input_ids == reading.key_token_id)
    return inputs_embeds.new_zeros(inputs_embeds.shape[0], 0, inputs_embeds.shape[-1]).float(), \
        attention_mask.bool()[:, :0]


def general_preference(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """P(a preferred to b) of the General Preference model on value-head vectors [B, >= 2]."""
    return torch.sigmoid((a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]) / tau)


# -- the released directory ------------------------------------------------------------------------------
@dataclass
class OfficialCheckpoint:
    """The parts of a released perspective directory, keys already in transformers 5's module names."""

    reward_config: dict[str, Any]
    lora_config: dict[str, Any]
    lora_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor]
    projector_state: dict[str, torch.Tensor]


def read_official_checkpoint(directory: str | Path, base_model_type: str) -> OfficialCheckpoint:
    """Read and check a released perspective directory against the base it will sit on."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"checkpoint: no such directory {directory}")
    reward_config = _read_reward_config(directory / "reward_config.yaml")
    model_type = _checkpoint_model_type(directory)
    if model_type is not None and model_type != base_model_type:
        raise ValueError(f"base: {directory / 'config.json'} says the checkpoint was trained on a "
                         f"{model_type!r} model, but the base is {base_model_type!r}")
    official_reading(base_model_type, reward_config)  # refuses an unsupported family early
    lora_config, lora_state = _read_lora(directory / "lora", base_model_type)
    weights_path = directory / "pytorch_model.bin"
    if not weights_path.is_file():
        raise ValueError(f"checkpoint: {weights_path} is missing (it holds value_head, W_q/W_k/W_v, ca_layernorm "
                         "and the projector)")
    weights = torch.load(weights_path, map_location="cpu", weights_only=True)
    head_state = {}
    for key, value in weights.items():
        parts = key.split(".")  # e.g. "value_head.weight", or a wrapper's prefix before it
        if len(parts) >= 2 and parts[-2] in ("value_head", "W_q", "W_k", "W_v", "ca_layernorm"):
            head_state[".".join(parts[-2:])] = value.float()
    if "value_head.weight" not in head_state:
        raise ValueError(f"checkpoint: {weights_path} holds no value_head weight; keys: {sorted(weights)[:8]}")
    keyword = PROJECTOR_KEYWORDS[base_model_type]
    projector_state = {key.split(f"{keyword}.", 1)[1]: value.float() for key, value in weights.items()
                       if f"{keyword}." in key}
    return OfficialCheckpoint(reward_config, lora_config, lora_state, head_state, projector_state)


def _read_reward_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"checkpoint: {path} is missing")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of {list(CONFIG_KEYS)}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; a released reward_config.yaml holds {list(CONFIG_KEYS)}")
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing}")
    if config["is_general_preference"] and (int(config["value_head_dim"]) < 2 or int(config["value_head_dim"]) % 2):
        raise ValueError(f"{path}: value_head_dim must be even and >= 2 for a General Preference head, "
                         f"got {config['value_head_dim']}")
    return config


def _checkpoint_model_type(directory: Path) -> str | None:
    path = directory / "config.json"  # the official save copies the base's config beside the weights
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("model_type")


def _read_lora(directory: Path, model_type: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"checkpoint: {config_path} is missing (the perspective's LoRA adapter lives in lora/)")
    config = json.loads(config_path.read_text())
    for option in ("use_dora", "use_rslora"):
        if config.get(option):
            raise ValueError(f"{config_path}: {option}=true is not supported by the official reading")
    if config.get("r") is None or config.get("lora_alpha") is None:
        raise ValueError(f"{config_path}: expected the LoRA rank 'r' and 'lora_alpha'")
    safetensors_path, bin_path = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        raw = load_file(safetensors_path)
    elif bin_path.is_file():
        raw = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"checkpoint: {directory} holds no adapter_model.safetensors or adapter_model.bin")
    state = {}
    for key, value in raw.items():
        key = re.sub(r"^base_model\.model\.", "", key)
        key = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)  # an adapter name inside the key
        for pattern, replacement in _MODULE_RENAMES[model_type]:
            key = re.sub(pattern, replacement, key)
        state[f"base_model.model.{key}"] = value.float()
    vision = sorted({key for key in state if re.search(r"vision|visual|img_processor|img_projection", key)})
    if vision:
        raise ValueError(f"{directory}: LoRA on the vision tower or projector ({vision[0]}, ...) is not supported; "
                         "the released checkpoints adapt the language model only (freeze_vision_model)")
    return config, state
