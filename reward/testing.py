"""Tiny offline vision-language models (random weights, locally built tokenizer) for tests, benches and the demo.

They are written with `save_pretrained`, so everything downstream loads them through the same
`from_pretrained` code as a real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import json

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .backbones.phi3_v_model import Phi3VConfig, Phi3VForCausalLM
from .backbones.phi3_v_processing import Phi3VImageProcessor

FAMILIES = ("llava", "qwen2_vl", "llava_next", "phi3_v")

# Words the toy world and the tests use; byte-level BPE covers anything else.
_CORPUS = (
    "a an the of on in with and or is are image photo picture of small large big tiny "
    "red green blue yellow purple orange cyan magenta white black grey gray pink brown "
    "circle square triangle cross ring star shape shapes background mark forbidden safe "
    "clean noisy blurry blocky sharp dog cat person car tree house sky sun moon bright dark "
    "does this match prompt score how well describe quality 0 1 2 3 4 5 6 7 8 9 . , ! ? : ;"
)

_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# llava-hf/llava-v1.6-vicuna's layout: "USER: <image>\n{text} ASSISTANT:" (images first, each text followed by a space)
_VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% else %}{{ message['role'].upper() }}: "
    "{% for item in message['content'] if item['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }} {% endfor %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# Phi-3.5-vision's own template: the content is a plain string holding `<|image_1|>`
_PHI3_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\\n' -}}"
    "{% endif %}"
)
# LLaVA-1.6's pinpoints (336x672, 672x336, 672x672) scaled to the tiny tower's 32-pixel tiles
_TINY_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def _build_tokenizer(special_tokens: list[str], vocab_size: int = 400) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tokenizer


# (vision hidden, vision layers, vision heads, image size, patch, text hidden, text layers, text heads, text MLP)
LLAVA_SIZES = {
    # vision hidden 64 (not 32): a random frozen patch embedding of 8x8x3 pixels into 32 dims lost the toy
    # world's thin safety mark (held-out accuracy 0.86 -> 0.95 with 64)
    "tiny": (64, 2, 2, 32, 8, 64, 2, 4, 128),
    # Phi-3.5-vision's proportions (CLIP-L/14 1024x24 under a 3072x32 language model), scaled down ~4-8x
    "bench": (256, 6, 4, 112, 14, 768, 8, 12, 2048),
    # Phi-3.5-vision's own sizes, for GPU benches with random weights
    "phi35": (1024, 24, 16, 336, 14, 3072, 32, 32, 8192),
}


def _llama_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    """The LLaVA families' tokenizer: Llama's special tokens, `<image>`, `</s>` as eos."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"]),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=chat_template,
    )


