"""GRPO for text-to-image generators (Flow-GRPO, DanceGRPO, MixGRPO): K images per prompt, group-normalised
advantages, PPO-clip on per-step ratios of a window of stochastic steps, a closed-form KL to the LoRA-free
reference. Written against `GeneratorAdapter` only, so one trainer serves SD (DDIM), SD3/3.5 and FLUX.1."""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlhf.generators.sampling import sde_window
from rlhf.grpo_ema import ParameterEMA
from rlhf.grpo_loss import grpo_advantages
from rlhf.reward_fn import AsyncReward
from rlhf.stats import PerPromptStatTracker
from trainers.base import COND, HELDOUT, DiffusionTrainerConfig, PolicyGradientTrainer, redeclare, require
from trainers.command import run_trainer_command
from trainers.common import (
    Checkpointer, draw_prompts, gathered_advantages, peak_memory_mb, perspective_values, reseed_global_rngs,
    reward_result, seeded_generator,
)

EMA_FILE = "ema.safetensors"


def _opt(default: Any, help: str) -> Any:
    """A dataclass field with its `--help` text; a list or dict default is copied for each instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class GRPOConfig(DiffusionTrainerConfig):
    r"""Configuration of `GRPOTrainer`: the fields every diffusion trainer shares (`DiffusionTrainerConfig`, TRL's
    DDPO names), then GRPO's own; each field's help says its default. Per epoch and process:
    `sample_batch_size * sample_num_batches_per_epoch` images, in groups of `num_images_per_prompt` images of one
    prompt.

    Choices a user faces:
    - advantages: (r - group mean) / group std by default; `global_std` divides by the std of all rewards of the
      epoch instead (Flow-GRPO's per-prompt tracking with global std is this: a group is one prompt's images);
      `per_prompt_stat_tracking` normalises by each prompt's recent history instead (a buffer over epochs).
    - `sde_window_size` > 0 trains only a window of consecutive stochastic steps whose start is drawn per epoch in
      `sde_window_range`; the other steps are the deterministic sampler (MixGRPO, Flow-GRPO-Fast).
    - `train_clip_range`: log-probs are means over latent dimensions, so ratios move by ~1e-4..1e-2 per update;
      Flow-GRPO uses 1e-4 on SD3.5 with its learning rate 3e-4, the toy config 1e-2.
    """

    # ---- shared fields whose GRPO default differs (Flow-GRPO's) ----
    mixed_precision: str = redeclare("mixed_precision", "no", "'no'")
    sample_num_steps: int = redeclare("sample_num_steps", 10, "10: the training rollouts")
    sample_guidance_scale: float = redeclare("sample_guidance_scale", 4.5, "4.5")
    train_batch_size: int = redeclare("train_batch_size", 4, "4")
    eval_seeds: list[int] = redeclare("eval_seeds", [0, 1], "0 1")
    output_dir: str = redeclare("output_dir", "runs/grpo", "'runs/grpo'")
    # ---- sampling ----
    eval_num_steps: int = _opt(0, "Denoising steps of evaluations; 0 = sample_num_steps. More than sample_num_steps is "
                               "denoising reduction (Flow-GRPO: 10 / 40) (default 0).")
    sample_batch_size: int = _opt(8, "Images per sampling batch, per process (default 8).")
    sample_num_batches_per_epoch: int = _opt(2, "Sampling batches per epoch, per process (default 2).")
    num_images_per_prompt: int = _opt(4, "K, the images of one prompt whose rewards are compared (default 4).")
    noise_level: float = _opt(0.7, "Stochasticity of the trained steps: the flow SDE's noise level, DDIM's eta; > 0 "
                              "(default 0.7).")
    eval_noise_level: float = _opt(0.0, "Noise level of evaluation sampling; 0 = the deterministic sampler "
                                   "(default 0).")
    sde_window_size: int = _opt(0, "Consecutive stochastic (trained) steps per rollout; 0 = every step (default 0).")
    sde_window_range: list[int] = _opt([], "First and last step index the window may start at; [] = anywhere "
                                       "(default []).")
    same_initial_noise: bool = _opt(False, "The K images of a prompt start from one noise, so they differ by the SDE "
                                    "steps alone (DanceGRPO's init_same_noise) (default False).")
    # ---- training ----
    train_num_inner_epochs: int = _opt(1, "PPO passes over each epoch's samples (default 1).")
    train_adv_clip_max: float = _opt(5.0, "Advantages clipped to +-this (default 5).")
    train_clip_range: float = _opt(1e-4, "PPO clip range of the per-step ratio (default 1e-4).")
    train_timesteps_per_forward: int = _opt(0, "Steps per trajectory batched in one denoiser call; 0 = all trained "
                                            "steps (default 0).")
    kl_coef: float = _opt(0.0, "Weight of the per-step KL to the LoRA-disabled reference, |mu - mu_ref|^2 / "
                          "(2 std^2) (default 0).")
    global_std: bool = _opt(False, "Divide group-centred rewards by the std of all the epoch's rewards, not the "
                            "group's (default False).")
    per_prompt_stat_tracking: bool = _opt(False, "Normalise by each prompt's reward history instead of its group "
                                          "(default False).")
    per_prompt_stat_tracking_buffer_size: int = _opt(32, "Rewards kept per prompt (default 32).")
    per_prompt_stat_tracking_min_count: int = _opt(4, "Below this many a prompt is normalised by the batch "
                                                   "(default 4).")
    ema_decay: float = _opt(0.0, "EMA of the trained weights, used to evaluate and export; 0 = off (Flow-GRPO: 0.9) "
                            "(default 0).")
    # ---- rewards and evaluation ----
    async_reward_computation: bool = _opt(False, "Score each batch in a thread while the next samples "
                                          "(default False).")
    eval_freq: int = _opt(0, "Also evaluate every this many epochs, into the history and curves; 0 = before and "
                          "after only (default 0).")

    def validate(self) -> None:
        """Raise ValueError naming the first field that does not fit (the shared fields first)."""
        super().validate()
        per_process = self.sample_batch_size * self.sample_num_batches_per_epoch
        minibatches = per_process // max(self.train_batch_size, 1)
        window = self.sde_window_range
        last_start = self.sample_num_steps - (self.sde_window_size or self.sample_num_steps)
        require([
            (self.eval_num_steps >= 0, "eval_num_steps", "a value >= 0 (0 = sample_num_steps)"),
            (self.sample_batch_size >= 1, "sample_batch_size", "a value >= 1"),
            (self.sample_num_batches_per_epoch >= 1, "sample_num_batches_per_epoch", "a value >= 1"),
            (self.num_images_per_prompt >= 2 and per_process % self.num_images_per_prompt == 0, "num_images_per_prompt",
             f"a value >= 2 dividing the {per_process} images per process per epoch (a group never spans processes)"),
            (self.noise_level > 0, "noise_level", "a value > 0 (the trained steps need a density)"),
            (self.eval_noise_level >= 0, "eval_noise_level", "a value >= 0"),
            (0 <= self.sde_window_size <= self.sample_num_steps, "sde_window_size",
             f"a value in [0, {self.sample_num_steps}]"),
            (not window or (len(window) == 2 and 0 <= window[0] <= window[1] <= last_start), "sde_window_range",
             f"[] or [first, last] with 0 <= first <= last <= sample_num_steps - sde_window_size = {last_start}"),
            (per_process % self.train_batch_size == 0, "train_batch_size",
             f"a divisor of the {per_process} images per process per epoch"),
            (minibatches % self.train_gradient_accumulation_steps == 0, "train_gradient_accumulation_steps",
             f"a divisor of the {minibatches} minibatches per inner epoch"),
            (self.train_num_inner_epochs >= 1, "train_num_inner_epochs", "a value >= 1"),
            (self.train_clip_range > 0, "train_clip_range", "a value > 0"),
            (self.train_adv_clip_max > 0, "train_adv_clip_max", "a value > 0"),
            (self.train_timesteps_per_forward >= 0, "train_timesteps_per_forward", "a value >= 0"),
            (self.kl_coef >= 0, "kl_coef", "a value >= 0"),
            (not (self.global_std and self.per_prompt_stat_tracking), "global_std",
             "False with per_prompt_stat_tracking (the tracker has its own statistics)"),
            (self.per_prompt_stat_tracking_buffer_size >= 1, "per_prompt_stat_tracking_buffer_size", "a value >= 1"),
            (self.per_prompt_stat_tracking_min_count >= 1, "per_prompt_stat_tracking_min_count", "a value >= 1"),
            (0 <= self.ema_decay < 1, "ema_decay", "a value in [0, 1) (0 = off)"),
            (self.eval_freq >= 0, "eval_freq", "a value >= 0"),
        ])

class GRPOTrainer(PolicyGradientTrainer):
    """GRPO on the shared trainer lifecycle and PPO loop (`PolicyGradientTrainer`), TRL-shaped (`GRPOTrainer(config, reward_function,
    prompt_function, generator).train()`); it supplies its sampling (groups, the SDE window), advantages, the EMA, and what its checkpoint holds besides the shared state (the per-prompt tracker, the EMA).

    Args:
        config: a `GRPOConfig`.
        reward_function: `reward_function(images, prompts, metadata) -> rewards or (rewards, info)`, images float
            BCHW in [0, 1]; `info["raw"]` per-perspective scores are logged; a non-finite reward drops its image.
        prompt_function: `prompt_function() -> (prompt, metadata)` or a prompt, called once per group; the global
            RNGs are reseeded from (seed, epoch, process) before each epoch's draws.
        generator: any `GeneratorAdapter` (the trainer never names a family).
        image_samples_hook: TRL's hook, called each epoch with `([[images, prompts, metadata, rewards, info], ...],
            global_step, tracker or None)`.
        heldout_rewards: `{name: reward function}` evaluated beside the reward, never optimised (default: built
            from `config.heldout_rewards`).
    """

    progress_name = "GRPO epochs"

    config: GRPOConfig

    @property
    def curves(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("reward_mean", "approx_kl", "clipfrac", "ratio_mean", "kl", "eval_reward_mean",
                *[f"eval_{HELDOUT}{name}" for name in self.heldout_rewards])

    @property
    def noise_level(self) -> float:
        return self.config.noise_level

    @property
    def num_trained_steps(self) -> int:
        """The stochastic steps of each rollout (its SDE window): every one is trained."""
        return self.config.sde_window_size or self.config.sample_num_steps

    def setup(self) -> None:
        """The EMA, the per-prompt reward statistics and the asynchronous reward path."""
        config = self.config
        self.ema = ParameterEMA(self.sd_pipeline.trainable_parameters(), config.ema_decay) if config.ema_decay > 0 else None
        self.stat_tracker = (PerPromptStatTracker(config.per_prompt_stat_tracking_buffer_size,
                                                  config.per_prompt_stat_tracking_min_count)
                             if config.per_prompt_stat_tracking else None)
        # the reward's own `submit` (ours score in call order), or one worker around a plain function: batches are
        # folded in sampling order either way, so a stateful reward resumes exactly
        self.async_reward = None
        if config.async_reward_computation:
            reward = self.reward_fn
            self.async_reward = reward if hasattr(reward, "submit") else AsyncReward(reward)

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update()

    def checkpoint_state(self) -> dict[str, Any]:
        """The shared state and the per-prompt reward statistics (the EMA goes in its own file)."""
        state = self.stat_tracker.state_dict() if self.stat_tracker is not None else None
        return {**super().checkpoint_state(), "stat_tracker": state}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if "eval_before" in state:  # a checkpoint from before GRPO shared the lifecycle's key `before`
            self.before = {"eval": state["eval_before"]}
        if self.stat_tracker is not None:
            self.stat_tracker.load_state_dict(state["stat_tracker"])
        if self.ema is not None:
            self.ema.load_state_dict(load_file(Checkpointer.resolve(self.config.resume_from) / EMA_FILE))

    def save_checkpoint_files(self, directory: Path) -> None:
        if self.ema is not None and self.accelerator.is_main_process:
            save_file(self.ema.state_dict(), directory / EMA_FILE)
        self.accelerator.wait_for_everyone()

    def evaluation_weights(self) -> AbstractContextManager:
        """The EMA when on (evaluations and the exported policy use it), else the trained weights."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    def sample_images(self, prompts: list[str], generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Evaluation images: `eval_num_steps` steps at `eval_noise_level` (0: the deterministic sampler)."""
        config = self.config
        steps = config.eval_num_steps or config.sample_num_steps
        return self.sample(prompts, generator, num_steps=steps, noise_level=config.eval_noise_level).images

    def extra_metrics(self) -> dict[str, Any]:
        return {"num_nonfinite_rewards": self.num_nonfinite}

    def release(self) -> None:
        if isinstance(self.async_reward, AsyncReward) and self.async_reward is not self.reward_fn:
            self.async_reward.close()  # the worker made around a plain function; a reward's own stays its own

    # ---- sampling --------------------------------------------------------------------------------------------

    def sample_epoch(self, epoch: int) -> tuple[dict[str, Any], dict[str, float]]:
        """Sample and score this process's groups for `epoch`. Returns the rollout (`tensors`: the window steps'
        latents, next latents, log-probs and timesteps, the conditioning; `prompts`, `rewards`, `perspectives`,
        `records`) and the phase timings."""
        config, rank = self.config, self.accelerator.process_index
        reseed_global_rngs(config.seed, epoch, rank)
        generator = seeded_generator(config.seed, epoch, rank, 0)
        # one window for every process (no rank in its seed): the processes train the same steps
        stochastic = sde_window(config.sample_num_steps, config.sde_window_size, config.sde_window_range,
                                seeded_generator(config.seed, epoch, 2))
        window = stochastic.nonzero().squeeze(1)
        per_process = config.sample_batch_size * config.sample_num_batches_per_epoch
        prompts, metadata = draw_prompts(self.prompt_fn, per_process // config.num_images_per_prompt,
                                         config.num_images_per_prompt)
        noise = None
        if config.same_initial_noise:
            groups = len(prompts) // config.num_images_per_prompt
            noise = self.sd_pipeline.initial_latents(groups, self.height, self.width, generator)
            noise = noise.repeat_interleave(config.num_images_per_prompt, dim=0)
        batches, images, pending = [], [], []
        timings = {"time_sampling": 0.0, "time_reward": 0.0}
        self.sd_pipeline.denoiser.eval()
        for start in range(0, len(prompts), config.sample_batch_size):
            end = start + config.sample_batch_size
            chunk, chunk_meta = prompts[start:end], metadata[start:end]
            began = time.perf_counter()
            sampled = self.sample(chunk, generator, stochastic=stochastic,
                                  initial_latents=None if noise is None else noise[start:end])
            batches.append({
                "latents": sampled.latents[:, window], "next_latents": sampled.latents[:, window + 1],
                "log_probs": sampled.log_probs[:, window], "timesteps": sampled.timesteps[window].repeat(len(chunk), 1),
                **{COND + key: value for key, value in sampled.conditioning.items()},
            })
            images.append(sampled.images)
            timings["time_sampling"] += time.perf_counter() - began
            began = time.perf_counter()
            if self.async_reward is not None:
                pending.append(self.async_reward.submit(sampled.images, chunk, chunk_meta))
            else:
                done: Future = Future()
                done.set_result(self.reward_fn(sampled.images, chunk, chunk_meta))
                pending.append(done)
            timings["time_reward"] += time.perf_counter() - began
        began = time.perf_counter()
        results = [reward_result(future.result(), len(batch)) for future, batch in zip(pending, images)]
        timings["time_reward"] += time.perf_counter() - began
        perspectives: dict[str, list[torch.Tensor]] = {}
        for _, info in results:
            for name, values in perspective_values(info).items():
                perspectives.setdefault(name, []).append(values)
        size = config.sample_batch_size
        rollout = {
            "tensors": {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]},
            "prompts": prompts,
            "rewards": torch.cat([rewards for rewards, _ in results]).to(self.accelerator.device),
            "perspectives": {k: torch.cat(v).to(self.accelerator.device) for k, v in perspectives.items()},
            "records": [[batch, prompts[i * size : (i + 1) * size], metadata[i * size : (i + 1) * size], rewards, info]
                        for i, (batch, (rewards, info)) in enumerate(zip(images, results))],
        }
        return rollout, timings

    # ---- advantages ------------------------------------------------------------------------------------------

    def compute_advantages(self, rollout: dict[str, Any]) -> dict[str, Any]:
        """Gather every process's rewards, drop non-finite ones, and set this process's `advantages` and `valid`.

        A reward weighted at the advantage level (GDPO) computes them from the per-perspective scores; otherwise
        the per-prompt tracker, else group normalisation (with `global_std`, by the std of all rewards)."""
        config = self.config

        def normalise(rewards: torch.Tensor, kept: list[int], prompts: list[str], local: int) -> torch.Tensor:
            if self.stat_tracker is not None:
                return self.stat_tracker.update([prompts[i] for i in kept], rewards)
            # a group never spans processes: ids are (process, group index within the process)
            ids = [(i // local, (i % local) // config.num_images_per_prompt) for i in kept]
            return grpo_advantages(rewards, ids, config.global_std)

        advantages, valid, stats = gathered_advantages(
            self.accelerator, self.reward_fn, rollout["rewards"], rollout["perspectives"], rollout["prompts"], normalise
        )
        rollout["tensors"]["advantages"], rollout["tensors"]["valid"] = advantages, valid
        self.num_nonfinite += stats["num_nonfinite_rewards"]
        return stats

    # ---- training --------------------------------------------------------------------------------------------

    # ---- the loop --------------------------------------------------------------------------------------------

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch: sample, score, advantages, train, log, checkpoint. Returns the global step."""
        self.global_step = global_step
        began = time.perf_counter()
        rollout, timings = self.sample_epoch(epoch)
        row: dict[str, Any] = {"epoch": epoch, **self.compute_advantages(rollout)}
        if self.image_samples_hook is not None:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_hook(rollout["records"], self.global_step, tracker)
        if self.accelerator.is_main_process and self.config.num_grid_images > 0:
            grid = torch.cat([record[0] for record in rollout["records"]])[: self.config.num_grid_images]
            self.outputs.save_grid(grid, f"samples/epoch_{epoch:04d}.png")
        train_began = time.perf_counter()
        row.update(self.train_epoch(epoch, rollout["tensors"]))
        timings["time_training"] = time.perf_counter() - train_began
        if self.config.eval_freq and (epoch + 1) % self.config.eval_freq == 0:
            evaluation = self.evaluate()
            if evaluation is not None:
                row["eval_reward_mean"] = evaluation["reward_mean"]
                row.update({f"eval_{name}": value for name, value in evaluation["per_perspective"].items()})
        timings["time_epoch"] = time.perf_counter() - began
        row.update(global_step=self.global_step, num_nonfinite_rewards_total=self.num_nonfinite, **timings,
                   peak_memory_mb=peak_memory_mb(self.accelerator.device))
        self.end_epoch(epoch, row)
        return self.global_step


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    """`rlhf train grpo --config configs/grpo/X.yaml [--field value ...]`: any generator family."""
    return run_trainer_command(argv, GRPOConfig, GRPOTrainer)
