"""DDPO epoch on the tiny pipeline: time per phase, samples/s and peak memory, sync vs async reward, and the
batched training forward vs one UNet call per timestep (TRL 0.23's loop), measured side by side in one run.

    python bench/ddpo.py [--size 32] [--steps 20] [--batch 4] [--batches 4] [--threads 1] [--latency 0.25] [--rounds 2]

Every run is its own process (so its peak memory is its own): one warm-up epoch and `--repeats` more on the same
seed. Variants run round-robin `--rounds` times; each phase's fastest warm epoch is reported (other load on a
shared machine only ever adds time). Rewards: "toy" (the toy colour score, microseconds); "llava" (a small random
LLaVA-Reward model, `build_tiny_vlm(size="bench")`, scored in-process); "remote" (the toy score plus `--latency`
seconds of waiting per batch, standing in for a reward server). Async overlaps each batch's reward with the next
batch's sampling.

    python bench/ddpo.py --ported --trl-python /tmp/trl023/bin/python [--rounds 2] [--threads 1]

`--ported` times instead a TRL 0.23 script ported by changing its imports: the same calls (TRL's documented
`project_kwargs`, `DefaultDDPOStableDiffusionPipeline(model, use_lora=True)`, `DDPOTrainer(config, reward_fn,
prompt_fn, pipeline).train()`; 3 epochs of 2 x 4 samples, 6 steps, train batch 2, the tiny pipeline) run once on our
trainer and, with `--trl-python`, once on TRL 0.23.1's own in its own virtual environment (TRL pins its own
transformers/diffusers/peft), each in its own process, round-robin `--rounds` times; it prints the fastest total
`train()` time of each and their ratio (ours / TRL's), and writes them as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TIME_KEYS = ("time_sampling", "time_reward", "time_training", "time_epoch")


def run_variant(args: argparse.Namespace) -> dict[str, dict]:
    """One variant in this process: a warm-up epoch, then `--repeats` epochs per mode ("sync", and for the
    reward variants "async", alternating with it on the same trainer); each mode's fastest phases."""
    torch.set_num_threads(args.threads)
    from rlhf.generators.ddpo_pipeline import DDPOStableDiffusionPipeline
    from rlhf.rewards.reward_fn import AsyncReward
    from rlhf.testing import build_tiny_sd
    from rlhf.toy import colour_score, toy_prompts
    from trainers import DDPOConfig, DDPOTrainer
    from trainers.command import uniform_prompt_function

    reward_name, per_timestep, train_batch = VARIANTS[args.variant]
    work = Path(args.work)
    def toy_reward(images, prompts, metadata):
        return colour_score(images, prompts), {}

    def remote_reward(images, prompts, metadata):
        time.sleep(args.latency)  # a server round trip: the GIL is free, as while waiting on a socket
        return toy_reward(images, prompts, metadata)

    reward = toy_reward
    if reward_name == "remote":
        reward = remote_reward
    elif reward_name == "llava":
        from reward import RewardModel
        from reward.testing import build_tiny_vlm
        from rlhf.rewards.reward_fn import build_reward

        model_dir = work / "reward_model"
        if not model_dir.is_dir():
            base = build_tiny_vlm(work / "vlm", "llava", size="bench")
            RewardModel.from_backbone(base, ["alignment", "fidelity"]).save_pretrained(model_dir)
        reward = build_reward({"model": str(model_dir)})
    modes = ("sync",) if per_timestep or train_batch else ("sync", "async")
    config = DDPOConfig(
        output_dir=str(work / f"run_{args.variant.replace('/', '_')}"),
        mixed_precision="no",
        num_epochs=1 + args.repeats * len(modes),
        sample_num_steps=args.steps,
        sample_batch_size=args.batch,
        sample_num_batches_per_epoch=args.batches,
        train_batch_size=train_batch or args.batch,
        train_clip_range=1e-2,
        sample_height=args.size,
        sample_width=args.size,
        train_timesteps_per_forward=1 if per_timestep else 0,
        eval_seeds=[0],
        eval_prompts=["a red circle on a white background"],
        num_grid_images=0,
        save_freq=1000,
    )
    pipeline_dir = work / "tiny_sd"
    if not pipeline_dir.is_dir():
        build_tiny_sd(pipeline_dir)
    trainer = DDPOTrainer(
        config, reward, uniform_prompt_function(toy_prompts(64)), DDPOStableDiffusionPipeline.from_pretrained(pipeline_dir)
    )
    # the trainer's own asynchronous path (as `async_reward_computation` builds it), switched per epoch
    reward_paths = {"sync": None, "async": reward if hasattr(reward, "submit") else AsyncReward(reward)}
    rows: dict[str, list[dict]] = {mode: [] for mode in modes}
    schedule = ["sync"] + [mode for _ in range(args.repeats) for mode in modes]
    for epoch, mode in enumerate(schedule):
        trainer.async_reward = reward_paths[mode]
        trainer.step(epoch, trainer.global_step)
        if epoch > 0:  # epoch 0 warms up
            rows[mode].append(trainer.last_row)
    # the least-disturbed epochs: on a shared machine other load only ever adds time
    return {
        mode: {
            **{key: min(row[key] for row in measured) for key in TIME_KEYS},
            "samples_per_s": max(row["samples_per_s"] for row in measured),
            "peak_memory_mb": measured[-1]["peak_memory_mb"],
        }
        for mode, measured in rows.items()
    }


