"""`rlhf toy pretrain`: pre-train a tiny text-to-image pipeline on toy-world images.

`--family sd` (the default) makes the toy generator, a Stable Diffusion 1.x pipeline trained by noise prediction
(DDPM); `--family sd3` makes the toy flow generator, a Stable Diffusion 3 pipeline trained by rectified flow matching,
the family flow-based RL (GRPO) fine-tunes. Both are evaluated by the same oracle protocol.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.optimization import get_cosine_schedule_with_warmup  # noqa: E402
from diffusers.training_utils import compute_density_for_timestep_sampling  # noqa: E402
from transformers import CLIPTextModelWithProjection  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from rlhf.config import parse_config, save_config  # noqa: E402
from rlhf.testing import (  # noqa: E402
    LATENT_SIZE,
    _tiny_flow_clip_config,
    _tiny_t5_encoder,
    _tiny_t5_tokenizer,
    _tiny_vae,
    assemble_pipeline,
    build_tiny_tokenizer,
    tiny_sd_components,
)
from rlhf.toy import (  # noqa: E402
    EVAL_PROMPTS,
    TOY_COLOURS,
    TOY_SHAPES,
    oracle_alignment,
    oracle_colour,
    oracle_fidelity,
    oracle_shape,
    sample_toy_images,
)

# A shorter second-moment memory than the default 0.999: part of the settings with which, in a small sweep here,
# the tiny VAE learnt to reproduce the toy colours within its step budget.
ADAM_BETAS = (0.9, 0.99)


FAMILIES = ("sd", "sd3")
# Defaults that depend on the family (fields left unset): the SD toy generator's protocol (20 DDIM steps, eta 1) and
# the flow one's (deterministic Euler at 40 steps, Flow-GRPO's evaluation count, and at 10, its training count).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd": {
        "eval_inference_steps": 20,
        "eval_guidance_scale": 3.0,
        "report_guidance_scales": [1.0, 3.0, 5.0, 7.5],
        "report_inference_steps": [],
    },
    "sd3": {
        "eval_inference_steps": 40,
        "eval_guidance_scale": 3.0,
        "report_guidance_scales": [1.0, 3.0, 4.5],
        "report_inference_steps": [10],
    },
}


@dataclasses.dataclass
class ToyPretrainConfig:
    """Arguments of `rlhf toy pretrain`: a VAE phase (autoencoder on toy images), then a denoising phase
    (UNet or SD3 transformer and, optionally, the text encoders on the VAE's latents and the images' captions).
    Each field's default and meaning is in its help."""

    output_dir: str = dataclasses.field(default="", metadata={"help": "Where the pipeline is saved (required)."})
    family: str = dataclasses.field(
        default="sd",
        metadata={"help": "sd: Stable Diffusion 1.x (UNet, DDPM noise prediction, DDIM sampling); sd3: Stable "
                  "Diffusion 3 (SD3Transformer2DModel, two CLIPs and T5, rectified flow matching, Euler sampling).",
                  "choices": list(FAMILIES)},
    )
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed for weights, data and training."})
    n_images: int = dataclasses.field(default=8192, metadata={"help": "Toy images (with captions) to train on."})
    vae_steps: int = dataclasses.field(default=800, metadata={"help": "Autoencoder training steps."})
    vae_batch_size: int = dataclasses.field(default=32, metadata={"help": "Autoencoder batch size."})
    vae_learning_rate: float = dataclasses.field(default=4e-3, metadata={"help": "Autoencoder learning rate."})
    vae_kl_weight: float = dataclasses.field(
        default=1e-6, metadata={"help": "Weight of the KL term that keeps the latents near N(0, 1)."}
    )
    steps: int = dataclasses.field(default=800, metadata={"help": "Denoising (UNet or transformer) training steps."})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "Denoising batch size."})
    learning_rate: float = dataclasses.field(default=2e-3, metadata={"help": "Denoising learning rate (cosine decay)."})
    train_text_encoder: bool = dataclasses.field(
        default=True,
        metadata={"help": "Train the text encoders (CLIP; for sd3 both CLIPs and T5) jointly with the denoiser "
                  "(else they stay random)."},
    )
    snr_gamma: float = dataclasses.field(
        default=5.0,
        metadata={"help": "sd only: Min-SNR loss weighting min(SNR, gamma) / SNR, which shifts the effort to the "
                  "noisy steps that decide colour and shape (0: plain MSE)."},
    )
    logit_mean: float = dataclasses.field(
        default=0.0, metadata={"help": "sd3 only: mean of SD3's logit-normal timestep density (before the shift)."}
    )
    logit_std: float = dataclasses.field(
        default=1.0, metadata={"help": "sd3 only: std of SD3's logit-normal timestep density."}
    )
    caption_dropout: float = dataclasses.field(
        default=0.1, metadata={"help": "Fraction of captions replaced by '' so classifier-free guidance works."}
    )
    eval_seeds: int = dataclasses.field(default=8, metadata={"help": "Samples per EVAL_PROMPTS prompt (seeds 0..N-1)."})
    eval_inference_steps: int | None = dataclasses.field(
        default=None,
        metadata={"help": "Sampling steps of the headline numbers (unset: 20 DDIM for sd, 40 Euler for sd3)."},
    )
    eval_eta: float = dataclasses.field(default=1.0, metadata={"help": "sd only: DDIM eta when evaluating."})
    eval_guidance_scale: float | None = dataclasses.field(
        default=None, metadata={"help": "Guidance scale of the headline oracle numbers (unset: 3.0)."}
    )
    report_guidance_scales: list[float] | None = dataclasses.field(
        default=None,
        metadata={"help": "Guidance scales at which the oracle numbers are also reported "
                  "(unset: 1, 3, 5, 7.5 for sd; 1, 3, 4.5 for sd3)."},
    )
    report_inference_steps: list[int] | None = dataclasses.field(
        default=None,
        metadata={"help": "Sampling step counts at which the headline guidance is also reported (unset: none for sd, "
                  "10 for sd3)."},
    )
    num_threads: int = dataclasses.field(
        default=1,
        metadata={"help": "torch CPU threads (0: torch's default); 1 is fastest on a shared CPU, and the committed "
                  "generators were trained with 1."},
    )

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        for name, value in _FAMILY_DEFAULTS[self.family].items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        positive = ("n_images", "vae_batch_size", "steps", "batch_size", "eval_seeds", "eval_inference_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if any(steps < 1 for steps in self.report_inference_steps):
            raise ValueError(f"report_inference_steps must be positive integers, got {self.report_inference_steps}")
        if self.vae_steps < 0:
            raise ValueError(f"vae_steps must be >= 0, got {self.vae_steps}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {self.logit_std}")


@torch.no_grad()
def evaluate_toy_generator(
    pipeline: DiffusionPipeline,
    prompts: Sequence[str] = EVAL_PROMPTS,
    seeds: Sequence[int] = range(8),
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float | None = None,
) -> tuple[dict[str, float], torch.Tensor]:
    """Oracle numbers of a diffusers text-to-image `pipeline` (SD, SD3, ...) on every prompt x seed (one generator
    per sample, so each is reproducible alone), and the images (prompt-major, BCHW in [0, 1]).

    `eta` is DDIM's stochasticity, passed only when given: a flow pipeline's Euler sampler has none.
    Returns ({"alignment", "colour", "shape", "fidelity"}: means over samples, images).
    """
    all_prompts = [prompt for prompt in prompts for _ in seeds]
    generators = [torch.Generator().manual_seed(int(seed)) for _ in prompts for seed in seeds]
    options = {} if eta is None else {"eta": eta}
    images = pipeline(
        all_prompts,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generators,
        output_type="pt",
        **options,
    ).images
    numbers = {
        "alignment": oracle_alignment(images, all_prompts).mean().item(),
        "colour": oracle_colour(images, all_prompts).mean().item(),
        "shape": oracle_shape(images, all_prompts).mean().item(),
        "fidelity": oracle_fidelity(images).mean().item(),
    }
    return numbers, images


def oracle_by_seed(images: torch.Tensor, prompts: Sequence[str], n_seeds: int) -> dict[str, list[float]]:
    """Per-seed oracle means (alignment, colour, shape) of prompt-major `images` from `evaluate_toy_generator`:
    seed k's number is its mean over the prompts, so a re-evaluation on a few seeds can be checked against them."""
    all_prompts = [prompt for prompt in prompts for _ in range(n_seeds)]
    return {
        name: oracle(images, all_prompts).reshape(len(prompts), n_seeds).mean(dim=0).tolist()
        for name, oracle in (("alignment", oracle_alignment), ("colour", oracle_colour), ("shape", oracle_shape))
    }


def _seed_statistics(images: torch.Tensor, prompts: Sequence[str], n_seeds: int) -> dict[str, dict]:
    """`oracle_by_seed` and its standard deviation over seeds: how far one seed's evaluation sits from the mean."""
    by_seed = oracle_by_seed(images, prompts, n_seeds)
    spread = {name: torch.tensor(values).std().item() if n_seeds > 1 else 0.0 for name, values in by_seed.items()}
    return {"std_over_seeds": spread, "by_seed": by_seed}


def _chance_numbers(prompts: Sequence[str], samples_per_prompt: int, seed: int) -> dict[str, float]:
    """Oracle numbers of a perfect drawer that ignores the prompt: clean random toy images, scored against `prompts`."""
    images, _ = sample_toy_images(len(prompts) * samples_per_prompt, seed=seed + 1)
    all_prompts = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    return {
        "alignment": oracle_alignment(images, all_prompts).mean().item(),
        "colour": oracle_colour(images, all_prompts).mean().item(),
        "shape": oracle_shape(images, all_prompts).mean().item(),
        "analytic_alignment": 1 / (len(TOY_COLOURS) * len(TOY_SHAPES)),
    }


def _train_vae(vae: AutoencoderKL, pixels: torch.Tensor, config: ToyPretrainConfig) -> None:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0, betas=ADAM_BETAS)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.vae_steps // 20, config.vae_steps)
    generator = torch.Generator().manual_seed(config.seed)
    vae.train()
    progress = tqdm(range(config.vae_steps), desc="toy pretrain: vae", unit="step")
    for _ in progress:
        batch = pixels[torch.randint(0, len(pixels), (config.vae_batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(reconstruction, batch) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def _encode(vae: AutoencoderKL, pixels: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    posteriors = [vae.encode(pixels[i : i + batch_size]).latent_dist for i in range(0, len(pixels), batch_size)]
    return torch.cat([p.mean for p in posteriors]), torch.cat([p.std for p in posteriors])


def _min_snr_weights(scheduler: DDIMScheduler, gamma: float) -> torch.Tensor:
    """Per-timestep loss weights min(SNR, gamma) / SNR (all ones when gamma is 0)."""
    signal_to_noise = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    return signal_to_noise.clamp(max=gamma) / signal_to_noise if gamma > 0 else torch.ones(len(signal_to_noise))


def _train_denoiser(
    components: dict, latent_means: torch.Tensor, latent_stds: torch.Tensor, captions: list[str],
    config: ToyPretrainConfig,
) -> list[float]:
    """Train the UNet (and the text encoder, if asked) to predict the noise; return the per-step mean loss."""
    unet, text_encoder, tokenizer = components["unet"], components["text_encoder"], components["tokenizer"]
    scheduler = components["scheduler"]
    scale = components["vae"].config.scaling_factor

    def token_ids(texts: list[str]) -> torch.Tensor:
        return tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    caption_ids = token_ids(captions)
    empty_ids = token_ids([""])
    text_encoder.requires_grad_(config.train_text_encoder)
    parameters = list(unet.parameters()) + (list(text_encoder.parameters()) if config.train_text_encoder else [])
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=1e-4, betas=ADAM_BETAS)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.steps // 20, config.steps)
    snr_weights = _min_snr_weights(scheduler, config.snr_gamma)
    generator = torch.Generator().manual_seed(config.seed + 1)
    unet.train()
    text_encoder.train(config.train_text_encoder)
    history = []
    progress = tqdm(range(config.steps), desc="toy pretrain: unet", unit="step")
    for _ in progress:
        index = torch.randint(0, config.n_images, (config.batch_size,), generator=generator)
        noise_in_latent = torch.randn(latent_means[index].shape, generator=generator)
        latents = (latent_means[index] + latent_stds[index] * noise_in_latent) * scale
        ids = caption_ids[index].clone()
        dropped = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        ids[dropped] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * snr_weights[timesteps]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        history.append(per_sample.mean().item())
        progress.set_postfix(loss=f"{sum(history[-50:]) / len(history[-50:]):.4f}")
    unet.eval()
    text_encoder.eval()
    return history


def tiny_sd3_toy_components(seed: int = 0) -> dict[str, Any]:
    """Randomly initialised parts of the toy flow generator, seeded: SD3's layout at toy size (32 px images, 8x8x16
    latents, patch 2) with the text encoders and tokenizers of `rlhf.testing.build_tiny_sd3` (two CLIPs with
    projection, a T5, all built locally), so a plain `StableDiffusion3Pipeline.from_pretrained` loads the result.

    The transformer is wider and deeper than the plumbing fixture's (4 layers, 4 heads x 16): enough to learn the
    toy world in minutes on a CPU, still a few MB.
    """
    tokenizer, t5_tokenizer = build_tiny_tokenizer(), _tiny_t5_tokenizer()
    torch.manual_seed(seed)
    clip_config = _tiny_flow_clip_config(tokenizer)
    text_encoder, text_encoder_2 = CLIPTextModelWithProjection(clip_config), CLIPTextModelWithProjection(clip_config)
    text_encoder_3 = _tiny_t5_encoder(t5_tokenizer)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        # SD3's encode_prompt puts the two CLIPs' hidden states side by side, padded to T5's width
        joint_attention_dim=text_encoder_3.config.d_model,
        caption_projection_dim=64,
        pooled_projection_dim=2 * clip_config.projection_dim,
        pos_embed_max_size=LATENT_SIZE,
    )
    # SD3's VAE layout (16 channels, no quant convs); shift and scale are measured on the toy latents after training
    vae = _tiny_vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0,
                    scaling_factor=1.0)
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's shift
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer,
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": t5_tokenizer,
    }


