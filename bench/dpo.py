"""Diffusion-DPO step time and peak memory: the reference as the policy's own UNet with its LoRA disabled (what
`DiffusionDPOTrainer` does) vs a reference held as a second UNet copy (the usual way), side by side, and the ratios.

    python bench/dpo.py [--unet small|medium|sd15] [--batch 4] [--steps 10] [--device cpu|cuda] [--output_dir runs/bench_dpo]

Both variants run the same training steps (same pairs, noise and timesteps) on a pipeline with random weights of
the chosen UNet size, each in its own child process so that peak memory is its own (CUDA: the allocator's peak;
CPU: the process's peak resident set). Prints a table and the ratios; writes `bench_dpo.json` into the output
directory. `sd15` is Stable Diffusion 1.5's UNet shape (860M parameters, 64x64 latents): a GPU size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from rlhf.generators.ddpo_pipeline import DDPOStableDiffusionPipeline
from rlhf.testing import TEXT_MAX_LENGTH, assemble_pipeline, tiny_sd_components
from trainers.common import peak_memory_mb, seeded_generator
from trainers.dpo import DiffusionDPOConfig, DiffusionDPOTrainer
from trainers.dpo_pairs import PairBatch

VARIANTS = {"lora_disabled": "reference = the policy UNet with its LoRA disabled", "second_copy": "reference = a second UNet"}
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]
UNETS = {
    "small": None,  # the toy generator's shape (rlhf.testing): 8x8 latents
    "medium": dict(
        sample_size=32, block_out_channels=(64, 128, 256), layers_per_block=1, cross_attention_dim=256,
        attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    "sd15": {},  # UNet2DConditionModel's defaults are Stable Diffusion 1.5's UNet
}


def build_model(size: str, directory: Path) -> Path:
    """A pipeline with a random UNet of `size` and a text encoder whose width matches its cross-attention."""
    components = tiny_sd_components(seed=0)
    if UNETS[size] is not None:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNETS[size])
        tokenizer = components["tokenizer"]
        components["unet"] = unet
        components["text_encoder"] = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=unet.config.cross_attention_dim, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=TEXT_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
    pipeline: StableDiffusionPipeline = assemble_pipeline(components)
    pipeline.save_pretrained(directory)
    return directory


class SecondCopyReferenceTrainer(DiffusionDPOTrainer):
    """The trainer with the usual reference: a frozen second UNet loaded from the base model."""

    def __init__(self, *args, reference_unet: torch.nn.Module, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reference_unet = reference_unet

    def reference_prediction(self, noisy, timesteps, conditioning):
        with torch.no_grad(), self.accelerator.autocast():
            return self.sd_pipeline.predict(noisy, timesteps, conditioning, 1.0, denoiser=self.reference_unet)


def run_variant(variant: str, model: Path, args: argparse.Namespace) -> dict:
    """Time `args.steps` training steps (after 2 warm-up steps) of one variant in this process."""
    device = torch.device(args.device)
    mixed_precision = "bf16" if device.type == "cuda" else "no"
    pipeline = DDPOStableDiffusionPipeline.from_pretrained(model, lora_rank=4)
    with tempfile.TemporaryDirectory() as output_dir:
        config = DiffusionDPOConfig(
            output_dir=output_dir, mixed_precision=mixed_precision, train_batch_size=args.batch, reward={"builtin": "brightness"},
        )
        options = dict(reward_function=lambda *a: None, prompt_function=lambda: PROMPTS[0])
        if variant == "second_copy":
            dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
            reference = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype)
            reference = reference.to(device).requires_grad_(False).eval()
            trainer = SecondCopyReferenceTrainer(config, pipeline, reference_unet=reference, **options)
        else:
            trainer = DiffusionDPOTrainer(config, pipeline, **options)
        shape = (args.batch, 4, pipeline.unet.config.sample_size, pipeline.unet.config.sample_size)
        data = torch.Generator().manual_seed(0)
        latents = [torch.randn(shape, generator=data).to(device) for _ in range(2)]
        prompts = [PROMPTS[i % 2] for i in range(args.batch)]
        conditioning = pipeline.encode_prompt(prompts, guidance=False)
        batch = PairBatch(latents[0], latents[1], {k: torch.cat([v, v]) for k, v in conditioning.items()})
        noise = seeded_generator(0, 0)
        losses, times = [], []
        for step in range(args.steps + 2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            stats = trainer.training_step([batch], noise)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 2:
                times.append(time.perf_counter() - began)
            losses.append(float(stats[0] / stats[-1]))
        unets = [trainer.sd_pipeline.unet] + ([trainer.reference_unet] if variant == "second_copy" else [])
        weights = sum(p.numel() * p.element_size() for unet in unets for p in unet.parameters()) / 2**20
    return {
        "variant": variant,
        "step_time_s": sum(times) / len(times),
        "peak_memory_mb": peak_memory_mb(device),
        "unet_weights_mb": weights,
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", choices=list(UNETS), default="medium")
    parser.add_argument("--batch", type=int, default=4, help="pairs per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_dir", default="runs/bench_dpo")
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # a child process's variant
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, Path(args.model), args)))
        return
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    model = build_model(args.unet, output / f"model_{args.unet}")
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--model", str(model), "--unet", args.unet,
                   "--batch", str(args.batch), "--steps", str(args.steps), "--device", args.device]
        finished = subprocess.run(command, capture_output=True, text=True, check=True)
        results[variant] = json.loads(finished.stdout.strip().splitlines()[-1])
    ours, copy = results["lora_disabled"], results["second_copy"]
    print(f"UNet {args.unet}, {args.batch} pairs per step, {args.steps} steps, device {args.device}")
    print(f"{'variant':15s} {'step time (s)':>14s} {'peak memory (MB)':>17s} {'UNet weights (MB)':>18s}")
    for variant, row in results.items():
        print(f"{variant:15s} {row['step_time_s']:14.4f} {row['peak_memory_mb']:17.1f} {row['unet_weights_mb']:18.1f}")
    ratios = {
        "step_time_second_copy_over_lora_disabled": copy["step_time_s"] / ours["step_time_s"],
        "peak_memory_second_copy_over_lora_disabled": copy["peak_memory_mb"] / ours["peak_memory_mb"],
        "max_loss_difference": max(abs(a - b) for a, b in zip(ours["losses"], copy["losses"])),
    }
    print(f"ratios (second copy / LoRA disabled): step time {ratios['step_time_second_copy_over_lora_disabled']:.3f}, "
          f"peak memory {ratios['peak_memory_second_copy_over_lora_disabled']:.3f}; "
          f"largest loss difference between the variants {ratios['max_loss_difference']:.2e}")
    (output / "bench_dpo.json").write_text(json.dumps({"args": vars(args), "results": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
