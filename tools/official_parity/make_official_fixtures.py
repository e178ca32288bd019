#!/usr/bin/env python3
"""Parity harness: run the OFFICIAL LLaVA-Reward code on tiny random models and record fixtures.

NOT run by CI, NOT imported by the library. It writes ``tests/fixtures/official/`` which our own
tests (that never import the official code) compare against.

What it does, per family (Phi-3.5-vision ``phi3_v``, Qwen2.5-VL ``qwen2_5_vl``, LLaVA-1.6 ``llava_next``):

1. builds a tiny random base model with the official / transformers-4.50 classes and saves it with
   ``save_pretrained`` so the directory is laid out as the published one (config.json fields, safetensors
   parameter names, tokenizer with the family's real special tokens and REAL chat template, processor
   configs);
2. creates official reward checkpoints on it through the official ``get_reward_model`` (training-time
   construction, which calls ``_get_reward_model``) and saves them with the official
   ``DeepspeedStrategy.save_model_lora`` (the code the trainer calls), so the directory is the released
   layout: ``reward_config.yaml``, ``pytorch_model.bin``, ``lora/adapter_config.json``,
   ``lora/adapter_model.bin``, ``config.json`` and tokenizer files;
3. loads every checkpoint with the official ``eval/reward_adaptor_loader.load_reward_adaptor`` and scores
   the committed images with the official ``custom_forward``: batch of one (the official single-image path:
   ``inference_process_phi3v`` for Phi, the official dataset + collate with one item for Qwen/LLaVA) and
   once batched with padding exactly as ``eval/batch_inference_rm_*.py`` does (official dataset classes
   ``GeneralRewardDataset*`` in their single-image ``cls_based`` mode + their ``collate_fn``);
4. writes ``<out>/<family>/base/``, ``<out>/<family>/<checkpoint>/``, ``<out>/images/*.png`` and
   ``<out>/scores.json``.

Set-up (CPU is enough; a few minutes on 2 cores)::

    git --git-dir=<LLaVA-Reward clone>/.git archive f082993 | tar -x -C /tmp/official_src
    #   (sjz5202/LLaVA-Reward at commit f082993; only the python sources are needed, not data/)
    python3 -m venv /tmp/official_env
    /tmp/official_env/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==4.50.0 \
        peft==0.13.2 accelerate pyyaml safetensors pillow tokenizers scipy "datasets<4" \
        "huggingface-hub>=0.26,<1.0"
    cd /work/main
    /tmp/official_env/bin/python tools/official_parity/make_official_fixtures.py \
        --official-src /tmp/official_src --out tests/fixtures/official

Versions this was recorded with (also written to scores.json): torch 2.14.1 (CPU), torchvision 0.29.1,
transformers 4.50.0, peft 0.13.2, accelerate 1.15.0, tokenizers 0.21.4, safetensors 0.8.0,
huggingface-hub 0.36.2, numpy 2.4.6, Python 3.11. Scores are float32 and bit-for-bit reproducible
run to run on one machine: ``--compare-to OLD/scores.json`` exits non-zero unless every recorded score,
input and checked fact equals the old record exactly, and ``file_sha256`` in scores.json lists every
fixture file (all files are byte-stable: the script re-executes itself with ``PYTHONHASHSEED=0`` because
peft stores ``target_modules`` as a set).

Stand-ins (no official code is changed, and nothing of it is copied into this repository):

* ``deepspeed`` is replaced by a tiny fake module (``GatheredParameters`` = no-op context,
  ``ZeroParamStatus``, dummy optimiser classes): the official code imports it at module level; the
  save code then runs as on one rank. ``flash_attn`` is simply absent (the official Phi3V modelling file
  guards the import); attention is eager everywhere.
* a 1-process ``gloo`` group is started because ``get_reward_model`` calls ``torch.distributed.get_rank()``.
* the official loader loads in bfloat16 and asks Qwen for flash-attention-2: while it runs,
  ``PreTrainedModel.from_pretrained`` is wrapped to force ``torch_dtype=float32`` and eager attention.
  Nothing else in the loader changes.
* Phi3V hard-codes CLIP ViT-L/14-336 (``CLIP_VIT_LARGE_PATCH14_336_CONFIG``) and asserts the CLIP width is
  1024 in ``Phi3ImageEmbedding.reshape_hd_patches_2x2merge``. For the tiny model the constant is replaced
  (module attribute) by a small CLIPVisionConfig (image_size 336 and patch 14 kept, so the HD geometry -
  24x24 patches, 2x2 merge, 12x12 tokens per crop - is real) and the constant 1024 in that assertion is
  swapped in the function's code object. The CLIP config used is written into the tiny base's config.json
  as ``img_processor["vision_config"]`` (our native loader reads it; absent = the real ViT-L/14-336).
* the base directories are built in a scratch folder together with the vendored Phi3V python files
  (``configuration_phi3_v.py``, ``modeling_phi3_v.py``, ``processing_phi3_v.py``) that the published
  Phi repository ships and ``trust_remote_code`` needs; those ``.py`` files are NOT copied into the
  fixtures (licence: official code stays out of this repository).
* released checkpoints were trained from hub ids, so before saving, ``config._name_or_path`` and the LoRA
  config's ``base_model_name_or_path`` are set to the hub id (``microsoft/Phi-3.5-vision-instruct``,
  ``Qwen/Qwen2.5-VL-7B-Instruct``, ``llava-hf/llava-v1.6-vicuna-7b-hf``); the save code then does not
  copy the base's json files (it only does that when the base path exists locally).
* the reward heads, SkipCA, LoRA and the fine-tuned projector get seeded random NON-ZERO weights (the
  official init leaves LoRA B at zero and the RMSNorm at one), different per checkpoint; base weights are
  seeded random too (norm weights 1 + noise, separators non-zero).

Official facts relied on (sjz5202/LLaVA-Reward f082993; the per-family reading is in tools/official_parity/REPORT.md):

* prompts: Phi ``tokenizer.apply_chat_template([{'role':'user','content':'<|image_1|>\\n'+p}],
  add_generation_prompt=True)[:-22] + eos``; Qwen ``processor.apply_chat_template(msgs,
  add_generation_prompt=True)[58:-23].strip()`` with content [image, text]; LLaVA-1.6
  ``processor.apply_chat_template(msgs, add_generation_prompt=True)[0:-11] + eos`` with content
  [text, image].
* processors: Phi ``AutoProcessor.from_pretrained(..., num_crops=16)`` (overrides the published 4),
  padding side left, pad = eos when missing; Qwen ``AutoProcessor.from_pretrained(..., min_pixels=256*28*28,
  max_pixels=1280*28*28)`` after ``qwen_vl_utils.process_vision_info``; LLaVA
  ``LlavaNextProcessor.from_pretrained(..., padding_side='left')``.
* forward: ``custom_forward`` of the class built by ``_get_reward_model`` (layer_id 32, vision_layer_id -1).
* save layout: ``DeepspeedStrategy.save_model_lora`` (lora/ is written for ZeRO-3, and for LLaVA also at
  ZeRO-2; the released scripts use ZeRO-3 for Phi and Qwen, ZeRO-2 for LLaVA).
"""
from __future__ import annotations

