"""One prepared script for a lent GPU: full-size models with random weights, every figure in one table and one JSON.

    python bench/gpu.py --device cuda --dtype bfloat16                     # full sizes, on a GPU
    python bench/gpu.py --small --device cpu --dtype float32               # small sizes, on a CPU (the test)

Sections (each guarded: one that fails, e.g. out of memory, prints its error in its row and the next one runs):
1. reward model: a Phi-3.5-vision-sized LLaVA (`build_tiny_vlm(size="phi35")`: CLIP ViT-L/14-336 + a 3.8B
   Llama-shaped text model) with 4 perspectives; `score(images, prompts)` under no_grad at batch 32, after a
   warm-up: images/s and ms per image (all 4 perspectives per image). `--small`: size "tiny", batch 4.
2. DDPO: SD 1.5's UNet shape (`bench/alignprop.py`'s "sd15" preset), `DDPOTrainer.step` at 512 px, 50 DDIM steps,
   CFG 5; samples/s of the sampling phase and of the training phase (PPO on every timestep, one timestep per UNet
   call), after one warm-up epoch. The reward is the toy colour score (microseconds): section 1 times the reward
   model. `--small`: the "small" preset, 64 px, 4 steps.
3. AlignProp: peak memory of one `rgb_with_grad` step + backward with gradient checkpointing, K=1 and K=all (50
   steps, 512 px; `--small`: 5 steps, 64 px), each in its own process by `bench/alignprop.py`: on CUDA
   `max_memory_allocated` above the weights, on a CPU the growth of the max resident set.
4. GRPO on SD3.5-Medium's shape: its `SD3Transformer2DModel` (24 MMDiT blocks of width 1536, 13 with dual attention,
   RMS q/k norm: 2.24B parameters), SD3's 16-channel VAE, and text encoders of the published widths (CLIP-L 768,
   CLIP-G 1280, T5 4096) at one layer each (prompt encoding is not what is timed); `GRPOTrainer.step` at 512 px,
   10 flow-SDE steps, CFG 4.5, 4 images per prompt, LoRA rank 32 on the attention: samples/s of sampling and of
   training (one timestep per transformer call) and the epoch's peak memory, after a warm-up epoch.
   `--small`: the tiny random SD3 (`rlhf.testing.build_tiny_sd3`), 32 px, 4 steps.
Random weights change neither time nor memory. Writes `--output` (default runs/bench_gpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from trainers.common import peak_memory_mb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # sibling bench scripts are modules of this directory, not a package

from alignprop import build_pipeline  # noqa: E402

PERSPECTIVES = ["alignment", "fidelity", "safety", "overall"]
PROMPTS = ("a red circle on a white background", "a blue square on a black background")
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


def sync(device: str) -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def initialised_on(device: str, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Random weights initialised on the GPU itself (minutes faster for billions of parameters) and, given
    `dtype`, created in it (a phi35-sized model is then written to disk at half the float32 size)."""
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device) if device.startswith("cuda") else nullcontext():
            yield
    finally:
        torch.set_default_dtype(previous)


