"""The policy-gradient trainers' shared algorithm (DDPO, GRPO): rollouts of groups of images with the log-probs of
their stochastic steps, advantages from the gathered rewards, and one PPO-clip loop over the replayed steps, all
through the `GeneratorAdapter` interface, so any generator family trains."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import torch

from rlhf.generators.base import GeneratorAdapter
from rlhf.generators.sampling import replay_steps
from rlhf.rewards.reward_fn import AsyncReward
from rlhf.rewards.stats import PerPromptStatTracker
from trainers.base import DiffusionTrainer
from trainers.common import (
    draw_prompts, gathered_advantages, peak_memory_mb, perspective_values, reseed_global_rngs, reward_result,
    seeded_generator,
)
from trainers.grpo_loss import clipped_policy_loss, gaussian_step_kl, ratio_statistics

COND = "cond/"  # prefix of the per-sample conditioning tensors among a rollout's tensors


class PolicyGradientTrainer(DiffusionTrainer):
    """The PPO-clip trainers (DDPO, GRPO), written once: an epoch samples groups of images per drawn prompt through
    `sample`, scores them (in sampling order, asynchronously if asked), turns the gathered rewards into advantages,
    replays the recorded stochastic steps under the current policy through `replay_steps` (any generator family),
    and minimises the clipped objective plus an optional KL to the LoRA-free reference, accumulated over
    minibatches and timestep chunks into optimizer steps.

    A subclass supplies `num_trained_steps`, `group_size` and `normalise_advantages`, and may extend
    `stochastic_steps` (GRPO's SDE window), `initial_noise`, `replayed_conditioning` (DDPO's `train_cfg`),
    `after_optimizer_step` (GRPO's EMA) and `epoch_evaluation`.
    """

    config: Any

    @property
    def num_trained_steps(self) -> int:
        """Steps of each trajectory trained on in an inner epoch."""
        raise NotImplementedError

    @property
    def group_size(self) -> int:
        """Images per drawn prompt, whose rewards `normalise_advantages` may compare."""
        raise NotImplementedError

    @property
    def timesteps_per_forward(self) -> int:
        """Trained steps per sample batched into one denoiser call."""
        return self.config.train_timesteps_per_forward or self.num_trained_steps

    def backward_calls_per_step(self) -> int:
        # one per timestep chunk of every accumulated minibatch
        forwards = -(-self.num_trained_steps // self.timesteps_per_forward)
        return self.config.train_gradient_accumulation_steps * forwards

    def optimizer_steps(self) -> int:
        config = self.config
        minibatches = config.sample_batch_size * config.sample_num_batches_per_epoch // config.train_batch_size
        return config.num_epochs * config.train_num_inner_epochs * minibatches // config.train_gradient_accumulation_steps

    def check_inputs(
        self, config: Any, reward_function: Callable[..., Any], prompt_function: Callable[[], Any], sd_pipeline: Any
    ) -> None:
        if not isinstance(sd_pipeline, GeneratorAdapter):
            raise TypeError(f"sd_pipeline: expected a GeneratorAdapter, got {type(sd_pipeline).__name__}")
        if config.kl_coef > 0 and not sd_pipeline.use_lora:
            raise ValueError("kl_coef: expected 0 without LoRA (the reference policy is the LoRA-free denoiser)")

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step that applied accumulated gradients."""

    def setup(self) -> None:
        """The per-prompt reward statistics and the asynchronous reward path."""
        config = self.config
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
            self.async_reward.close()  # the worker made around a plain function; a reward's own stays its own

    # ---- sampling and advantages -------------------------------------------------------------------------------

    def stochastic_steps(self, epoch: int) -> torch.Tensor:
        """[sample_num_steps] bool: the steps sampled with `noise_level`, recorded and trained (default all)."""
        return torch.ones(self.config.sample_num_steps, dtype=torch.bool)

    def initial_noise(self, count: int, generator: torch.Generator) -> torch.Tensor | None:
        """The epoch's initial latents for `count` images, or None for a fresh draw per image (default)."""
        return None

    def replayed_conditioning(self, conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of a batch's conditioning training replays (default all of it)."""
        return conditioning

    def normalise_advantages(
        self, rewards: torch.Tensor, kept: list[int], prompts: list[str], local: int
    ) -> torch.Tensor:
        """Advantages of the gathered finite `rewards` (indices `kept` among all processes' samples, `local` per
        process; `prompts` gathered likewise)."""
        raise NotImplementedError

    def sample_epoch(self, epoch: int) -> tuple["Rollout", dict[str, float]]:
        """Sample and score this process's groups for `epoch`; with async rewards each batch is scored in a thread
        while the next one samples. Returns the rollout (its `tensors`: the stochastic steps' latents, next
        latents, log-probs and timesteps, and the replayed conditioning) and the phase timings (seconds)."""
        config, rank = self.config, self.accelerator.process_index
        reseed_global_rngs(config.seed, epoch, rank)
        generator = seeded_generator(config.seed, epoch, rank, 0)
        stochastic = self.stochastic_steps(epoch)
        window = stochastic.nonzero().squeeze(1)
        size = config.sample_batch_size
        prompts, metadata = draw_prompts(
            self.prompt_fn, size * config.sample_num_batches_per_epoch // self.group_size, self.group_size
        )
        noise = self.initial_noise(len(prompts), generator)
        batches, images, pending = [], [], []
        timings = {"time_sampling": 0.0, "time_reward": 0.0}
        self.sd_pipeline.denoiser.eval()
        for start in range(0, len(prompts), size):
            chunk, chunk_meta = prompts[start : start + size], metadata[start : start + size]
            began = time.perf_counter()
            sampled = self.sample(chunk, generator, stochastic=stochastic,
                                  initial_latents=None if noise is None else noise[start : start + size])
            batches.append({
                "latents": sampled.latents[:, window], "next_latents": sampled.latents[:, window + 1],
                "log_probs": sampled.log_probs[:, window], "timesteps": sampled.timesteps[window].repeat(len(chunk), 1),
                **{COND + key: value for key, value in self.replayed_conditioning(sampled.conditioning).items()},
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
        rollout = Rollout(
            tensors={key: torch.cat([batch[key] for batch in batches]) for key in batches[0]},
            prompts=prompts,
            rewards=torch.cat([rewards for rewards, _ in results]).to(self.accelerator.device),
            perspectives={k: torch.cat(v).to(self.accelerator.device) for k, v in perspectives.items()},
            records=[[batch, prompts[i * size : (i + 1) * size], metadata[i * size : (i + 1) * size], rewards, info]
                     for i, (batch, (rewards, info)) in enumerate(zip(images, results))],
        )
        return rollout, timings

    def compute_advantages(self, rollout: "Rollout") -> dict[str, Any]:
        """Gather every process's rewards, drop non-finite ones, turn the rest into advantages and keep this
        process's share in `rollout.tensors` (`advantages`, `valid`). Returns the epoch's reward statistics.

        A reward weighted at the level "advantage" (GDPO) computes them from the gathered per-perspective scores;
        otherwise `normalise_advantages` does."""
        advantages, valid, stats = gathered_advantages(
            self.accelerator, self.reward_fn, rollout.rewards, rollout.perspectives, rollout.prompts,
            self.normalise_advantages,
        )
        rollout.tensors["advantages"], rollout.tensors["valid"] = advantages, valid
        self.num_nonfinite += stats["num_nonfinite_rewards"]
        return stats

    # ---- training ----------------------------------------------------------------------------------------------

    def replay(self, tensors: dict[str, torch.Tensor], rows: torch.Tensor, columns: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New log-probs [R, J] of recorded steps `columns` [R, J] of samples `rows` [R] (all pairs in one denoiser
        call), and their KL to the reference policy (when `kl_coef`)."""
        config, generator, pairs = self.config, self.sd_pipeline, columns.shape[1]

        def pick(key: str) -> torch.Tensor:
            return tensors[key][rows[:, None], columns].flatten(0, 1)

        latents, next_latents, timesteps = pick("latents"), pick("next_latents"), pick("timesteps")
        conditioning = {key[len(COND):]: value[rows].repeat_interleave(pairs, dim=0)
                        for key, value in tensors.items() if key.startswith(COND)}
        options = dict(guidance_scale=config.sample_guidance_scale, noise_level=self.noise_level)
        log_probs, mean, std = replay_steps(generator, latents, next_latents, timesteps, conditioning,
                                            denoiser=self.denoiser, **options)
        kl = None
        if config.kl_coef > 0:
            with torch.no_grad(), generator.reference_policy():
                _, reference_mean, _ = replay_steps(generator, latents, next_latents, timesteps, conditioning, **options)
            kl = gaussian_step_kl(mean, reference_mean, std).view(len(rows), pairs)
        return log_probs.view(len(rows), pairs), kl

    def train_epoch(self, epoch: int, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        """PPO-clip over the epoch's samples: `train_num_inner_epochs` passes over shuffled samples, each taking a
        fresh random `num_trained_steps` of each sample's recorded steps, chunked by `timesteps_per_forward`.
        Returns the means over trained pairs of loss, approx-KL, clip fraction, ratio (and KL), the ratio's
        extremes and the learning rate."""
        config, accelerator = self.config, self.accelerator
        generator = seeded_generator(config.seed, epoch, accelerator.process_index, 1)
        count, steps = tensors["timesteps"].shape
        window_pairs = config.train_batch_size * self.num_trained_steps * config.train_gradient_accumulation_steps
        scale = accelerator.gradient_accumulation_steps / window_pairs
        names = ["loss", "approx_kl", "clipfrac", "ratio", "kl", "pairs"]
        totals = torch.zeros(len(names), dtype=torch.float64)
        extremes = torch.tensor([float("inf"), float("inf")], dtype=torch.float64)  # min ratio, -max ratio
        # replays need the sampling schedule, whatever an evaluation or a user's hook set since
        self.sd_pipeline.set_timesteps(config.sample_num_steps, self.height, self.width)
        self.denoiser.train()
        for _ in range(config.train_num_inner_epochs):
            order = torch.randperm(count, generator=generator)
            step_order = torch.rand(count, steps, generator=generator).argsort(dim=1)[:, : self.num_trained_steps]
            for start in range(0, count, config.train_batch_size):
                rows = order[start : start + config.train_batch_size]
                for first in range(0, self.num_trained_steps, self.timesteps_per_forward):
                    columns = step_order[rows, first : first + self.timesteps_per_forward]
                    with accelerator.accumulate(self.denoiser):
                        loss, stats = self.ppo_loss(tensors, rows.to(accelerator.device), columns.to(accelerator.device))
                        accelerator.backward(loss * scale)
                        if accelerator.sync_gradients:
                            accelerator.clip_grad_norm_(self.trainable, config.train_max_grad_norm)
                            self.global_step += 1
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.optimizer.zero_grad()
                        if accelerator.sync_gradients:
                            self.after_optimizer_step()
                    totals += torch.stack([stats[name] for name in names]).double().cpu()
                    pair = torch.stack([stats["ratio_min"], -stats["ratio_max"]]).double().cpu()
                    extremes = torch.minimum(extremes, pair)
        totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        extremes = accelerator.gather(extremes[None].to(accelerator.device)).cpu().min(dim=0).values
        pairs = max(float(totals[5]), 1.0)
        result = {name: float(totals[i]) / pairs for i, name in enumerate(names[:5])}
        result["ratio_mean"] = result.pop("ratio")
        result.update(ratio_min=float(extremes[0]), ratio_max=-float(extremes[1]),
                      lr=self.lr_scheduler.get_last_lr()[0])
        if config.kl_coef == 0:
            result.pop("kl")
        return result

    def ppo_loss(self, tensors: dict[str, torch.Tensor], rows: torch.Tensor, columns: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed clipped objective (+ KL) over the pairs, invalid samples weighted 0; detached statistics."""
        config = self.config
        log_probs, kl = self.replay(tensors, rows, columns)
        old_log_probs = tensors["log_probs"][rows[:, None], columns]
        weight = tensors["valid"][rows].float()[:, None].expand_as(log_probs)
        per_pair, ratio = clipped_policy_loss(log_probs, old_log_probs, tensors["advantages"][rows][:, None],
                                              config.train_clip_range, config.train_adv_clip_max)
        if kl is not None:
            per_pair = per_pair + config.kl_coef * kl
        loss = (per_pair * weight).sum()
        stats = ratio_statistics(log_probs, old_log_probs, ratio, config.train_clip_range, weight)
        stats.update(loss=loss.detach(), pairs=weight.sum(),
                     kl=(kl.detach() * weight).sum() if kl is not None else torch.zeros((), device=loss.device))
        return loss, stats

    # ---- the epoch ---------------------------------------------------------------------------------------------

    def epoch_evaluation(self, epoch: int) -> dict[str, float]:
        """Columns an epoch's history row gets from an evaluation after its training (default none)."""
        return {}

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
        evaluation = self.epoch_evaluation(epoch)
        timings["time_epoch"] = time.perf_counter() - began
        samples = len(rollout.prompts) * self.accelerator.num_processes
        row = {
            "epoch": epoch,
            "global_step": self.global_step,
            **reward_stats,
            "num_nonfinite_rewards_total": self.num_nonfinite,
            **train_stats,
            **evaluation,
            **timings,
            "samples_per_s": samples / max(timings["time_sampling"] + timings["time_reward"], 1e-9),
            "peak_memory_mb": peak_memory_mb(self.accelerator.device),
        }
        self.end_epoch(epoch, row)
        return self.global_step


@dataclass
class Rollout:
    """One epoch's samples on this process: batch-first tensors (latents, next_latents, log_probs, timesteps [count,
    recorded steps, ...], `COND`-prefixed conditioning, later advantages and valid), the prompts, rewards,
    per-perspective scores, and TRL's per-batch `[images, prompts, metadata, rewards, info]` records."""

    tensors: dict[str, torch.Tensor]
    prompts: list[str]
    rewards: torch.Tensor
    perspectives: dict[str, torch.Tensor]
    records: list[list[Any]]
