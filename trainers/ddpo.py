"""DDPO: PPO-clip on the per-step log-probs of a LoRA text-to-image policy, from a black-box reward: DDIM's for Stable
Diffusion (TRL's `DDPOStableDiffusionPipeline`), the flow SDE's for SD3 / FLUX.1 (any `GeneratorAdapter`)."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf.reward_fn import AsyncReward
from rlhf.stats import PerPromptStatTracker, batch_advantages, group_advantages
from trainers.base import COND, DDIMTrainerConfig, PolicyGradientTrainer, redeclare, require
from trainers.command import run_trainer_command
from trainers.common import (
    draw_prompts,
    gathered_advantages,
    peak_memory_mb,
    perspective_values,
    reseed_global_rngs,
    reward_result,
    seeded_generator,
)



@dataclass
class DDPOConfig(DDIMTrainerConfig):
    r"""Configuration of `DDPOTrainer`: every field of TRL 0.23.1's `DDPOConfig` (same names and defaults; the
    shared ones in `DiffusionTrainerConfig`), then this project's own. Each field's `help` says its default and
    meaning; fields that cannot apply here say so.

    Notes on the choices a user faces:
    - `train_clip_range`: log-probs are means over latent dimensions (see `rlhf.scheduling`), so per-step
      ratios move by ~1e-3..1e-2 per update. TRL's 1e-4 clips 35-55% of pairs from the second minibatch on and
      learns ~3x slower than 1e-2 (measured on a tiny pipeline); 1e-4 is kept as the default for TRL parity, the
      toy configs use 1e-2.
    - advantages: `group_size > 1` normalises within each group of K images of one prompt (GRPO-style);
      else `per_prompt_stat_tracking` normalises by each prompt's recent history; else by the whole batch
      (gathered over all processes first in every case).
    """

    # ---- TRL 0.23.1 ----
    num_epochs: int = field(default=100, metadata={"help": "Number of epochs (sample, score, train) (default 100)."})
    sample_eta: float = field(
        default=1.0, metadata={"help": "DDIM eta (a flow family: its SDE's noise level, e.g. 0.7), > 0 (default 1.0)."}
    )
    sample_batch_size: int = field(default=1, metadata={"help": "Images per sampling batch, per process (default 1)."})
    sample_num_batches_per_epoch: int = field(
        default=2, metadata={"help": "Sampling batches per epoch, per process (default 2)."}
    )
    train_num_inner_epochs: int = field(
        default=1, metadata={"help": "PPO passes over each epoch's samples (default 1)."}
    )
    train_cfg: bool = field(
        default=True,
        metadata={"help": "Replay guidance in training, as sampled (default True). False trains the conditional "
                  "prediction alone, so ratios start != 1 unless sampling had no guidance."},
    )
    train_adv_clip_max: float = field(default=5.0, metadata={"help": "Advantages clipped to +-this (default 5.0)."})
    train_clip_range: float = field(
        default=1e-4, metadata={"help": "PPO clip range on the importance ratio (default 1e-4; see class notes)."}
    )
    train_timestep_fraction: float = field(
        default=1.0, metadata={"help": "Fraction of each trajectory's steps trained on, drawn per sample (default 1.0)."}
    )
    per_prompt_stat_tracking: bool = field(
        default=False, metadata={"help": "Normalise rewards per prompt over a history buffer (default False)."}
    )
    per_prompt_stat_tracking_buffer_size: int = field(
        default=16, metadata={"help": "Rewards kept per prompt by the tracker (default 16)."}
    )
    per_prompt_stat_tracking_min_count: int = field(
        default=16, metadata={"help": "Below this many, a prompt is normalised by batch statistics (default 16)."}
    )
    async_reward_computation: bool = field(
        default=False,
        metadata={"help": "Score each batch in a thread while the next one samples (default False)."},
    )
    max_workers: int = field(default=2, metadata={"help": "Kept for TRL compatibility: asynchronous rewards are "
                                                          "scored one batch at a time, in sampling order, so a "
                                                          "stateful reward stays deterministic."})
    # ---- this project ----
    output_dir: str = redeclare("output_dir", "runs/ddpo", "'runs/ddpo'")
    group_size: int = field(
        default=1,
        metadata={"help": "K images per drawn prompt, advantages normalised within each group (GRPO-style) (default 1: off)."},
    )
    kl_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the per-step KL to the reference policy (the UNet with LoRA disabled) (default 0)."},
    )
    train_timesteps_per_forward: int = field(
        default=0,
        metadata={"help": "Timesteps per sample batched into one UNet call; 0 = all trained ones (default 0). "
                  "Lower it to bound memory on large models."},
    )

    def validate(self) -> None:
        """Raise ValueError naming the first field that does not fit."""
        super().validate()
        per_process = self.sample_batch_size * self.sample_num_batches_per_epoch
        minibatches = per_process // self.train_batch_size
        require([
            (self.sample_eta > 0, "sample_eta", "a value > 0 (DDPO needs a stochastic sampler)"),
            (0 < self.train_timestep_fraction <= 1, "train_timestep_fraction", "a value in (0, 1]"),
            (self.sample_batch_size >= 1 and self.sample_num_batches_per_epoch >= 1, "sample_batch_size", "positive batch sizes"),
            (per_process % self.train_batch_size == 0, "train_batch_size",
             f"a divisor of sample_batch_size * sample_num_batches_per_epoch = {per_process}"),
            (minibatches % self.train_gradient_accumulation_steps == 0,
             "train_gradient_accumulation_steps", f"a divisor of the {minibatches} minibatches per inner epoch"),
            (self.train_num_inner_epochs >= 1, "train_num_inner_epochs", "a value >= 1"),
            (self.group_size >= 1 and per_process % self.group_size == 0, "group_size",
             f"a divisor of the {per_process} samples per process per epoch"),
            (not (self.group_size > 1 and self.per_prompt_stat_tracking), "group_size",
             "group_size 1 when per_prompt_stat_tracking is on (choose one advantage normalisation)"),
            (self.kl_coef >= 0, "kl_coef", "a value >= 0"),
            (self.train_timesteps_per_forward >= 0, "train_timesteps_per_forward", "a value >= 0"),
        ])


class DDPOTrainer(PolicyGradientTrainer):
    """DDPO (Black et al. 2023) on accelerate, with TRL 0.23's constructor and `train()`.

    Args:
        config: a `DDPOConfig`.
        reward_function: `reward_function(images, prompts, metadata) -> (rewards, info)`, images float BCHW in
            [0, 1]; `info["raw"]` may map perspective names to per-image scores (logged per perspective). A
            non-finite reward drops its sample from training (counted in `num_nonfinite_rewards`).
        prompt_function: `prompt_function() -> (prompt, metadata)` (or just a prompt), called once per drawn
            prompt; the global `random`/NumPy/torch RNGs are reseeded from (seed, epoch, process) before each
            epoch's draws, so a function using them reproduces and resumes exactly.
        sd_pipeline: a `DDPOStableDiffusionPipeline` (TRL's), or any `GeneratorAdapter` (SD3, FLUX.1): sampling and
            replay only call that interface.
        image_samples_hook: called after each epoch's rewards as TRL does, with
            `([[images, prompts, metadata, rewards, reward_info], ...], global_step, tracker or None)`.
    """

    progress_name = "DDPO epochs"
    curves = ("reward_mean", "approx_kl", "clipfrac", "loss")

    config: DDPOConfig

    @property
    def num_trained_steps(self) -> int:
        """Timesteps of each trajectory trained on (`train_timestep_fraction` of them, drawn per sample)."""
        return max(1, int(self.config.sample_num_steps * self.config.train_timestep_fraction))

    def setup(self) -> None:
        """DeepSpeed's batch settings, the per-prompt reward statistics and the asynchronous reward path."""
        config = self.config
        deepspeed = self.accelerator.state.deepspeed_plugin
        if deepspeed is not None:
            # without a dataloader DeepSpeed cannot infer these: one minibatch of trajectories per micro-step
            deepspeed.deepspeed_config.update(
                {
                    "train_micro_batch_size_per_gpu": config.train_batch_size,
                    "gradient_accumulation_steps": self.accelerator.gradient_accumulation_steps,
                    "gradient_clipping": config.train_max_grad_norm,
                }
            )
        self.stat_tracker = (
            PerPromptStatTracker(config.per_prompt_stat_tracking_buffer_size, config.per_prompt_stat_tracking_min_count)
            if config.per_prompt_stat_tracking
            else None
        )
        # one ordered path for asynchronous rewards: the reward's own `submit` (ours score in call order on one
        # worker) or one worker around a plain function, so a stateful reward (running or per-prompt normalisation)
        # folds its batches in sampling order, as without async, and a resumed run equals an uninterrupted one
        self.async_reward = None
        if config.async_reward_computation:
            reward = self.reward_fn
            self.async_reward = reward if hasattr(reward, "submit") else AsyncReward(reward)

    def checkpoint_state(self) -> dict[str, Any]:
        """The shared state and the per-prompt reward statistics."""
        state = self.stat_tracker.state_dict() if self.stat_tracker is not None else None
        return {**super().checkpoint_state(), "stat_tracker": state}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if self.stat_tracker is not None:
            self.stat_tracker.load_state_dict(state["stat_tracker"])

    def extra_metrics(self) -> dict[str, Any]:
        return {"num_nonfinite_rewards": self.num_nonfinite}

    def release(self) -> None:
        if isinstance(self.async_reward, AsyncReward) and self.async_reward is not self.reward_fn:
            self.async_reward.close()  # the worker we made around a plain function; a reward's own stays its own

    # ---- sampling --------------------------------------------------------------------------------------------

    def sample_epoch(self, epoch: int) -> tuple["Rollout", dict[str, float]]:
        """Sample and score this process's trajectories for `epoch`; with async rewards each batch is scored
        in a thread while the next one samples. Returns the rollout and the phase timings (seconds)."""
        config, rank = self.config, self.accelerator.process_index
        reseed_global_rngs(config.seed, epoch, rank)
        generator = seeded_generator(config.seed, epoch, rank, 0)
        size = config.sample_batch_size
        prompts, metadata = draw_prompts(
            self.prompt_fn, size * config.sample_num_batches_per_epoch // config.group_size, config.group_size
        )
        batches, images, pending = [], [], []
        sampling_time = reward_time = 0.0
        self.sd_pipeline.denoiser.eval()
        for start in range(0, len(prompts), size):
            batch_prompts, batch_meta = prompts[start : start + size], metadata[start : start + size]
            began = time.perf_counter()
            output = self.sample(batch_prompts, generator)
            batches.append(
                {
                    "latents": output.latents[:, :-1],
                    "next_latents": output.latents[:, 1:],
                    "log_probs": output.log_probs,
                    "timesteps": output.timesteps.repeat(len(batch_prompts), 1),
                    **{COND + key: value for key, value in self.replayed_conditioning(output.conditioning).items()},
                }
            )
            images.append(output.images)
            sampling_time += time.perf_counter() - began
            began = time.perf_counter()
            if self.async_reward is not None:
                pending.append(self.async_reward.submit(output.images, batch_prompts, batch_meta))
            else:
                pending.append(_completed(self.reward_fn(output.images, batch_prompts, batch_meta)))
            reward_time += time.perf_counter() - began
        began = time.perf_counter()
        results = [reward_result(future.result(), len(batch_images)) for future, batch_images in zip(pending, images)]
        reward_time += time.perf_counter() - began

        tensors = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
        perspectives: dict[str, list[torch.Tensor]] = {}
        for _, info in results:
            for name, values in perspective_values(info).items():
                perspectives.setdefault(name, []).append(values)
        records = [
            [batch_images, prompts[i * size : (i + 1) * size], metadata[i * size : (i + 1) * size], rewards, info]
            for i, (batch_images, (rewards, info)) in enumerate(zip(images, results))
        ]
        rollout = Rollout(
            tensors=tensors,
            prompts=prompts,
            rewards=torch.cat([rewards for rewards, _ in results]).to(self.accelerator.device),
            perspectives={k: torch.cat(v).to(self.accelerator.device) for k, v in perspectives.items()},
            records=records,
        )
        return rollout, {"time_sampling": sampling_time, "time_reward": reward_time}

    def replayed_conditioning(self, conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The conditioning training replays: as sampled, or without the guidance halves when not `train_cfg`."""
        if self.config.train_cfg:
            return conditioning
        return {key: value for key, value in conditioning.items() if not key.startswith("negative_")}

    # ---- advantages ------------------------------------------------------------------------------------------

    def compute_advantages(self, rollout: "Rollout") -> dict[str, Any]:
        """Gather rewards from every process, drop non-finite ones, turn the rest into advantages, and keep this
        process's share in `rollout.tensors` (`advantages`, `valid`). Returns the epoch's reward statistics.

        Advantages: a reward whose weighting is at level "advantage" (GDPO) computes them itself from the
        gathered per-perspective scores; otherwise `group_size > 1` normalises within groups, else the per-prompt
        tracker, else the whole batch.
        """
        config = self.config

        def normalise(rewards: torch.Tensor, kept: list[int], prompts: list[str], local: int) -> torch.Tensor:
            if config.group_size > 1:
                # a group never spans processes: ids are (process, group index within the process)
                return group_advantages(rewards, [(i // local, (i % local) // config.group_size) for i in kept])
            if self.stat_tracker is not None:
                return self.stat_tracker.update([prompts[i] for i in kept], rewards)
            return batch_advantages(rewards)

        advantages, valid, stats = gathered_advantages(
            self.accelerator, self.reward_fn, rollout.rewards, rollout.perspectives, rollout.prompts, normalise
        )
        rollout.tensors["advantages"], rollout.tensors["valid"] = advantages, valid
        self.num_nonfinite += stats["num_nonfinite_rewards"]
        return stats

    # ---- the loop --------------------------------------------------------------------------------------------

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch: sample, score, compute advantages, train, log, checkpoint. Returns the global step
        (TRL 0.23's signature)."""
        self.global_step = global_step
        began = time.perf_counter()
        rollout, timings = self.sample_epoch(epoch)
        reward_stats = self.compute_advantages(rollout)
        if self.image_samples_hook is not None:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_hook(rollout.records, self.global_step, tracker)
        if self.accelerator.is_main_process and self.config.num_grid_images > 0:
            grid = torch.cat([record[0] for record in rollout.records])[: self.config.num_grid_images]
            self.outputs.save_grid(grid, f"samples/epoch_{epoch:04d}.png")
        train_began = time.perf_counter()
        train_stats = self.train_epoch(epoch, rollout.tensors)
        timings["time_training"] = time.perf_counter() - train_began
        timings["time_epoch"] = time.perf_counter() - began
        samples = len(rollout.prompts) * self.accelerator.num_processes
        row = {
            "epoch": epoch,
            "global_step": self.global_step,
            **reward_stats,
            "num_nonfinite_rewards_total": self.num_nonfinite,
            **train_stats,
            **timings,
            "samples_per_s": samples / max(timings["time_sampling"] + timings["time_reward"], 1e-9),
            "peak_memory_mb": peak_memory_mb(self.accelerator.device),
        }
        self.end_epoch(epoch, row)
        return self.global_step


@dataclass
class Rollout:
    """One epoch's samples on this process: batch-first tensors (latents, next_latents, log_probs, timesteps,
    `cond/*` conditioning, later advantages and valid), the prompts, rewards, per-perspective scores, and TRL's
    per-batch `[images, prompts, metadata, rewards, info]` records."""

    tensors: dict[str, torch.Tensor]
    prompts: list[str]
    rewards: torch.Tensor
    perspectives: dict[str, torch.Tensor]
    records: list[list[Any]]


def _completed(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    """`rlhf train ddpo --config configs/ddpo/X.yaml [--field value ...]`."""
    return run_trainer_command(argv, DDPOConfig, DDPOTrainer)