def bench_reward_model(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Reward-model throughput: images/s and ms per image, every perspective scored in one batched call."""
    from reward import RewardModel
    from reward.testing import build_tiny_vlm

    size, batch = ("tiny", 4) if args.small else ("phi35", 32)
    began = time.perf_counter()
    with initialised_on(args.device, getattr(torch, args.dtype)):
        base = build_tiny_vlm(work / "vlm", "llava", size=size)
    model = RewardModel.from_backbone(base, PERSPECTIVES, dtype=args.dtype, device=args.device, max_batch_size=batch)
    build_s = time.perf_counter() - began
    side = model.backbone.image_processor.crop_size["height"]
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, side, side, generator=generator)
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}, image {i}" for i in range(batch)]
    with torch.no_grad():
        model.score(images, prompts)  # warm-up at the measured shape
        sync(args.device)
        began = time.perf_counter()
        for _ in range(args.repeats):
            model.score(images, prompts)
        sync(args.device)
    seconds = (time.perf_counter() - began) / args.repeats
    parameters = sum(p.numel() for p in model.backbone.model.parameters())
    peak_mb = peak_memory_mb(torch.device(args.device))
    return {
        "model_size": size,
        "parameters_m": parameters / 1e6,
        "batch": batch,
        "perspectives": len(PERSPECTIVES),
        "image_side": side,
        "images_per_s": batch / seconds,
        "ms_per_image": 1000 * seconds / batch,
        "build_and_load_s": build_s,
        "peak_memory_mb": peak_mb,  # CUDA: this section's allocator peak; CPU: the process's max resident set
    }


def bench_ddpo(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """DDPO epoch on an SD-1.5-shaped policy: samples/s while sampling and while training, after a warm-up epoch."""
    from rlhf.toy import colour_score
    from trainers import DDPOConfig, DDPOTrainer
    from trainers.command import uniform_prompt_function

    preset, size, steps, batch = ("small", 64, 4, 4) if args.small else ("sd15", 512, 50, 8)
    config = DDPOConfig(
        output_dir=str(work / "ddpo"),
        mixed_precision=MIXED_PRECISION[args.dtype],
        accelerator_kwargs={"cpu": not args.device.startswith("cuda")},
        num_epochs=3,  # two are run: the checkpoint written after the last epoch would otherwise be timed
        save_freq=1000,
        sample_num_steps=steps,
        sample_batch_size=batch,
        sample_num_batches_per_epoch=1,
        train_batch_size=batch // 2,
        # every timestep of every sample in one UNet call would not fit at 512 px; one per call is TRL's way
        train_timesteps_per_forward=0 if args.small else 1,
        sample_height=size,
        sample_width=size,
        eval_seeds=[0],
        num_grid_images=0,
    )
    with initialised_on(args.device):  # in float32: the LoRA the policy adds must stay float32 under bf16
        policy = build_pipeline(preset, size, args.device, getattr(torch, args.dtype))
    trainer = DDPOTrainer(
        config,
        lambda images, prompts, metadata: (colour_score(images, prompts), {}),
        uniform_prompt_function(list(PROMPTS)),
        policy,
    )
    trainer.step(0, 0)  # warm-up
    trainer.step(1, trainer.global_step)
    row = trainer.last_row
    return {
        "preset": preset,
        "image_side": size,
        "steps": steps,
        "samples_per_epoch": batch,
        "sampling_samples_per_s": batch / row["time_sampling"],
        "training_samples_per_s": batch / row["time_training"],
        "epoch_s": row["time_epoch"],
        "peak_memory_mb": row["peak_memory_mb"],
    }


def bench_alignprop(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """AlignProp peak memory with gradient checkpointing at K=1 and K=all, each variant in its own process."""
    preset, size, steps, batch = ("small", 64, 5, 1) if args.small else ("sd15", 512, 50, 2)
    environment = dict(os.environ)
    if not args.device.startswith("cuda"):
        # as bench/alignprop.py: with every block >= 64 KiB mmap'd, freed memory leaves the resident set
        environment["MALLOC_MMAP_THRESHOLD_"] = "65536"
    result: dict[str, Any] = {"preset": preset, "image_side": size, "steps": steps, "batch": batch,
                              "memory": "cuda max_memory_allocated" if args.device.startswith("cuda")
                              else "CPU max RSS growth"}
    for label, variant in (("k1", "ckpt K=1"), ("kall", "ckpt K=all")):
        command = [sys.executable, str(ROOT / "bench" / "alignprop.py"), "--preset", preset, "--size", str(size),
                   "--steps", str(steps), "--batch", str(batch), "--device", args.device, "--dtype", args.dtype,
                   "--threads", str(torch.get_num_threads()), "--variant", variant, "--measure", "memory"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=environment)
        if done.returncode != 0:  # e.g. out of memory: its last line names the error
            last_line = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            raise RuntimeError(f"{variant}: {last_line}")
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        result[f"peak_mb_{label}"] = measured["peak_mb"]
        result[f"weights_mb_{label}"] = measured["baseline_mb"]
    return result


def build_sd35_medium_shaped() -> Any:
    """An SD3.5-Medium-shaped `StableDiffusion3Pipeline` with random weights (see section 4)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from rlhf.testing import _tiny_t5_tokenizer, build_tiny_tokenizer

    clip_tokenizer, t5_tokenizer = build_tiny_tokenizer(), _tiny_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
    )

    def clip(width: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=width, intermediate_size=4 * width, projection_dim=width,
            num_hidden_layers=1, num_attention_heads=width // 64, max_position_embeddings=77,
            bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id))

    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
                                 num_heads=64, pad_token_id=t5_tokenizer.pad_token_id,
                                 eos_token_id=t5_tokenizer.eos_token_id))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(768), tokenizer=clip_tokenizer, text_encoder_2=clip(1280), tokenizer_2=clip_tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )


