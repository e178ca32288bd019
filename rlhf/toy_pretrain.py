"""`rlhf toy pretrain`: pre-train the tiny Stable Diffusion pipeline on toy-world images (the toy generator)."""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline  # noqa: E402
from diffusers.optimization import get_cosine_schedule_with_warmup  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from rlhf.config import parse_config, save_config  # noqa: E402
from rlhf.testing import assemble_pipeline, tiny_sd_components  # noqa: E402
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


@dataclasses.dataclass
class ToyPretrainConfig:
    """Arguments of `rlhf toy pretrain`: a VAE phase (autoencoder on toy images), then a denoising phase
    (UNet and, optionally, the text encoder on the VAE's latents and the images' captions).
    Each field's default and meaning is in its help."""

    output_dir: str = dataclasses.field(default="", metadata={"help": "Where the pipeline is saved (required)."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed for weights, data and training."})
    n_images: int = dataclasses.field(default=8192, metadata={"help": "Toy images (with captions) to train on."})
    vae_steps: int = dataclasses.field(default=800, metadata={"help": "Autoencoder training steps."})
    vae_batch_size: int = dataclasses.field(default=32, metadata={"help": "Autoencoder batch size."})
    vae_learning_rate: float = dataclasses.field(default=4e-3, metadata={"help": "Autoencoder learning rate."})
    vae_kl_weight: float = dataclasses.field(
        default=1e-6, metadata={"help": "Weight of the KL term that keeps the latents near N(0, 1)."}
    )
    steps: int = dataclasses.field(default=800, metadata={"help": "Denoising (UNet) training steps."})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "Denoising batch size."})
    learning_rate: float = dataclasses.field(default=2e-3, metadata={"help": "Denoising learning rate (cosine decay)."})
    train_text_encoder: bool = dataclasses.field(
        default=True, metadata={"help": "Train the CLIP text encoder jointly with the UNet (else it stays random)."}
    )
    snr_gamma: float = dataclasses.field(
        default=5.0,
        metadata={"help": "Min-SNR loss weighting min(SNR, gamma) / SNR, which shifts the effort to the noisy steps "
                  "that decide colour and shape (0: plain MSE)."},
    )
    caption_dropout: float = dataclasses.field(
        default=0.1, metadata={"help": "Fraction of captions replaced by '' so classifier-free guidance works."}
    )
    eval_seeds: int = dataclasses.field(default=8, metadata={"help": "Samples per EVAL_PROMPTS prompt (seeds 0..N-1)."})
    eval_inference_steps: int = dataclasses.field(default=20, metadata={"help": "DDIM steps when evaluating."})
    eval_eta: float = dataclasses.field(default=1.0, metadata={"help": "DDIM eta when evaluating."})
    eval_guidance_scale: float = dataclasses.field(
        default=3.0, metadata={"help": "Guidance scale of the headline oracle numbers."}
    )
    report_guidance_scales: list[float] = dataclasses.field(
        default_factory=lambda: [1.0, 3.0, 5.0, 7.5],
        metadata={"help": "Guidance scales at which the oracle numbers are also reported."},
    )
    num_threads: int = dataclasses.field(
        default=1,
        metadata={"help": "torch CPU threads (0: torch's default); 1 is fastest on a shared CPU, and the committed "
                  "generator was trained with 1."},
    )

    def __post_init__(self) -> None:
        positive = ("n_images", "vae_batch_size", "steps", "batch_size", "eval_seeds", "eval_inference_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.vae_steps < 0:
            raise ValueError(f"vae_steps must be >= 0, got {self.vae_steps}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")


@torch.no_grad()
def evaluate_toy_generator(
    pipeline: StableDiffusionPipeline,
    prompts: Sequence[str] = EVAL_PROMPTS,
    seeds: Sequence[int] = range(8),
    num_inference_steps: int = 20,
    guidance_scale: float = 3.0,
    eta: float = 1.0,
) -> tuple[dict[str, float], torch.Tensor]:
    """Oracle numbers of `pipeline` on every prompt x seed (one generator per sample, so each is reproducible
    alone), and the images (prompt-major, BCHW in [0, 1]).

    Returns ({"alignment", "colour", "shape", "fidelity"}: means over samples, images).
    """
    all_prompts = [prompt for prompt in prompts for _ in seeds]
    generators = [torch.Generator().manual_seed(int(seed)) for _ in prompts for seed in seeds]
    images = pipeline(
        all_prompts,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        eta=eta,
        generator=generators,
        output_type="pt",
    ).images
    numbers = {
        "alignment": oracle_alignment(images, all_prompts).mean().item(),
        "colour": oracle_colour(images, all_prompts).mean().item(),
        "shape": oracle_shape(images, all_prompts).mean().item(),
        "fidelity": oracle_fidelity(images).mean().item(),
    }
    return numbers, images


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


def pretrain_toy_generator(config: ToyPretrainConfig) -> tuple[StableDiffusionPipeline, dict, torch.Tensor]:
    """Train the tiny pipeline on toy images and captions.

    Returns the pipeline, its report (oracle numbers per guidance scale, chance, timings) and the evaluation
    samples at the headline guidance scale (prompt-major).
    """
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    components = tiny_sd_components(config.seed)
    vae = components["vae"]
    images, captions = sample_toy_images(config.n_images, seed=config.seed)
    pixels = images * 2 - 1  # the VAE works in [-1, 1]

    _train_vae(vae, pixels, config)
    vae.requires_grad_(False)
    latent_means, latent_stds = _encode(vae, pixels)
    # SD's convention: latents are scaled to unit variance before diffusion and unscaled before decoding
    vae.register_to_config(scaling_factor=float(1.0 / latent_means.std()))

    history = _train_denoiser(components, latent_means, latent_stds, captions, config)
    train_seconds = time.perf_counter() - started

    pipeline = assemble_pipeline(components)
    pipeline.set_progress_bar_config(disable=True)
    seeds = range(config.eval_seeds)
    protocol = {
        "prompts": "EVAL_PROMPTS",
        "seeds": list(seeds),
        "num_inference_steps": config.eval_inference_steps,
        "eta": config.eval_eta,
        "scheduler": "DDIM",
    }
    per_guidance = {}
    for guidance in sorted({config.eval_guidance_scale, *config.report_guidance_scales}):
        per_guidance[str(guidance)], samples = evaluate_toy_generator(
            pipeline, EVAL_PROMPTS, seeds, config.eval_inference_steps, guidance, config.eval_eta
        )
        if guidance == config.eval_guidance_scale:
            headline = samples
    report = {
        "oracle": per_guidance[str(config.eval_guidance_scale)],
        "guidance_scale": config.eval_guidance_scale,
        "oracle_by_guidance_scale": per_guidance,
        "chance": _chance_numbers(EVAL_PROMPTS, config.eval_seeds, config.seed),
        "eval_protocol": protocol,
        "final_denoising_loss": sum(history[-100:]) / len(history[-100:]),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        # on a shared CPU the wall time depends on the neighbours; the process's CPU time less so
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "num_threads": torch.get_num_threads(),
    }
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
