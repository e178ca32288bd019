"""GRPO for text-to-image generators (Flow-GRPO, DanceGRPO, MixGRPO): K images per prompt, group-normalised
advantages, PPO-clip on per-step ratios of a window of stochastic steps, a closed-form KL to the LoRA-free
reference. Written against `GeneratorAdapter` only, so one trainer serves SD (DDIM), SD3/3.5 and FLUX.1."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rlhf.generators.sampling import sde_window
from trainers.base import HELDOUT, DiffusionTrainerConfig, redeclare, require
from trainers.command import run_trainer_command
from trainers.common import Checkpointer, seeded_generator
from trainers.grpo_ema import ParameterEMA
from trainers.grpo_loss import grpo_advantages
from trainers.policy_gradient import PolicyGradientTrainer

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

    @property
    def group_size(self) -> int:
        return self.config.num_images_per_prompt

    def setup(self) -> None:
        """The EMA, then the shared set-up (reward statistics, asynchronous rewards)."""
        config = self.config
        self.ema = ParameterEMA(self.sd_pipeline.trainable_parameters(), config.ema_decay) if config.ema_decay > 0 else None
        super().setup()

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update()

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        super().load_checkpoint_state(state)
        if "eval_before" in state:  # a checkpoint from before GRPO shared the lifecycle's key `before`
            self.before = {"eval": state["eval_before"]}
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

    def stochastic_steps(self, epoch: int) -> torch.Tensor:
        """The SDE window: `sde_window_size` consecutive steps (all with 0) starting in `sde_window_range`, one
        window for every process (no rank in its seed), so that the processes train the same steps."""
        config = self.config
        return sde_window(config.sample_num_steps, config.sde_window_size, config.sde_window_range,
                          seeded_generator(config.seed, epoch, 2))

    def initial_noise(self, count: int, generator: torch.Generator) -> torch.Tensor | None:
        """With `same_initial_noise`, one noise per group repeated for its K images (DanceGRPO's init_same_noise)."""
        if not self.config.same_initial_noise:
            return None
        noise = self.sd_pipeline.initial_latents(count // self.group_size, self.height, self.width, generator)
        return noise.repeat_interleave(self.group_size, dim=0)

    def normalise_advantages(
        self, rewards: torch.Tensor, kept: list[int], prompts: list[str], local: int
    ) -> torch.Tensor:
        """By the per-prompt tracker when on, else within each group of K images (divided by the std of all the
        epoch's rewards with `global_std`)."""
        if self.stat_tracker is not None:
            return self.stat_tracker.update([prompts[i] for i in kept], rewards)
        # a group never spans processes: ids are (process, group index within the process)
        ids = [(i // local, (i % local) // self.group_size) for i in kept]
        return grpo_advantages(rewards, ids, self.config.global_std)

    def epoch_evaluation(self, epoch: int) -> dict[str, float]:
        """Every `eval_freq` epochs, the evaluation's mean reward and per-perspective means (held-out rewards
        among them) as `eval_*` columns."""
        if not self.config.eval_freq or (epoch + 1) % self.config.eval_freq:
            return {}
        evaluation = self.evaluate()
        if evaluation is None:
            return {}
        return {"eval_reward_mean": evaluation["reward_mean"],
                **{f"eval_{name}": value for name, value in evaluation["per_perspective"].items()}}


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    """`rlhf train grpo --config configs/grpo/X.yaml [--field value ...]`: any generator family."""
    return run_trainer_command(argv, GRPOConfig, GRPOTrainer)