# the ported script's settings (issue 15): 3 epochs of 2 x 4 samples, 6 DDIM steps, train batch 2, TRL's project_kwargs
PORTED = dict(num_epochs=3, sample_num_steps=6, sample_batch_size=4, sample_num_batches_per_epoch=2,
              train_batch_size=2, mixed_precision="no")
ANIMALS = ["cat", "dog", "horse"]


def run_ported(args: argparse.Namespace) -> dict[str, float]:
    """TRL 0.23's example script, ported by its imports: `--stack ours` (this project, `sys.path` gets the
    repository) or `--stack trl` (run by TRL's interpreter; nothing of this project is imported). Same config, same
    calls; returns the wall seconds of `trainer.train()` alone (our metrics add `eval_seconds`, 0 without eval_prompts)."""
    torch.set_num_threads(args.threads)
    if args.stack == "trl":
        from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
    else:
        sys.path.insert(0, str(ROOT))
        from rlhf.generators.ddpo_pipeline import DefaultDDPOStableDiffusionPipeline
        from trainers import DDPOConfig, DDPOTrainer
    import random

    random.seed(0)
    torch.manual_seed(0)

    def prompt_fn():
        return random.choice(ANIMALS), {}

    def brightness(images, prompts, metadata):  # a weight-free stand-in for the aesthetic scorer
        return images.float().mean(dim=(1, 2, 3)), {}

    project_dir = Path(args.work) / f"{args.stack}_{time.monotonic_ns()}"
    config = DDPOConfig(
        **PORTED, project_kwargs={"project_dir": str(project_dir), "automatic_checkpoint_naming": True, "total_limit": 1}
    )
    from accelerate import PartialState

    PartialState()  # TRL's pipeline warns through accelerate's logger, which needs the state (the trainer makes it anyway)
    pipeline = DefaultDDPOStableDiffusionPipeline(args.pipeline, use_lora=True)
    trainer = DDPOTrainer(config, brightness, prompt_fn, pipeline)
    began = time.perf_counter()
    metrics = trainer.train()
    result = {"train_seconds_total": time.perf_counter() - began}
    if isinstance(metrics, dict):
        result["eval_seconds"] = metrics.get("eval_seconds", 0.0)
    return result