def _train_flow_transformer(
    pipeline: StableDiffusion3Pipeline, latent_means: torch.Tensor, latent_stds: torch.Tensor, captions: list[str],
    config: ToyPretrainConfig,
) -> list[float]:
    """Train the SD3 transformer (and the CLIPs, if asked) by rectified flow matching: x_s = (1 - s) x0 + s noise,
    target noise - x0, s drawn from SD3's logit-normal density mapped through the scheduler's shifted sigmas (as
    diffusers' SD3 training scripts do). Prompts go through the pipeline's own `encode_prompt`, so training sees
    exactly the text embeddings sampling will. Returns the per-step mean loss."""
    transformer = pipeline.transformer
    text_encoders = [pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3]
    # a scheduler at its training resolution: `sigmas` holds all num_train_timesteps shifted sigmas
    train_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)
    sigmas, timesteps = train_scheduler.sigmas, train_scheduler.timesteps
    shift, scale = pipeline.vae.config.shift_factor, pipeline.vae.config.scaling_factor

    parameters = list(transformer.parameters())
    for encoder in text_encoders:
        encoder.requires_grad_(config.train_text_encoder)
        encoder.train(config.train_text_encoder)
        if config.train_text_encoder:
            parameters += list(encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=1e-4, betas=ADAM_BETAS)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.steps // 20, config.steps)
    generator = torch.Generator().manual_seed(config.seed + 1)
    transformer.train()
    history = []
    progress = tqdm(range(config.steps), desc="toy pretrain: sd3 transformer", unit="step")
    for _ in progress:
        index = torch.randint(0, config.n_images, (config.batch_size,), generator=generator)
        noise_in_latent = torch.randn(latent_means[index].shape, generator=generator)
        clean = (latent_means[index] + latent_stds[index] * noise_in_latent - shift) * scale
        dropped = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        texts = ["" if drop else captions[i] for i, drop in zip(index.tolist(), dropped.tolist())]
        with torch.set_grad_enabled(config.train_text_encoder):
            prompt_embeds, _, pooled_embeds, _ = pipeline.encode_prompt(
                texts, None, None, do_classifier_free_guidance=False
            )
        noise = torch.randn(clean.shape, generator=generator)
        density = compute_density_for_timestep_sampling(
            "logit_normal", config.batch_size, config.logit_mean, config.logit_std, generator=generator
        )
        step_index = (density * train_scheduler.config.num_train_timesteps).long()
        sigma = sigmas[step_index].view(-1, 1, 1, 1)
        noisy = (1 - sigma) * clean + sigma * noise
        prediction = transformer(
            hidden_states=noisy, timestep=timesteps[step_index], encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled_embeds,
        ).sample
        loss = (prediction - (noise - clean)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        history.append(loss.item())
        progress.set_postfix(loss=f"{sum(history[-50:]) / len(history[-50:]):.4f}")
    transformer.eval()
    for encoder in text_encoders:
        encoder.eval()
        encoder.requires_grad_(False)
    return history


def pretrain_toy_generator(config: ToyPretrainConfig) -> tuple[DiffusionPipeline, dict, torch.Tensor]:
    """Train the tiny pipeline of `config.family` on toy images and captions.

    Returns the pipeline, its report (oracle numbers per guidance scale, chance, timings) and the evaluation
    samples at the headline guidance scale (prompt-major).
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    flow = config.family == "sd3"
    components = tiny_sd3_toy_components(config.seed) if flow else tiny_sd_components(config.seed)
    vae = components["vae"]
    images, captions = sample_toy_images(config.n_images, seed=config.seed)
    pixels = images * 2 - 1  # the VAE works in [-1, 1]

    _train_vae(vae, pixels, config)
    vae.requires_grad_(False)
    latent_means, latent_stds = _encode(vae, pixels)
    if flow:
        # SD3's convention: latents are shifted and scaled to zero mean and unit variance before the flow
        vae.register_to_config(shift_factor=float(latent_means.mean()), scaling_factor=float(1.0 / latent_means.std()))
        pipeline = StableDiffusion3Pipeline(**components)
        history = _train_flow_transformer(pipeline, latent_means, latent_stds, captions, config)
    else:
        # SD's convention: latents are scaled to unit variance before diffusion and unscaled before decoding
        vae.register_to_config(scaling_factor=float(1.0 / latent_means.std()))
        history = _train_denoiser(components, latent_means, latent_stds, captions, config)
        pipeline = assemble_pipeline(components)
    train_seconds = time.perf_counter() - started

    pipeline.set_progress_bar_config(disable=True)
    seeds = range(config.eval_seeds)
    eta = None if flow else config.eval_eta
    protocol = {
        "prompts": "EVAL_PROMPTS",
        "seeds": list(seeds),
        "num_inference_steps": config.eval_inference_steps,
        **({"scheduler": "FlowMatchEulerDiscrete (deterministic Euler)"} if flow
           else {"eta": eta, "scheduler": "DDIM"}),
    }
    per_guidance = {}
    for guidance in sorted({config.eval_guidance_scale, *config.report_guidance_scales}):
        per_guidance[str(guidance)], samples = evaluate_toy_generator(
            pipeline, EVAL_PROMPTS, seeds, config.eval_inference_steps, guidance, eta
        )
        if guidance == config.eval_guidance_scale:
            headline = samples
    report = {
        "oracle": per_guidance[str(config.eval_guidance_scale)],
        "guidance_scale": config.eval_guidance_scale,
        "oracle_by_guidance_scale": per_guidance,
    }
    if flow:
        report["oracle_seeds"] = _seed_statistics(headline, EVAL_PROMPTS, config.eval_seeds)
    if config.report_inference_steps:
        by_steps = {}
        for steps in config.report_inference_steps:
            numbers, samples = evaluate_toy_generator(
                pipeline, EVAL_PROMPTS, seeds, steps, config.eval_guidance_scale, eta
            )
            by_steps[str(steps)] = {**numbers, **_seed_statistics(samples, EVAL_PROMPTS, config.eval_seeds)}
        report["oracle_by_inference_steps"] = by_steps
    report.update({
        "chance": _chance_numbers(EVAL_PROMPTS, config.eval_seeds, config.seed),
        "eval_protocol": protocol,
        "final_denoising_loss": sum(history[-100:]) / len(history[-100:]),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        # on a shared CPU the wall time depends on the neighbours; the process's CPU time less so
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "num_threads": torch.get_num_threads(),
    })
    return pipeline, report, headline


def _save_sample_grid(images: torch.Tensor, prompts: Sequence[str], per_prompt: int, path: Path) -> None:
    figure, axes = plt.subplots(
        len(prompts), per_prompt, figsize=(per_prompt * 0.9, len(prompts) * 0.9), squeeze=False
    )
    for row, prompt in enumerate(prompts):
        for column in range(per_prompt):
            axis = axes[row][column]
            axis.imshow(images[row * per_prompt + column].permute(1, 2, 0).clamp(0, 1).numpy())
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(" ".join(prompt.split()[1:3]), fontsize=6, rotation=0, ha="right", va="center")
    figure.tight_layout(pad=0.2)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str]) -> int:
    """`rlhf toy pretrain --output_dir DIR [--steps N] [--seed S] [--field value ...]`."""
    (config,) = parse_config(ToyPretrainConfig, argv)
    if not config.output_dir:
        raise ValueError("--output_dir is required: the directory the toy generator is saved into")
    output_dir = Path(config.output_dir)
    pipeline, report, samples = pretrain_toy_generator(config)
    pipeline.save_pretrained(output_dir)
    save_config(config, output_dir / "toy_pretrain_config.yaml")
    _save_sample_grid(samples, EVAL_PROMPTS, config.eval_seeds, output_dir / "samples.png")
    report["command"] = "rlhf toy pretrain " + shlex.join(argv)
    (output_dir / "toy_generator.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("oracle", "chance", "wall_seconds")}, indent=2))
    return 0
