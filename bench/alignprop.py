"""Reward back-propagation memory and time: gradient checkpointing on/off and truncation K = 1, 5, all steps (and
DRaFT-LV), one training step each (AlignPropTrainer's sampling: prepare_sampling + sample_with_grad, then a
differentiable reward and backward), measured side by side.

    python bench/alignprop.py [--preset small|sd15] [--size 64] [--steps 10] [--batch 2] [--device cpu|cuda]
                              [--dtype float32|bfloat16|float16] [--threads 1] [--repeats 2]

Presets build a random pipeline larger than the tiny one: "small" (64 px images, 16x16 latents, a 3-level UNet of
width 64, CPU-sized) and "sd15" (Stable Diffusion 1.5's UNet shape, 860M parameters, 512 px; for a GPU). Random
weights change neither memory nor time. Every variant runs in its own process, so its peak is its own:
- CUDA: `torch.cuda.max_memory_allocated` during the steps, minus what was allocated before them (weights, LoRA);
- CPU: the process's max resident set size (`ru_maxrss`) after one step minus its resident set before it
  (tracemalloc does not see torch's allocator), in a process where glibc mmaps every block >= 64 KiB so that
  freed memory leaves the resident set; small blocks and page rounding remain, so read the ratios.
Time, in a separate normal process, is the fastest of `--repeats` steps after one warm-up (other load on a shared
machine only ever adds time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# name -> (gradient checkpointing, K or None = all steps, DRaFT-LV copies)
VARIANTS: dict[str, tuple[bool, int | None, int]] = {
    "plain K=all": (False, None, 0),
    "ckpt K=all": (True, None, 0),
    "plain K=5": (False, 5, 0),
    "ckpt K=5": (True, 5, 0),
    "plain K=1": (False, 1, 0),
    "ckpt K=1": (True, 1, 0),
    "ckpt LV n=2": (True, 1, 2),
}
PROMPTS = ("a red circle on a white background", "a blue square on a black background")


def build_pipeline(preset: str, size: int, device: str, dtype: torch.dtype):
    """A random pipeline of `preset`'s shape as a LoRA policy, frozen weights in `dtype`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rlhf.generators.ddpo_pipeline import DDPOStableDiffusionPipeline
    from rlhf.testing import TEXT_MAX_LENGTH, assemble_pipeline, tiny_sd_components

    components = tiny_sd_components(seed=0)
    tokenizer = components["tokenizer"]
    if preset == "small":
        unet_options = dict(block_out_channels=(64, 128, 128), layers_per_block=1, cross_attention_dim=32,
                            attention_head_dim=8, norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D",) * 3,
                            up_block_types=("CrossAttnUpBlock2D",) * 3)
        latent = size // 4  # the tiny VAE's three blocks downsample by 4
    else:
        unet_options = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                            attention_head_dim=8, norm_num_groups=32,
                            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        latent = size // 8
        components["vae"] = AutoencoderKL(  # SD's VAE shape: 4 blocks, 8x downsampling
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=size,
        )
        components["text_encoder"] = CLIPTextModel(CLIPTextConfig(  # width 768 to match cross-attention; 2 layers
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=1024, num_hidden_layers=2,
            num_attention_heads=12, max_position_embeddings=TEXT_MAX_LENGTH, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4, **unet_options)
    policy = DDPOStableDiffusionPipeline(assemble_pipeline(components))
    policy.set_progress_bar_config(disable=True)
    return policy.to(device, dtype)


def current_mb(device: torch.device) -> float:
    """What is held now: CUDA-allocated memory, or the resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    """One variant in this process: a warm-up step, then `--repeats` timed steps; peak memory above the baseline."""
    from rlhf.generators.backprop import sample_with_grad
    from rlhf.toy import colour_score
    from trainers.common import peak_memory_mb

    torch.set_num_threads(args.threads)
    checkpoint, k, copies = VARIANTS[args.variant]
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    policy = build_pipeline(args.preset, args.size, args.device, dtype)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    scored = [p for p in prompts for _ in range(max(copies, 1))]

    def training_step(seed: int) -> float:
        began = time.perf_counter()
        generator = torch.Generator().manual_seed(seed)
        conditioning, latents, timesteps = policy.prepare_sampling(
            prompts, num_inference_steps=args.steps, guidance_scale=5.0, height=args.size, width=args.size,
            generator=generator,
        )
        output = sample_with_grad(
            policy, conditioning, latents, timesteps, guidance_scale=5.0, eta=1.0, generator=generator,
            backprop_steps=0 if copies else (k or args.steps), gradient_checkpoint=checkpoint, lv_copies=copies,
        )
        (-colour_score(output.images, scored).mean()).backward()
        policy.denoiser.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - began

    if args.measure == "time":
        times = [training_step(seed) for seed in range(1 + args.repeats)]
        return {"step_s": min(times[1:])}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline = current_mb(device)
    training_step(0)
    return {"peak_mb": peak_memory_mb(device) - baseline, "baseline_mb": baseline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["small", "sd15"], default="small")
    parser.add_argument("--size", type=int, default=0, help="image side in pixels (default 64 small, 512 sd15)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    parser.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up (default 2)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.preset == "small" else 512)
    if args.steps < 5:
        parser.error("--steps: expected at least 5 (the K = 5 variants)")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    results = {}
    # glibc keeps freed heap memory resident; with every block of 64 KiB or more mmap'd (and unmapped when freed)
    # the CPU resident set follows what is live. It slows allocation, so time is measured in a normal process.
    memory_environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for name in VARIANTS:
        results[name] = {}
        for measure, environment in (("time", None), ("memory", memory_environment)):
            command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--variant", name,
                       "--measure", measure]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=environment)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            results[name].update(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name:>12}: step {results[name]['step_s']:.3f} s, peak +{results[name]['peak_mb']:.1f} MB", flush=True)
    memory = "cuda max_memory_allocated" if args.device.startswith("cuda") else "CPU max RSS growth, mmap-tracked"
    print(f"\n{args.preset} preset, {args.size} px, {args.steps} steps, batch {args.batch}, {args.dtype} on "
          f"{args.device}; memory = {memory} above the weights")
    print(f"{'variant':>12} {'step s':>8} {'peak MB':>9} {'time / plain K=all':>19} {'mem / plain K=all':>18}")
    reference = results["plain K=all"]
    for name, row in results.items():
        print(f"{name:>12} {row['step_s']:8.3f} {row['peak_mb']:9.1f} {row['step_s'] / reference['step_s']:19.2f} "
              f"{row['peak_mb'] / max(reference['peak_mb'], 1e-9):18.2f}")
    for k in ("all", "5", "1"):
        plain, ckpt = results[f"plain K={k}"], results[f"ckpt K={k}"]
        print(f"checkpointing at K={k}: memory x{ckpt['peak_mb'] / max(plain['peak_mb'], 1e-9):.2f}, "
              f"time x{ckpt['step_s'] / plain['step_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