def for_transformers_4(pipeline: Path, target: Path) -> Path:
    """A copy of the tiny pipeline that TRL 0.23.1's transformers 4.x loads with the same weights: transformers 5
    writes a tokenizer.json alone (4.x's slow CLIPTokenizer wants vocab/merges files, its fast one reads it) and
    the CLIP text encoder's keys without the `text_model.` prefix 4.x expects (else it initialises them at random)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(pipeline, target)
    index = target / "model_index.json"
    layout = json.loads(index.read_text())
    layout["tokenizer"] = ["transformers", "CLIPTokenizerFast"]
    index.write_text(json.dumps(layout, indent=2))
    weights = target / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    save_file({key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()},
              weights, metadata={"format": "pt"})
    return target


def compare_ported(args: argparse.Namespace) -> dict:
    """Ours vs TRL 0.23.1 on the ported script, round-robin in one run; the fastest `train()` of each."""
    stacks = {"ours": sys.executable}
    if args.trl_python:
        stacks["trl"] = args.trl_python
    times: dict[str, list[dict]] = {stack: [] for stack in stacks}
    # on a shared machine the figures mean little without the load they were taken under
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        sys.path.insert(0, str(ROOT))
        from rlhf.testing import build_tiny_sd

        pipelines = {"ours": build_tiny_sd(Path(work) / "tiny_sd")}
        pipelines["trl"] = for_transformers_4(pipelines["ours"], Path(work) / "tiny_sd_transformers4")
        for _ in range(args.rounds):
            for stack, python in stacks.items():
                command = [python, __file__, "--ported-worker", "--stack", stack, "--work", work,
                           "--pipeline", str(pipelines[stack]), f"--threads={args.threads}"]
                result = subprocess.run(command, cwd=work, capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"{stack} ({python}) failed:\n{result.stderr[-3000:]}")
                times[stack].append(json.loads(result.stdout.strip().splitlines()[-1]))
    report = {"settings": {**PORTED, "threads": args.threads, "rounds": args.rounds},
              "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()}}
    for stack, runs in times.items():
        report[stack] = {"train_seconds": min(run["train_seconds_total"] for run in runs),
                         "all_train_seconds": [round(run["train_seconds_total"], 3) for run in runs]}
    report["ours"]["eval_seconds"] = max(run.get("eval_seconds", 0.0) for run in times["ours"])
    line = f"ported TRL 0.23 script, train(): ours {report['ours']['train_seconds']:.2f}s"
    if "trl" in report:
        report["ratio_ours_to_trl"] = report["ours"]["train_seconds"] / report["trl"]["train_seconds"]
        # each round's two runs are neighbours in time: their ratio sees the same load on a shared machine
        rounds = sorted(ours["train_seconds_total"] / trl["train_seconds_total"]
                        for ours, trl in zip(times["ours"], times["trl"]))
        report["ratio_per_round"] = [round(ratio, 3) for ratio in rounds]
        report["ratio_median_of_rounds"] = rounds[len(rounds) // 2] if len(rounds) % 2 else \
            (rounds[len(rounds) // 2 - 1] + rounds[len(rounds) // 2]) / 2
        line += (f", TRL 0.23.1 {report['trl']['train_seconds']:.2f}s: ours/TRL = {report['ratio_ours_to_trl']:.2f}x "
                 f"(median of the rounds' ratios {report['ratio_median_of_rounds']:.2f}x; target <= 0.6x)")
    print(f"{line}; fastest of {args.rounds}, {args.threads} thread(s), eval {report['ours']['eval_seconds']:.2f}s; "
          f"1-min load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after on {os.cpu_count()} CPUs")
    return report


VARIANTS = {
    # name: (reward, one UNet call per timestep, train_batch_size; None = the sampling batch)
    "toy": ("toy", False, None),
    "llava": ("llava", False, None),
    "remote": ("remote", False, None),
    "toy/per-timestep": ("toy", True, None),
    "toy/batched/tb1": ("toy", False, 1),
    "toy/per-timestep/tb1": ("toy", True, 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (32 = the toy size)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latency", type=float, default=0.25, help="seconds per batch of the 'remote' reward")
    parser.add_argument("--repeats", type=int, default=2, help="warm epochs per run, after one warm-up epoch")
    parser.add_argument("--rounds", type=int, default=2, help="runs per variant, interleaved with the others")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--ported", action="store_true", help="time the ported TRL 0.23 script (see above)")
    parser.add_argument("--trl-python", default="", help="with --ported: a Python whose environment has trl==0.23.1")
    parser.add_argument("--json", default="", help="with --ported: also write the times to this JSON file")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--ported-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stack", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ported_worker:
        print(json.dumps(run_ported(args)))
        return
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    if args.ported:
        report = compare_ported(args)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
        return

    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    with tempfile.TemporaryDirectory() as work:
        # round-robin, so that a slow spell of a shared machine does not land on one variant only
        for _ in range(args.rounds):
            for name in args.only:
                command = [sys.executable, __file__, "--variant", name, "--work", work] + [
                    f"--{key}={getattr(args, key)}"
                    for key in ("size", "steps", "batch", "batches", "threads", "latency", "repeats")
                ]
                result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
                runs[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
    rows = {}
    for name, measured in runs.items():
        for mode in measured[0]:
            row = rows[f"{name}/{mode}"] = {key: min(run[mode][key] for run in measured) for key in TIME_KEYS}
            row["samples_per_s"] = max(run[mode]["samples_per_s"] for run in measured)
            row["peak_memory_mb"] = max(run[mode]["peak_memory_mb"] for run in measured)
            print(
                f"{name + '/' + mode:26s} sampling {row['time_sampling']:6.2f}s  reward {row['time_reward']:5.2f}s  "
                f"training {row['time_training']:6.2f}s  epoch {row['time_epoch']:6.2f}s  "
                f"{row['samples_per_s']:6.2f} samples/s  peak {row['peak_memory_mb']:6.0f} MB"
            )
    print(
        f"\n{args.size} px, {args.steps} steps, {args.batches} x {args.batch} samples per epoch, "
        f"{args.threads} thread(s); fastest of {args.rounds} x {args.repeats} warm epochs per mode"
    )
    for reward in ("toy", "llava", "remote"):
        sync, overlapped = rows.get(f"{reward}/sync"), rows.get(f"{reward}/async")
        if sync and overlapped:
            print(
                f"async reward ({reward}): sample+reward phase {sync['time_sampling'] + sync['time_reward']:.2f}s -> "
                f"{overlapped['time_sampling'] + overlapped['time_reward']:.2f}s "
                f"({(sync['time_sampling'] + sync['time_reward']) / (overlapped['time_sampling'] + overlapped['time_reward']):.2f}x); "
                f"epoch {sync['time_epoch']:.2f}s -> {overlapped['time_epoch']:.2f}s"
            )
    for batched_name, looped_name, label in (
        ("toy/sync", "toy/per-timestep/sync", f"train_batch_size {args.batch}"),
        ("toy/batched/tb1/sync", "toy/per-timestep/tb1/sync", "train_batch_size 1 (TRL's default)"),
    ):
        batched, looped = rows.get(batched_name), rows.get(looped_name)
        if batched and looped:
            print(
                f"training phase, {label}: one UNet call per timestep {looped['time_training']:.2f}s "
                f"({looped['peak_memory_mb']:.0f} MB peak) vs batched {batched['time_training']:.2f}s "
                f"({batched['peak_memory_mb']:.0f} MB): {looped['time_training'] / batched['time_training']:.2f}x faster"
            )

if __name__ == "__main__":
    main()