def _clip_llama_configs(size: str, tokenizer: PreTrainedTokenizerFast) -> tuple[CLIPVisionConfig, LlamaConfig]:
    """The CLIP tower and Llama language model of the LLaVA families at one of `LLAVA_SIZES`."""
    v_hidden, v_layers, v_heads, image_size, patch, t_hidden, t_layers, t_heads, t_mlp = LLAVA_SIZES[size]
    vision = CLIPVisionConfig(
        hidden_size=v_hidden, intermediate_size=4 * v_hidden, num_hidden_layers=v_layers,
        num_attention_heads=v_heads, image_size=image_size, patch_size=patch, projection_dim=v_hidden,
    )
    text = LlamaConfig(
        hidden_size=t_hidden, intermediate_size=t_mlp, num_hidden_layers=t_layers, num_attention_heads=t_heads,
        num_key_value_heads=max(1, t_heads // 2), vocab_size=len(tokenizer), max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return vision, text


def _llava(path: Path, size: str = "tiny") -> None:
    tokenizer = _llama_tokenizer(_LLAVA_TEMPLATE)
    vision, text = _clip_llama_configs(size, tokenizer)
    image_size, patch = vision.image_size, vision.patch_size
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(image_size // patch) ** 2,
    )
    LlavaForConditionalGeneration(config).save_pretrained(path)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", chat_template=_LLAVA_TEMPLATE, num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)


def _llava_next(path: Path) -> None:
    tokenizer = _llama_tokenizer(_VICUNA_TEMPLATE)
    vision, text = _clip_llama_configs("tiny", tokenizer)
    image_size, patch = vision.image_size, vision.patch_size
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=_TINY_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=(image_size // patch) ** 2,
    )
    LlavaNextForConditionalGeneration(config).save_pretrained(path)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=_TINY_PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", chat_template=_VICUNA_TEMPLATE, num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)


# (vision hidden, vision layers, vision heads, crop size, patch, text hidden, text layers, text heads, text MLP)
PHI3_V_SIZES = {
    # 16-pixel crops of 4x4 patches (2x2 merged tokens per crop): a 32x32 image is a native 2x2 crop grid
    "tiny": (32, 2, 2, 16, 4, 64, 2, 4, 128),
    # Phi-3.5-vision's proportions scaled down ~4-8x (112-pixel crops of 14-pixel patches: 16 tokens per crop)
    "bench": (256, 6, 4, 112, 14, 768, 8, 12, 2048),
    # Phi-3.5-vision's own sizes (CLIP ViT-L/14-336 under a 3072x32 Phi-3), for GPU benches with random weights
    "phi35": (1024, 24, 16, 336, 14, 3072, 32, 32, 8192),
}


def _phi3_v(path: Path, size: str = "tiny") -> None:
    """Phi-3.5-vision's layout at one of `PHI3_V_SIZES`: its config fields (LongRoPE as "su", `auto_map`, no image
    token id), published parameter names, a leading `<s>`, an embedding padded past the tokenizer."""
    specials = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
    backend = _build_tokenizer(specials)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", chat_template=_PHI3_TEMPLATE,
    )
    v_hidden, v_layers, v_heads, crop, patch, hidden, layers, heads, mlp = PHI3_V_SIZES[size]
    vision = dict(hidden_size=v_hidden, intermediate_size=4 * v_hidden, num_hidden_layers=v_layers,
                  num_attention_heads=v_heads, image_size=crop, patch_size=patch, projection_dim=v_hidden,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
    tokens_per_crop = (crop // patch // 2) ** 2
    factors = [1.0 + i / 32 for i in range(hidden // heads // 2)]
    rope_scaling = {"type": "su", "short_factor": factors, "long_factor": [2 * f for f in factors]}
    config = Phi3VConfig(
        vocab_size=len(tokenizer) + 8, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=131072, original_max_position_embeddings=4096,
        rope_scaling=rope_scaling, sliding_window=262144, bos_token_id=bos, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        embd_layer={"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                    "use_hd_transform": True, "with_learnable_separator": True},
        img_processor={"image_dim_out": v_hidden, "model_name": "openai/clip-vit-large-patch14-336",
                       "name": "clip_vision_model", "num_img_tokens": tokens_per_crop, "vision_config": vision},
    )
    model = Phi3VForCausalLM(config)
    with torch.no_grad():  # the separators start at zero; random ones make their positions visible to tests
        model.model.vision_embed_tokens.glb_GN.normal_()
        model.model.vision_embed_tokens.sub_GN.normal_()
    model.save_pretrained(path)
    # the published names: transformers 5 saves a freshly built CLIPVisionModel without its `vision_model.` level,
    # and the published checkpoint keeps the token embedding under its remote-code alias `vision_embed_tokens.wte`
    weights = load_file(path / "model.safetensors")
    renamed = {name.replace(".img_processor.", ".img_processor.vision_model.")
               .replace("model.embed_tokens.", "model.vision_embed_tokens.wte."): value
               for name, value in weights.items()}
    save_file(renamed, path / "model.safetensors", metadata={"format": "pt"})
    written = json.loads((path / "config.json").read_text())
    written.pop("rope_parameters")
    written.pop("image_token_id")
    written.update(architectures=["Phi3VForCausalLM"], rope_scaling=rope_scaling, rope_theta=10000.0,
                   auto_map={"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                             "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"})
    (path / "config.json").write_text(json.dumps(written, indent=2))
    tokenizer.save_pretrained(path)
    Phi3VImageProcessor(num_crops=4, num_img_tokens=tokens_per_crop, hd_crop_size=crop).save_pretrained(path)


def _qwen2_vl(path: Path) -> None:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizer(specials),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=_QWEN_TEMPLATE,
    )
    patch, merge = 8, 2
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=patch,
            spatial_merge_size=merge, temporal_patch_size=2, in_channels=3,
        ),
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    # Qwen2-VL's processor class needs torchvision for its video half; the image processor alone does not.
    Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        min_pixels=(patch * merge) ** 2, max_pixels=64 * 64,
    ).save_pretrained(path)


def build_tiny_vlm(path: str | Path, family: str = "llava", seed: int = 0, size: str = "tiny") -> Path:
    """Write a random VLM of `family` ("llava", "llava_next", "qwen2_vl" or "phi3_v") and its processor to `path`;
    return it.

    `size` picks the LLaVA or Phi-3.5-vision dimensions ("tiny" for tests, "bench" and "phi35" for benches); the
    others are tiny only.
    """
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    sizes = {"llava": LLAVA_SIZES, "phi3_v": PHI3_V_SIZES}.get(family, {"tiny": None})
    if size not in sizes:
        raise ValueError(f"size: expected one of {sorted(sizes)} for {family}; got {size!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if family == "llava":
            _llava(path, size)
        elif family == "llava_next":
            _llava_next(path)
        elif family == "phi3_v":
            _phi3_v(path, size)
        else:
            _qwen2_vl(path)
    return path
