"""DDPO: PPO-clip on the per-step log-probs of a LoRA text-to-image policy, from a black-box reward: DDIM's for Stable
Diffusion (TRL's `DDPOStableDiffusionPipeline`), the flow SDE's for SD3 / FLUX.1 (any `GeneratorAdapter`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf.rewards.stats import batch_advantages, group_advantages
from trainers.base import DDIMTrainerConfig, redeclare, require
from trainers.command import run_trainer_command
from trainers.policy_gradient import PolicyGradientTrainer



@dataclass
class DDPOConfig(DDIMTrainerConfig):
    r"""Configuration of `DDPOTrainer`: every field of TRL 0.23.1's `DDPOConfig` (same names and defaults; the
    shared ones in `DiffusionTrainerConfig`), then this project's own. Each field's `help` says its default and
    meaning; fields that cannot apply here say so.

    Notes on the choices a user faces:
    - `train_clip_range`: log-probs are means over latent dimensions (see `rlhf.generators.scheduling`), so per-step
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
    def group_size(self) -> int:
        return self.config.group_size

    @property
    def num_trained_steps(self) -> int:
        """Timesteps of each trajectory trained on (`train_timestep_fraction` of them, drawn per sample)."""
        return max(1, int(self.config.sample_num_steps * self.config.train_timestep_fraction))

    def setup(self) -> None:
        """DeepSpeed's batch settings, then the shared set-up (reward statistics, asynchronous rewards)."""
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
        super().setup()

    def replayed_conditioning(self, conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The conditioning training replays: as sampled, or without the guidance halves when not `train_cfg`."""
        if self.config.train_cfg:
            return conditioning
        return {key: value for key, value in conditioning.items() if not key.startswith("negative_")}

    def normalise_advantages(
        self, rewards: torch.Tensor, kept: list[int], prompts: list[str], local: int
    ) -> torch.Tensor:
        """Within each group of `group_size` images of one prompt when `group_size > 1`, else by the per-prompt
        tracker, else over the whole batch."""
        config = self.config
        if config.group_size > 1:
            # a group never spans processes: ids are (process, group index within the process)
            return group_advantages(rewards, [(i // local, (i % local) // config.group_size) for i in kept])
        if self.stat_tracker is not None:
            return self.stat_tracker.update([prompts[i] for i in kept], rewards)
        return batch_advantages(rewards)


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    """`rlhf train ddpo --config configs/ddpo/X.yaml [--field value ...]`."""
    return run_trainer_command(argv, DDPOConfig, DDPOTrainer)