def bench_grpo_sd35m(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """A GRPO epoch on an SD3.5-Medium-shaped policy: samples/s while sampling and while training, peak memory."""
    from diffusers import StableDiffusion3Pipeline

    from rlhf.generators import SD3Adapter
    from rlhf.testing import build_tiny_sd3
    from rlhf.toy import colour_score
    from trainers.command import uniform_prompt_function
    from trainers.grpo import GRPOConfig, GRPOTrainer

    size, steps, rank = (32, 4, 4) if args.small else (512, 10, 32)
    if args.small:
        pipeline = StableDiffusion3Pipeline.from_pretrained(build_tiny_sd3(work / "sd3"))
    else:
        with initialised_on(args.device, getattr(torch, args.dtype)):
            pipeline = build_sd35_medium_shaped()
    # the LoRA is added in float32 (the default dtype here), as it must stay under bf16
    policy = SD3Adapter(pipeline, lora_rank=rank, lora_alpha=rank)
    config = GRPOConfig(
        output_dir=str(work / "grpo"),
        mixed_precision=MIXED_PRECISION[args.dtype],
        accelerator_kwargs={"cpu": not args.device.startswith("cuda")},
        num_epochs=3,  # two are run: the checkpoint written after the last epoch would otherwise be timed
        save_freq=1000,
        sample_num_steps=steps,
        sample_guidance_scale=4.5,
        noise_level=0.7,
        sample_batch_size=8,
        sample_num_batches_per_epoch=1,
        num_images_per_prompt=4,
        train_batch_size=4,
        train_timesteps_per_forward=1,  # every step of 4 trajectories at once would not fit at 512 px with CFG
        sample_height=size,
        sample_width=size,
        num_grid_images=0,
    )
    trainer = GRPOTrainer(config, lambda images, prompts, metadata: (colour_score(images, prompts), {}),
                          uniform_prompt_function(list(PROMPTS)), policy)
    trainer.step(0, 0)  # warm-up
    trainer.step(1, trainer.global_step)
    row = trainer.last_row
    parameters = sum(p.numel() for p in policy.denoiser.parameters())
    return {
        "model": "tiny SD3" if args.small else "SD3.5-Medium shape",
        "transformer_parameters_m": parameters / 1e6,
        "image_side": size,
        "steps": steps,
        "samples_per_epoch": config.sample_batch_size,
        "sampling_samples_per_s": config.sample_batch_size / row["time_sampling"],
        "training_samples_per_s": config.sample_batch_size / row["time_training"],
        "epoch_s": row["time_epoch"],
        "peak_memory_mb": row["peak_memory_mb"],
    }


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "reward_model": bench_reward_model,
    "ddpo": bench_ddpo,
    "alignprop": bench_alignprop,
    "grpo_sd35m": bench_grpo_sd35m,
}


def print_table(report: dict[str, Any]) -> None:
    """Every figure of `report`, one row per section and key."""
    print(f"\ndevice {report['device']} ({report['device_name']}), torch {report['torch']} (CUDA {report['cuda']}), "
          f"dtype {report['dtype']}, {'small' if report['small'] else 'full'} sizes")
    print(f"{'section':<14} {'figure':<24} {'value':>14}")
    for section, figures in report["sections"].items():
        for key, value in figures.items():
            shown = f"{value:14.3f}" if isinstance(value, float) else f"{value!s:>14}"
            print(f"{section:<14} {key:<24} {shown}")
    print(f"total wall time {report['wall_s']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=list(MIXED_PRECISION))
    parser.add_argument("--small", action="store_true", help="CPU-sized models instead of full sizes")
    parser.add_argument("--output", default="runs/bench_gpu.json", help="JSON file for every figure")
    parser.add_argument("--repeats", type=int, default=2, help="timed reward-model calls after the warm-up")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device: cuda requested but torch sees no GPU; use --device cpu --small")
    if args.repeats < 1:
        parser.error("--repeats: expected at least 1")
    torch.manual_seed(0)
    began = time.perf_counter()
    report: dict[str, Any] = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "small": args.small,
        "sections": {},
    }
    with tempfile.TemporaryDirectory() as work:
        for name in args.only:
            section_began = time.perf_counter()
            print(f"[{name}] running ...", flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()  # each section's peak is its own
            try:
                figures = SECTIONS[name](args, Path(work))
            except Exception as error:  # noqa: BLE001 - a failed section (e.g. OOM) must not stop the others
                traceback.print_exc()
                figures = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
            figures["section_s"] = time.perf_counter() - section_began
            report["sections"][name] = figures
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            print(f"[{name}] done in {figures['section_s']:.1f} s", flush=True)
    report["wall_s"] = time.perf_counter() - began
    print_table(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
