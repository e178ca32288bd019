"""Tiny offline diffusion pipelines with random weights (SD 1.x, SD3, FLUX.1) for plumbing tests; the committed,
pre-trained toy generators are in `rlhf.toy.generators`."""

from __future__ import annotations

import string
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from rlhf.toy import TOY_VOCABULARY

IMAGE_SIZE = 32
# Three VAE down blocks give 8x8 latents (two would give 16x16): the UNet stays cheap and 32 px images stay sharp.
LATENT_SIZE = 8
TEXT_MAX_LENGTH = 16
# Words beyond the toy world so that ordinary test prompts ("a photo of a cat") get whole-word tokens too.
EXTRA_WORDS: tuple[str, ...] = ("the", "an", "of", "in", "with", "and", "photo", "picture", "cat", "dog", "shape")
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges learnt on `words` until each is one token; ties go to the smallest pair, so the result
    (and with it every token id) is the same in every process, unlike the `tokenizers` trainer's."""
    segmented = [list(word[:-1]) + [word[-1] + "</w>"] for word in words]
    merges: list[tuple[str, str]] = []
    while any(len(parts) > 1 for parts in segmented):
        counts = Counter(pair for parts in segmented for pair in zip(parts, parts[1:]))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for index, parts in enumerate(segmented):
            merged, position = [], 0
            while position < len(parts):
                if tuple(parts[position : position + 2]) == best:
                    merged.append(parts[position] + parts[position + 1])
                    position += 2
                else:
                    merged.append(parts[position])
                    position += 1
            segmented[index] = merged
    return merges


def build_tiny_tokenizer(words: tuple[str, ...] = TOY_VOCABULARY + EXTRA_WORDS) -> CLIPTokenizer:
    """A CLIP tokenizer built locally and deterministically: byte-level BPE whose merges make each of `words`
    one token. Any other text still tokenizes, into byte-level characters."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _learn_merges(sorted(set(words)))
    tokens = alphabet + [char + "</w>" for char in alphabet] + ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_MAX_LENGTH)


def tiny_sd_components(seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> dict[str, Any]:
    """Randomly initialised components of the tiny pipeline (32 px images, 8x8x4 latents), seeded."""
    tokenizer = tokenizer or build_tiny_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = _tiny_vae(latent_channels=4)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def assemble_pipeline(components: dict[str, Any]) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` from tiny components, without safety checker or feature extractor."""
    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _tiny_vae(**options) -> AutoencoderKL:
    """A three-block VAE at the tiny pipelines' size (8x downsampling); `options` set the family's latent layout."""
    return AutoencoderKL(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 16, 32), layers_per_block=1,
        norm_num_groups=4, **options,
    )


def build_tiny_sd(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion pipeline to `path` with `save_pretrained`; return the path.

    For plumbing tests only: a random VAE decodes near-uniform grey whatever the prompt.
    Load it with `StableDiffusionPipeline.from_pretrained(path)`.
    """
    path = Path(path)
    assemble_pipeline(tiny_sd_components(seed)).save_pretrained(path)
    return path


def build_tiny_sd3(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion 3 pipeline to `path` with `save_pretrained`; return the path.

    SD3's parts at toy size (32 px images, 8x8x16 latents): an `SD3Transformer2DModel`, a 16-channel VAE with SD3's
    shift and scaling factors, two CLIP text encoders with projection, a T5 encoder, their tokenizers built locally
    (the CLIP one of `build_tiny_sd`; a unigram T5 one whose pieces are the same words, plus letters and digits for
    any other text), and a `FlowMatchEulerDiscreteScheduler` with SD3's shift 3. For plumbing tests only: random
    weights. Load it with `StableDiffusion3Pipeline.from_pretrained(path)`.
    """
    path = Path(path)
    clip_tokenizer = build_tiny_tokenizer()
    t5_tokenizer = _tiny_t5_tokenizer()

    torch.manual_seed(seed)
    # joint_attention_dim = T5's width (32) holds the two CLIPs' hidden states side by side (16 + 16), and
    # pooled_projection_dim their two projections, as SD3's encode_prompt concatenates them.
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        pos_embed_max_size=LATENT_SIZE,
    )
    vae = _tiny_vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                    scaling_factor=1.5305)  # SD3's VAE: 16 latent channels, no quant convs, its shift and scale
    clip_config = _tiny_flow_clip_config(clip_tokenizer)
    text_encoder, text_encoder_2 = CLIPTextModelWithProjection(clip_config), CLIPTextModelWithProjection(clip_config)
    text_encoder_3 = _tiny_t5_encoder(t5_tokenizer)
    StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    ).save_pretrained(path)
    return path


def _tiny_t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer built locally: the tiny CLIP one's words as whole pieces, plus letters and digits so
    that any other text tokenizes too."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in sorted(set(TOY_VOCABULARY + EXTRA_WORDS))]
    pieces += [(char, -5.0) for char in string.ascii_lowercase + string.digits]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _tiny_t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    """A two-layer T5 encoder of width 32 (the tiny flow transformers' joint attention width); draws from the
    global RNG, so the caller seeds it."""
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _tiny_flow_clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """The CLIP text encoders of the tiny flow pipelines: width 16 (SD3 puts two side by side in T5's 32)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        projection_dim=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_flux(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random FLUX.1-dev pipeline to `path` with `save_pretrained`; return the path.

    FLUX.1's parts at toy size (32 px images, 8x8x16 latents packed into 16 tokens of 64 channels): a
    `FluxTransformer2DModel` with a guidance embedding (as FLUX.1-dev, guidance-distilled), one double and one
    single block; a 16-channel VAE with FLUX's shift and scaling factors; a CLIP text encoder (its pooled output) and
    a T5 encoder with the local tokenizers of `build_tiny_sd3`; and FLUX's `FlowMatchEulerDiscreteScheduler` with
    resolution-dependent (dynamic) shifting. For plumbing tests only: random weights. Load it with
    `FluxPipeline.from_pretrained(path)`.
    """
    path = Path(path)
    clip_tokenizer = build_tiny_tokenizer()
    t5_tokenizer = _tiny_t5_tokenizer()
    torch.manual_seed(seed)
    # the rotary axes (4 + 6 + 6) split attention_head_dim; joint_attention_dim is T5's width, pooled CLIP's
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    vae = _tiny_vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
                    scaling_factor=0.3611)  # FLUX's VAE: 16 latent channels, no quant convs, its shift and scale
    text_encoder = CLIPTextModel(_tiny_flow_clip_config(clip_tokenizer))
    text_encoder_2 = _tiny_t5_encoder(t5_tokenizer)
    # FLUX.1-dev's scheduler config: the shift grows with the image's token count (mu from calculate_shift)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    ).save_pretrained(path)
    return path