import argparse
import contextlib
import enum
import hashlib
import importlib.machinery
import json
import math
import os
import shutil
import sys
import tempfile
import types

FAMILIES = ("phi3_v", "qwen2_5_vl", "llava_next")

HUB_IDS = {
    "phi3_v": "microsoft/Phi-3.5-vision-instruct",
    "qwen2_5_vl": "Qwen/Qwen2.5-VL-7B-Instruct",
    "llava_next": "llava-hf/llava-v1.6-vicuna-7b-hf",
}

# The official loader's model_type argument per family.
LOADER_TYPE = {"phi3_v": "phi3v", "qwen2_5_vl": "qwen", "llava_next": "llava"}

# Checkpoints: name -> settings. add_cross_attention / GP as the released scripts
# (scripts/run_train_rm_single_lora_*.sh): freeze_vision_model + ft_projector, LoRA.
CHECKPOINTS = {
    "phi3_v": {
        "bt_skipca": dict(is_general_preference=False, add_cross_attention=True, value_head_dim=1, zero_stage=3, seed=101),
        "gp_skipca": dict(is_general_preference=True, add_cross_attention=True, value_head_dim=2, zero_stage=3, seed=102),
    },
    "qwen2_5_vl": {
        "bt_skipca": dict(is_general_preference=False, add_cross_attention=True, value_head_dim=1, zero_stage=3, seed=201),
        "gp": dict(is_general_preference=True, add_cross_attention=False, value_head_dim=2, zero_stage=3, seed=202),
    },
    "llava_next": {
        "bt": dict(is_general_preference=False, add_cross_attention=False, value_head_dim=1, zero_stage=2, seed=301),
    },
}
LORA = dict(lora_rank=4, lora_alpha=8, lora_dropout=0.05)
GENERAL_PREFERENCE_TAU = 0.1

# Images: name -> (width, height). Different sizes / aspect ratios.
IMAGES = {"sq64": (64, 64), "wide96x48": (96, 48), "tall40x80": (40, 80), "land120x90": (120, 90), "tall50x150": (50, 150)}
PROMPTS = ["a red circle on a blue background", "two cats playing chess in a sunny park"]

# Real chat templates (the official code slices the rendered text by a fixed number of characters).
PHI_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{- '<|assistant|>\n' -}}{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Tiny CLIP tower used by Phi3V and LLaVA-NeXT (image_size/patch real).
TINY_CLIP = dict(
    attention_dropout=0.0, dropout=0.0, hidden_act="quick_gelu", hidden_size=32, image_size=336,
    initializer_factor=1.0, initializer_range=0.02, intermediate_size=64, layer_norm_eps=1e-05,
    num_attention_heads=2, num_channels=3, num_hidden_layers=2, patch_size=14, projection_dim=32,
)

CORPUS = [
    "a red circle on a blue background", "two cats playing chess in a sunny park",
    "the quick brown fox jumps over the lazy dog", "a photo of a house with a green door",
    "an image of the sea at sunset, with birds and boats", "You are a helpful assistant.",
    "USER: ASSISTANT: user assistant system image picture video",
    "colour shape red green blue yellow square triangle circle star",
    "Hello, world! 0123456789 ... ? : ; - _ ( ) [ ] { } < > | / \\ ' \"",
]


# ----------------------------------------------------------------------------------------------
# environment: stubs, process group, official sources
# ----------------------------------------------------------------------------------------------

def _module(name: str, package: bool = False) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = []
    sys.modules[name] = mod
    return mod


def install_stubs() -> None:
    """Fake ``deepspeed`` (imported at module level by the official code; GPU-only)."""
    ds = _module("deepspeed", package=True)
    zero = _module("deepspeed.zero")
    zero.GatheredParameters = lambda *a, **k: contextlib.nullcontext()
    ds.zero = zero
    runtime = _module("deepspeed.runtime", package=True)
    rzero = _module("deepspeed.runtime.zero", package=True)
    pp = _module("deepspeed.runtime.zero.partition_parameters")
    pp.ZeroParamStatus = enum.Enum("ZeroParamStatus", "AVAILABLE NOT_AVAILABLE INFLIGHT")
    ds.runtime, runtime.zero, rzero.partition_parameters = runtime, rzero, pp
    ops = _module("deepspeed.ops", package=True)
    adam = _module("deepspeed.ops.adam")
    adam.DeepSpeedCPUAdam = type("DeepSpeedCPUAdam", (), {})
    adam.FusedAdam = type("FusedAdam", (), {})
    ds.ops, ops.adam = ops, adam
    ds.initialize = None


def init_single_process_group(scratch: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        path = os.path.join(scratch, "pg_init")
        if os.path.exists(path):
            os.remove(path)
        dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)


@contextlib.contextmanager
def float32_eager_loading():
    """While the official loader runs: from_pretrained in float32 with eager attention."""
    import torch
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__["from_pretrained"]
    func = original.__func__

    def patched(cls, *args, **kwargs):
        kwargs["torch_dtype"] = torch.float32
        if "attn_implementation" in kwargs:
            kwargs["attn_implementation"] = "eager"
        return func(cls, *args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(patched)
    try:
        yield
    finally:
        PreTrainedModel.from_pretrained = original


def patch_phi3v_for_tiny_clip() -> None:
    """Replace the hard-coded CLIP ViT-L/14-336 and the width-1024 assertion (see docstring)."""
    from transformers import CLIPVisionConfig
    from llava_reward.models.base_mllm.phi3_v import modeling_phi3_v as m

    m.CLIP_VIT_LARGE_PATCH14_336_CONFIG = CLIPVisionConfig(**TINY_CLIP)
    fn = m.Phi3ImageEmbedding.reshape_hd_patches_2x2merge
    consts = fn.__code__.co_consts
    if 1024 in consts:
        fn.__code__ = fn.__code__.replace(
            co_consts=tuple(TINY_CLIP["hidden_size"] if c == 1024 else c for c in consts))


# ----------------------------------------------------------------------------------------------
# deterministic data
# ----------------------------------------------------------------------------------------------

def make_images(out_dir: str) -> dict:
    import numpy as np
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for k, (name, (w, h)) in enumerate(IMAGES.items()):
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        r = 127.5 + 127.5 * np.sin(x / (3.0 + k) + y / 7.0)
        g = 255.0 * (x / max(w - 1, 1))
        b = 255.0 * ((x.astype(int) // 8 + y.astype(int) // 8 + k) % 2)
        cx, cy = w * (0.3 + 0.1 * k), h * 0.5
        disc = (x - cx) ** 2 + (y - cy) ** 2 < (min(w, h) * 0.25) ** 2
        r[disc], g[disc], b[disc] = 250.0, 30.0 * k, 40.0
        arr = np.stack([r, g, b], -1).round().clip(0, 255).astype(np.uint8)
        path = os.path.join(out_dir, f"{name}.png")
        Image.fromarray(arr, "RGB").save(path, optimize=False)
        paths[name] = path
    return paths


def randomize_(named_params, seed: int) -> None:
    """Seeded random values for every floating parameter, by name order (deterministic)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(named_params, key=lambda kv: kv[0]):
        if not p.is_floating_point():
            continue
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        is_norm = p.dim() == 1 and leaf == "weight" and any(
            t in name for t in ("norm", "ln_", "layrnorm", "layernorm", "ln_q"))
        if is_norm:
            value = 1.0 + 0.1 * noise
        elif p.dim() == 1 or "lora_B" in name:
            value = 0.1 * noise
        else:
            fan_in = int(torch.tensor(p.shape[1:]).prod()) if p.dim() > 1 else p.shape[0]
            value = noise / math.sqrt(max(fan_in, 1))
        with torch.no_grad():
            p.copy_(value.to(p.dtype))


def train_tokenizer(special_first, special_last, vocab_size=384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_first),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_last])
    return tok


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# tiny bases
# ----------------------------------------------------------------------------------------------

def build_phi_base(base: str, official_src: str, seed: int = 11) -> None:
    import torch
    from transformers import LlamaTokenizerFast
    from llava_reward.models.base_mllm.phi3_v.configuration_phi3_v import Phi3VConfig
    from llava_reward.models.base_mllm.phi3_v.modeling_phi3_v import Phi3VForCausalLM

    os.makedirs(base, exist_ok=True)
    tok = train_tokenizer(["<unk>", "<s>", "</s>"],
                          ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"])
    tokenizer = LlamaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
        pad_token="<|endoftext|>", add_bos_token=True, add_eos_token=False, legacy=False,
        model_max_length=131072, padding_side="right", chat_template=PHI_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False)
    vocab = len(tokenizer)
    head_dim = 64 // 4
    g = torch.Generator().manual_seed(seed + 1)
    short = [round(1.0 + 0.05 * float(v), 4) for v in torch.rand(head_dim // 2, generator=g)]
    long = [round(1.0 + 3.0 * float(v), 4) for v in torch.rand(head_dim // 2, generator=g)]
    config = Phi3VConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=131072, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling={"type": "su", "short_factor": short, "long_factor": long},
        sliding_window=262144, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("</s>"),
        pad_token_id=tokenizer.pad_token_id,
        embd_layer={"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                    "use_hd_transform": True, "with_learnable_separator": True},
        img_processor={"image_dim_out": TINY_CLIP["hidden_size"], "model_name": "openai/clip-vit-large-patch14-336",
                       "name": "clip_vision_model", "num_img_tokens": 144, "vision_config": dict(TINY_CLIP)},
        auto_map={"AutoConfig": "configuration_phi3_v.Phi3VConfig",
                  "AutoModelForCausalLM": "modeling_phi3_v.Phi3VForCausalLM"},
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Phi3VForCausalLM(config)
    randomize_(model.named_parameters(), seed)
    # The token embedding is one module reachable under two names (Phi3ImageEmbedding.wte is
    # Phi3VModel.embed_tokens); the published checkpoint stores it once, as
    # model.vision_embed_tokens.wte.weight (the name vLLM's Phi3V weight mapper reads).
    state = {k: v for k, v in model.state_dict().items() if k != "model.embed_tokens.weight"}
    model.save_pretrained(base, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(base)
    write_json(os.path.join(base, "preprocessor_config.json"), {
        "auto_map": {"AutoProcessor": "processing_phi3_v.Phi3VProcessor",
                     "AutoImageProcessor": "image_processing_phi3_v.Phi3VImageProcessor"},
        "num_crops": 4, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "image_processor_type": "Phi3VImageProcessor", "processor_class": "Phi3VProcessor", "num_img_tokens": 144,
    })
    # trust_remote_code needs the python files the published repository ships (scratch only).
    vendored = os.path.join(official_src, "llava_reward/models/base_mllm/phi3_v")
    for fname in ("configuration_phi3_v.py", "modeling_phi3_v.py", "processing_phi3_v.py"):
        shutil.copy(os.path.join(vendored, fname), os.path.join(base, fname))
    # The published repo names the image processor module image_processing_phi3_v; the vendored
    # processing file defines (and registers) both classes.
    shutil.copy(os.path.join(vendored, "processing_phi3_v.py"), os.path.join(base, "image_processing_phi3_v.py"))


def build_qwen_base(base: str, seed: int = 21) -> None:
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2TokenizerFast, Qwen2VLImageProcessor)

    os.makedirs(base, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    tok = train_tokenizer([], specials)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        errors="replace", model_max_length=131072, clean_up_tokenization_spaces=False, split_special_tokens=False,
        padding_side="right", chat_template=QWEN_CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    config = Qwen2_5_VLConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128000,
        rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, sliding_window=32768,
        max_window_layers=2, attention_dropout=0.0, tie_word_embeddings=False,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_config=dict(depth=2, hidden_act="silu", hidden_size=32, intermediate_size=64, num_heads=2,
                           in_chans=3, out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                           spatial_patch_size=14, window_size=112, fullatt_block_indexes=[1],
                           tokens_per_second=2, temporal_patch_size=2),
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    randomize_(model.named_parameters(), seed)
    model.save_pretrained(base, safe_serialization=True)
    # transformers 4.50 rewrites rope_scaling.type "mrope" to "default" on load; the published config.json
    # says "mrope" (4.50 reads both).
    cfg_path = os.path.join(base, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    image_processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=12845056, patch_size=14,
                                            temporal_patch_size=2, merge_size=2, image_mean=CLIP_MEAN,
                                            image_std=CLIP_STD)
    Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                        chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(base)
    write_json(os.path.join(base, "preprocessor_config.json"), {  # as published (no "size" key)
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    })


def build_llava_base(base: str, seed: int = 31) -> None:
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlamaTokenizerFast, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor)

    os.makedirs(base, exist_ok=True)
    tok = train_tokenizer(["<unk>", "<s>", "</s>"], ["<image>", "<pad>"])
    tokenizer = LlamaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        add_bos_token=True, add_eos_token=False, legacy=False, model_max_length=4096, padding_side="left",
        clean_up_tokenization_spaces=False)
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       architectures=["LlamaForCausalLM"], tie_word_embeddings=False)
    vision = CLIPVisionConfig(**{k: v for k, v in TINY_CLIP.items() if k != "hidden_act"}, hidden_act="quick_gelu")
    config = LlavaNextConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             projector_hidden_act="gelu", vision_feature_select_strategy="default",
                             vision_feature_layer=-2, image_grid_pinpoints=pinpoints, tie_word_embeddings=False,
                             use_image_newline_parameter=True, pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    randomize_(model.named_parameters(), seed)
    model.save_pretrained(base, safe_serialization=True)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_grid_pinpoints=pinpoints,
        do_pad=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                       vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE,
                       image_token="<image>", num_additional_image_tokens=1).save_pretrained(base)


# ----------------------------------------------------------------------------------------------
# official checkpoints
# ----------------------------------------------------------------------------------------------

def official_tokenizer(family: str, base: str, model):
    from llava_reward.utils import get_tokenizer, get_tokenizer_llava, get_tokenizer_qwen

    fn = {"phi3_v": get_tokenizer, "qwen2_5_vl": get_tokenizer_qwen, "llava_next": get_tokenizer_llava}[family]
    processor, tokenizer = fn(base, model, "left", None, cache_dir=None, use_fast=True)
    tokenizer.truncation_side = "right"
    return processor, tokenizer


def make_checkpoint(family: str, base: str, out_dir: str, settings: dict) -> None:
    import torch
    from llava_reward.models import get_reward_model
    from llava_reward.utils import DeepspeedStrategy

    model = get_reward_model(
        base, bf16=False, load_in_4bit=False, use_flash_attention_2=False, ds_config=None,
        init_value_head=True, init_prompt_head=True, add_prompt_head=False, mean_hidden_state=False,
        is_general_preference=settings["is_general_preference"],
        add_cross_attention=settings["add_cross_attention"], value_head_dim=settings["value_head_dim"],
        freeze_vision_model=True, ft_projector=True, is_pretrained_pm=None, layer_id=32, **LORA)
    trained = ("lora_A", "lora_B", "value_head", "W_q", "W_k", "W_v", "ca_layernorm",
               {"phi3_v": "img_projection", "qwen2_5_vl": "merger", "llava_next": "multi_modal_projector"}[family])
    randomize_([(n, p) for n, p in model.named_parameters() if any(t in n for t in trained)], settings["seed"])
    hub = HUB_IDS[family]
    model.config._name_or_path = hub
    model.name_or_path = hub
    model.lora_config.base_model_name_or_path = hub
    _, tokenizer = official_tokenizer(family, base, model)
    strategy = DeepspeedStrategy(seed=42, zero_stage=settings["zero_stage"], bf16=False, args=None)
    reward_config = {"general_preference_tau": GENERAL_PREFERENCE_TAU, "value_head_dim": settings["value_head_dim"],
                     "add_cross_attention": settings["add_cross_attention"],
                     "is_general_preference": settings["is_general_preference"]}
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    strategy.save_model_lora(model, tokenizer, settings["add_cross_attention"], out_dir, reward_config=reward_config)
    del model
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------
# official scoring
# ----------------------------------------------------------------------------------------------

class _Args:
    pass


class _Strategy:
    print = staticmethod(lambda *a, **k: None)

    @staticmethod
    def is_rank_0():
        return True


def load_official(family: str, base: str, ckpt: str):
    from eval.reward_adaptor_loader import load_reward_adaptor

    args = _Args()
    args.pm_path, args.pretrain, args.cache_dir = ckpt, base, None
    args.ft_projector, args.seed, args.disable_fast_tokenizer = True, 1234, False
    with float32_eager_loading():
        args, model = load_reward_adaptor(args, model_type=LOADER_TYPE[family],
                                          reward_config_path=os.path.join(ckpt, "reward_config.yaml"))
    model.eval()
    processor, tokenizer = official_tokenizer(family, base, model)
    return args, model, processor, tokenizer


def rle(values):
    out = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def tensor_summary(t):
    t64 = t.detach().double()
    return {"shape": list(t.shape), "sum": float(t64.sum()), "abs_sum": float(t64.abs().sum())}


def reward_value(reward, row: int, gp: bool):
    r = reward[row].detach().float()
    return [float(x) for x in r.reshape(-1)] if gp else float(r.reshape(-1)[0])


def official_inputs(family, processor, tokenizer, image_paths, prompt):
    """Official single-image / batched inputs (the dataset classes used by eval/batch_inference_rm_*.py)."""
    from llava_reward.datasets import GeneralRewardDataset, GeneralRewardDataset_llava, GeneralRewardDataset_qwen

    cls = {"phi3_v": GeneralRewardDataset, "qwen2_5_vl": GeneralRewardDataset_qwen,
           "llava_next": GeneralRewardDataset_llava}[family]
    data = [{"prompt": prompt, "path": p, "label": 0} for p in image_paths]
    ds = cls(data, processor=processor, tokenizer=tokenizer, strategy=_Strategy(), cls_based=True)
    items = [ds[i] for i in range(len(ds))]
    batch, _labels = ds.collate_fn(items)
    texts = None if family == "phi3_v" else [it[1] for it in items]
    return batch, texts


def run_forward(family, model, batch):
    import torch

    with torch.no_grad():
        if family == "phi3_v":  # exactly as eval/batch_inference_rm_phi.py
            ids = batch["input_ids"].squeeze(1)
            masks = batch["attention_mask"].squeeze(1)
            pixel_values = batch["pixel_values"].squeeze(1)
            img_sizes = batch["image_sizes"].squeeze(1)
            reward, outputs = model.custom_forward(input_ids=ids, attention_mask=masks, pixel_values=pixel_values,
                                                   image_sizes=img_sizes, return_output=True)
            return reward, outputs, ids, masks
        reward, outputs = model.custom_forward(inputs_batch=batch, return_output=True)
        return reward, outputs, batch["input_ids"], batch["attention_mask"]


def phi_prompt(tokenizer, prompt):
    message = {"role": "user", "content": f"<|image_1|>\n{prompt}"}
    return tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True)[:-22] + tokenizer.eos_token


def score_checkpoint(family, base, ckpt, image_paths, facts):
    import torch
    from eval.reward_adaptor_loader import inference_process_phi3v

    args, model, processor, tokenizer = load_official(family, base, ckpt)
    gp = bool(args.is_general_preference)
    names = list(image_paths)
    result = {"batch_of_one": {}, "batched": {}, "inputs": {}}
    for prompt in PROMPTS:
        for name in names:
            batch, texts = official_inputs(family, processor, tokenizer, [image_paths[name]], prompt)
            reward, outputs, ids, mask = run_forward(family, model, batch)
            entry = {"score": reward_value(reward, 0, gp)}
            if family == "phi3_v":
                text = phi_prompt(tokenizer, prompt)
                # the README / simple_inference path must agree with the dataset path
                (single,) = inference_process_phi3v(args, processor, tokenizer, [image_paths[name]], prompt,
                                                    device="cpu")
                with torch.no_grad():
                    r2, _ = model.custom_forward(**single)
                assert torch.equal(r2, reward), (r2, reward)
                assert torch.equal(single["input_ids"], ids)
                extra = {"image_sizes": batch["image_sizes"].reshape(-1).tolist(),
                         "pixel_values": tensor_summary(batch["pixel_values"])}
                check_phi_facts(model, outputs, ids, facts)
            else:
                text = texts[0]
                extra = {"pixel_values": tensor_summary(batch["pixel_values"])}
                if family == "qwen2_5_vl":
                    extra["image_grid_thw"] = batch["image_grid_thw"].tolist()
                    check_qwen_facts(model, outputs, ids, facts)
                else:
                    extra["image_sizes"] = batch["image_sizes"].tolist()
            result["inputs"].setdefault(name, {})[prompt] = {
                "prompt_text": text, "input_ids_rle": rle(ids[0].tolist()), "num_input_ids": int(ids.shape[1]),
                **extra}
            result["batch_of_one"].setdefault(name, {})[prompt] = entry["score"]
            diff = formula_check(family, model, outputs, mask, reward)
            result["formula_max_abs_diff"] = max(result.get("formula_max_abs_diff", 0.0), diff)
        batch, _ = official_inputs(family, processor, tokenizer, [image_paths[n] for n in names], prompt)
        reward, _outputs, ids, mask = run_forward(family, model, batch)
        result["batched"][prompt] = {
            "images": names, "scores": [reward_value(reward, i, gp) for i in range(len(names))],
            "padded_length": int(ids.shape[1]), "num_real_tokens": mask.sum(1).tolist(),
            "padding_side": "left" if bool((mask[:, -1] == 1).all()) else "right"}
    result["head"] = "general_preference" if gp else "bradley_terry"
    result["value_head_dim"] = int(args.value_head_dim)
    result["add_cross_attention"] = bool(args.add_cross_attention)
    result["general_preference_tau"] = float(args.general_preference_tau)
    result["loaded_num_crops"] = getattr(getattr(processor, "image_processor", None), "num_crops", None)
    if family == "qwen2_5_vl":
        ip = processor.image_processor
        result["loaded_pixels"] = {"min_pixels_attr": ip.min_pixels, "max_pixels_attr": ip.max_pixels,
                                   "size": dict(ip.size)}
    del model
    return result


def formula_check(family, model, outputs, mask, reward):
    """Recompute the batch-of-one reward with the reading written in REPORT.md; return max |diff|."""
    import torch

    with torch.no_grad():
        if family == "phi3_v":
            h = outputs["last_hidden_state"]          # final hidden state, after the model's final norm
            kv = outputs["hidden_states"][-1]         # projected image features (image positions only)
        else:
            h = outputs["hidden_states"][-1]          # after the final norm as well
            kv = None
        if model.add_cross_attention and family == "phi3_v":
            q, k, v = model.W_q(h), model.W_k(kv), model.W_v(kv)
            att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(h.shape[-1]), dim=-1) @ v
            h = model.ca_layernorm(h + att)
        elif model.add_cross_attention and family == "qwen2_5_vl":
            h = model.ca_layernorm(h)                 # no id-151643 keys at batch 1: the attention adds 0
        values = model.value_head(h)
        last = mask.shape[1] - 1 - mask.long().fliplr().argmax(dim=1)
        mine = values[torch.arange(values.shape[0]), last]
    return float((mine.reshape(reward.shape) - reward).abs().max())


def check_phi_facts(model, outputs, ids, facts):
    """Check the vendored Phi3VModel's outputs['hidden_states'][-1] = projected image features."""
    import torch

    hs = outputs["hidden_states"]
    vis = hs[-1]
    n_img = int((ids < 0).sum())
    inputs_embeds = hs[0]
    img_rows = inputs_embeds[0, ids[0] < 0]
    facts.setdefault("phi3_v", {}).update({
        "hidden_states_len": len(hs),
        "num_decoder_layers": model.config.num_hidden_layers,
        "hidden_states[-1]_shape": list(vis.shape),
        "num_image_placeholder_ids": n_img,
        "hidden_states[-1]_equals_inputs_embeds_at_image_positions": bool(torch.equal(vis[0], img_rows)),
        "hidden_states[-2]_equals_last_hidden_state_after_norm": bool(torch.equal(hs[-2], outputs["last_hidden_state"])),
        "image_placeholder_id_values": sorted(set(int(v) for v in ids[0].tolist() if v < 0)),
    })


def check_qwen_facts(model, outputs, ids, facts):
    n_sel = int((ids == 151643).sum())
    facts.setdefault("qwen2_5_vl", {}).update({
        "positions_with_id_151643_at_batch_1": n_sel,
        "vocab_size": model.config.vocab_size,
    })


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def versions():
    import importlib.metadata as md
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "torchvision", "transformers", "peft", "accelerate", "tokenizers", "safetensors",
                "huggingface-hub", "numpy", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read())
    return h.hexdigest()


def copy_tree_without_py(src, dst):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.py", "__pycache__"))


def main(argv=None):
    # peft stores target_modules as a set; a fixed hash seed makes adapter_config.json byte-stable.
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__)] + list(sys.argv[1:] if argv is None else argv))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-src", default="/tmp/official_src",
                    help="sjz5202/LLaVA-Reward at f082993 (python sources)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "../../tests/fixtures/official"))
    ap.add_argument("--scratch", default="/tmp/official_parity_work",
                    help="scratch dir (its path must not contain 'phi', 'qwen' or 'llava': the official code "
                         "dispatches on substrings of the model path)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--skip-build", action="store_true", help="reuse bases/checkpoints in --scratch, only score")
    ap.add_argument("--compare-to", default=None,
                    help="an earlier scores.json: fail unless checkpoints/facts/file hashes are identical")
    args = ap.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    for bad in ("phi", "qwen", "llava"):
        if bad in os.path.abspath(args.scratch).lower():
            raise SystemExit(f"--scratch path must not contain {bad!r}")

    os.makedirs(args.scratch, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ["HF_HOME"] = os.path.join(args.scratch, "hf_home")
    os.environ["HF_MODULES_CACHE"] = os.path.join(args.scratch, "hf_modules")
    install_stubs()
    sys.path.insert(0, os.path.abspath(args.official_src))

    import torch
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    init_single_process_group(args.scratch)
    patch_phi3v_for_tiny_clip()

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    image_paths = make_images(os.path.join(out, "images"))
    scores_path = os.path.join(out, "scores.json")
    record = {}
    if os.path.exists(scores_path) and set(families) != set(FAMILIES):
        with open(scores_path) as f:
            record = json.load(f)
    record.update({
        "versions": versions(), "official_repo": "sjz5202/LLaVA-Reward", "official_commit": "f082993",
        "prompts": PROMPTS, "images": {n: {"file": f"images/{n}.png", "width": w, "height": h}
                                       for n, (w, h) in IMAGES.items()},
        "dtype": "float32", "lora": LORA,
    })
    record.setdefault("checkpoints", {})
    facts = record.setdefault("facts_checked", {})
    for family in families:
        base = os.path.join(args.scratch, family, "base")
        if not args.skip_build:
            if os.path.exists(base):
                shutil.rmtree(base)
            print(f"[{family}] building tiny base", flush=True)
            {"phi3_v": lambda: build_phi_base(base, args.official_src), "qwen2_5_vl": lambda: build_qwen_base(base),
             "llava_next": lambda: build_llava_base(base)}[family]()
        for name, settings in CHECKPOINTS[family].items():
            ckpt = os.path.join(args.scratch, family, name)
            if not args.skip_build:
                print(f"[{family}] official checkpoint {name}", flush=True)
                make_checkpoint(family, base, ckpt, settings)
            print(f"[{family}] scoring {name}", flush=True)
            res = score_checkpoint(family, base, ckpt, image_paths, facts)
            res.update({"family": family, "checkpoint_dir": f"{family}/{name}", "base_dir": f"{family}/base",
                        "hub_id": HUB_IDS[family], "zero_stage": settings["zero_stage"],
                        "weights_seed": settings["seed"]})
            record["checkpoints"][f"{family}/{name}"] = res
        copy_tree_without_py(base, os.path.join(out, family, "base"))
        for name in CHECKPOINTS[family]:
            copy_tree_without_py(os.path.join(args.scratch, family, name), os.path.join(out, family, name))
    files = {}
    for root, _dirs, fnames in os.walk(out):
        for fname in sorted(fnames):
            path = os.path.join(root, fname)
            rel = os.path.relpath(path, out)
            if rel != "scores.json":
                files[rel] = sha256(path)
    record["file_sha256"] = dict(sorted(files.items()))
    if args.compare_to:  # read before writing: --compare-to may name the file being rewritten
        with open(args.compare_to) as f:
            old = json.load(f)
    write_json(scores_path, record)
    print("wrote", scores_path, flush=True)
    if args.compare_to:
        bad = [k for k in ("checkpoints", "facts_checked", "file_sha256") if old.get(k) != record.get(k)]
        if bad:
            raise SystemExit(f"differs from {args.compare_to}: {bad}")
        print("identical to", args.compare_to, "(scores, inputs, facts, file hashes)", flush=True)


if __name__ == "__main__":
    main()
