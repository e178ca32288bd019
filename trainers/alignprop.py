"""Reward back-propagation (AlignProp, DRaFT-K, DRaFT-LV): the gradient of a differentiable reward, taken through
the last denoising steps, trains a LoRA policy of any generator family (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1), sampled
through `rlhf.generators.backprop.sample_with_grad`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from rlhf.generators.backprop import RGBWithGradOutput, backprop_steps, sample_with_grad
from trainers.base import DDIMTrainerConfig, DiffusionTrainer, redeclare, require
from trainers.command import run_trainer_command
from trainers.common import draw_prompts, peak_memory_mb, perspective_values, reseed_global_rngs, seeded_generator

METHODS = ("alignprop", "draft_k", "draft_lv")


@dataclass
class AlignPropConfig(DDIMTrainerConfig):
    r"""Configuration of `AlignPropTrainer`: every field of TRL 0.23's `AlignPropConfig` (same names and
    defaults, the shared ones in `DiffusionTrainerConfig`; `truncated_rand_backprop_minmax` is a two-item list
    instead of a tuple, for the CLI), then this project's own. Each field's `help` says its default and meaning.

    Methods (`method`):
    - `alignprop` (AlignProp, Prabhudesai et al. 2023): back-propagate through the steps from index `start` on,
      `start` drawn per batch from `truncated_rand_backprop_minmax` (`truncated_backprop_rand`), else fixed at
      `truncated_backprop_timestep`; with `truncated_backprop_timestep = 0` and no randomisation, all steps.
    - `draft_k` (DRaFT-K, Clark et al. 2023): through the last `draft_k` steps only.
    - `draft_lv` (DRaFT-LV): the last step only, on `draft_lv_copies` re-noised copies of each final latent,
      rewards averaged (a lower-variance gradient for one extra denoiser call per copy).
    The loss is minus the mean (weighted) reward; its gradient is what every method follows.
    """

    # ---- TRL 0.23 ----
    log_image_freq: int = field(
        default=1, metadata={"help": "Call image_samples_hook every this many epochs (default 1)."}
    )
    num_epochs: int = field(
        default=100, metadata={"help": "Number of epochs; one epoch is one optimizer step (default 100)."}
    )
    train_batch_size: int = field(
        default=1, metadata={"help": "Images sampled with a graph per minibatch, per process (default 1)."}
    )
    train_learning_rate: float = redeclare("train_learning_rate", 1e-3, "1e-3")
    train_gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Minibatches accumulated per optimizer step, i.e. per epoch (default 1)."}
    )
    truncated_backprop_rand: bool = field(
        default=True,
        metadata={"help": "alignprop: draw the first back-propagated step per batch from "
                  "truncated_rand_backprop_minmax (default True)."},
    )
    truncated_backprop_timestep: int = field(
        default=49,
        metadata={"help": "alignprop without randomisation: index of the first back-propagated step; K = "
                  "sample_num_steps - this (default 49: the last of 50 steps)."},
    )
    truncated_rand_backprop_minmax: list[int] = field(
        default_factory=lambda: [0, 50],
        metadata={"help": "alignprop: [min, max] (inclusive) of the drawn first back-propagated step; a draw past "
                  "the last step back-propagates through the last step only (default 0 50)."},
    )
    # ---- this project ----
    method: str = field(
        default="alignprop",
        metadata={"help": "alignprop, draft_k or draft_lv (see the class notes) (default alignprop).", "choices": list(METHODS)},
    )
    draft_k: int = field(default=1, metadata={"help": "draft_k: steps back-propagated through, K (default 1)."})
    draft_lv_copies: int = field(
        default=2, metadata={"help": "draft_lv: re-noised copies of each image's last step (default 2)."}
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute each back-propagated denoiser call in the backward pass instead of storing its "
                  "activations (default True)."},
    )
    decode_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute the VAE decode in the backward pass too (default False)."}
    )
    output_dir: str = redeclare("output_dir", "runs/alignprop", "'runs/alignprop'")
    reward: dict = field(
        default_factory=lambda: {"builtin": "toy_colour_soft"},
        metadata={"help": "CLI: the reward block for rlhf.rewards.reward_fn.build_reward; it must give gradients "
                  "(default {builtin: toy_colour_soft})."},
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Images per evaluation sampling call (default 8)."})

    def validate(self) -> None:
        """Raise ValueError naming the first field that does not fit."""
        super().validate()
        minmax = list(self.truncated_rand_backprop_minmax)
        require([
            (self.method in METHODS, "method", f"one of {list(METHODS)}, got {self.method!r}"),
            (self.method != "alignprop" or self.truncated_backprop_rand
             or 0 <= self.truncated_backprop_timestep < self.sample_num_steps, "truncated_backprop_timestep",
             f"a step index in [0, sample_num_steps - 1 = {self.sample_num_steps - 1}]"),
            (len(minmax) == 2 and 0 <= minmax[0] <= minmax[1], "truncated_rand_backprop_minmax",
             f"two step indices [min, max] with 0 <= min <= max, got {minmax}"),
            (self.method != "draft_k" or 1 <= self.draft_k <= self.sample_num_steps, "draft_k", f"K in [1, sample_num_steps = {self.sample_num_steps}]"),
            (self.draft_lv_copies >= 1, "draft_lv_copies", "a value >= 1"),
            (self.log_image_freq >= 1, "log_image_freq", "a value >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size", "a value >= 1"),
        ])


def check_differentiable_reward(
    reward_function: Callable[..., Any], prompt_function: Callable[[], Any], height: int, width: int
) -> None:
    """Raise ValueError unless `reward_function` gives gradients to the pixels.

    A reward that says `differentiable = False` is refused at once; one that says nothing is probed with one
    grey image (requires_grad) and a prompt from `prompt_function` (the trainer reseeds every RNG per epoch, so
    the probe's draw changes nothing). A non-differentiable reward would otherwise train on a silent zero.
    """
    declared = getattr(reward_function, "differentiable", None)
    if declared is False:
        raise ValueError(
            f"reward: {type(reward_function).__name__} cannot give gradients (differentiable=False); reward "
            "back-propagation needs a differentiable reward (a RewardModel or toy_colour_soft with "
            "`differentiable: true`), or train with DDPO, which needs none"
        )
    if declared:
        return
    drawn = prompt_function()
    prompt, metadata = drawn if isinstance(drawn, tuple) else (drawn, {})
    pixels = torch.full((1, 3, height, width), 0.5, requires_grad=True)
    result = reward_function(pixels, [prompt], [metadata])
    rewards = result[0] if isinstance(result, tuple) else result
    if not (isinstance(rewards, torch.Tensor) and rewards.requires_grad):
        raise ValueError(
            "reward: the reward function returned rewards without a graph to the images; reward "
            "back-propagation needs a differentiable reward (or train with DDPO, which needs none)"
        )


class AlignPropTrainer(DiffusionTrainer):
    """AlignProp / DRaFT on accelerate, with TRL 0.23's constructor and `train()`.

    Args:
        config: an `AlignPropConfig`.
        reward_function: `reward_function(images, prompts, metadata) -> (rewards, info)` whose rewards [B] keep the
            graph to `images` (float BCHW in [0, 1]); `info["raw"]` may map perspective names to per-image scores
            (logged per perspective). Checked at construction: one that cannot give gradients is an error.
        prompt_function: `prompt_function() -> (prompt, metadata)` (or just a prompt); the global RNGs are
            reseeded from (seed, epoch, process) before each epoch's draws, so a run reproduces and resumes exactly.
        sd_pipeline: a `GeneratorAdapter` of any family (e.g. `DDPOStableDiffusionPipeline`, `SD3Adapter`,
            `FluxAdapter`); `sample_eta` is its step's noise level (DDIM's eta, a flow family's SDE noise level).
        image_samples_hook: called every `log_image_freq` epochs as TRL does, with
            `({"images", "prompts", "prompt_metadata", "rewards"}, global_step, tracker or None)` for the epoch's
            last minibatch.
    """

    curves = ("reward_mean", "loss", "grad_norm", "backprop_steps_mean")

    config: AlignPropConfig

    def check_inputs(
        self, config: Any, reward_function: Callable[..., Any], prompt_function: Callable[[], Any], sd_pipeline: Any
    ) -> None:
        check_differentiable_reward(
            reward_function, prompt_function, config.sample_height or sd_pipeline.default_size,
            config.sample_width or sd_pipeline.default_size,
        )

    def backward_calls_per_step(self) -> int:
        return self.config.train_gradient_accumulation_steps

    def optimizer_steps(self) -> int:
        return self.config.num_epochs  # one optimizer step per epoch

    @property
    def progress_name(self) -> str:  # type: ignore[override]
        return f"{self.config.method} epochs"

    def evaluation_batch_size(self) -> int:
        return self.config.eval_batch_size

    def sample_images(self, prompts: list[str], generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Evaluation images: the full chain without a graph."""
        with torch.no_grad():
            return self._sample_with_grad(prompts, generator, self.config.sample_num_steps).images

    # ---- sampling with gradients ----------------------------------------------------------------------------

    def sample_with_grad(self, prompts: list[str], generator: torch.Generator) -> RGBWithGradOutput:
        """Images of `prompts` with the graph the configured method back-propagates through: AlignProp's K from
        TRL's truncation options (a random K drawn with Python's `random`), DRaFT-K's K, or DRaFT-LV's copies."""
        config = self.config
        if config.method == "draft_lv":
            return self._sample_with_grad(prompts, generator, 0, lv_copies=config.draft_lv_copies)
        steps = config.draft_k
        if config.method == "alignprop":
            steps = backprop_steps(
                config.sample_num_steps,
                truncated_backprop_rand=config.truncated_backprop_rand,
                truncated_backprop_timestep=config.truncated_backprop_timestep,
                truncated_rand_backprop_minmax=tuple(config.truncated_rand_backprop_minmax),
            )
        return self._sample_with_grad(prompts, generator, steps)

    def _sample_with_grad(
        self, prompts: list[str], generator: torch.Generator | list[torch.Generator], steps: int, lv_copies: int = 0
    ) -> RGBWithGradOutput:
        """`sample_with_grad` through the generator's interface with the configured size, steps, guidance, negative
        prompt, noise level and checkpointing; the graph through the last `steps` steps (or DRaFT-LV's copies)."""
        config = self.config
        conditioning, latents, timesteps = self.sd_pipeline.prepare_sampling(
            prompts,
            num_inference_steps=config.sample_num_steps,
            guidance_scale=config.sample_guidance_scale,
            height=self.height,
            width=self.width,
            negative_prompt=[config.negative_prompts] * len(prompts) if config.negative_prompts else None,
            generator=generator,
        )
        return sample_with_grad(
            self.sd_pipeline, conditioning, latents, timesteps, guidance_scale=config.sample_guidance_scale,
            eta=config.sample_eta, generator=generator, backprop_steps=steps,
            gradient_checkpoint=config.gradient_checkpointing, decode_checkpoint=config.decode_checkpointing,
            lv_copies=lv_copies,
        )

    def _average_gradients_over_processes(self) -> None:
        """Mean of the LoRA gradients over processes.

        The sampler calls the bare denoiser, not accelerate's DDP wrapper: DDP's reducer expects one forward per
        backward, and a back-propagated chain makes K (recomputed under checkpointing). The LoRA is small, so
        one explicit all-reduce per optimizer step costs little.
        """
        if self.accelerator.num_processes == 1:
            return
        for parameter in self.trainable:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            parameter.grad = self.accelerator.reduce(parameter.grad, reduction="mean")

    # ---- the loop --------------------------------------------------------------------------------------------

    def train_epoch(self, epoch: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """One optimizer step over `train_gradient_accumulation_steps` minibatches sampled with a graph. Returns
        the epoch's statistics and the last minibatch (TRL's `prompt_image_pairs`)."""
        config, accelerator = self.config, self.accelerator
        rank = accelerator.process_index
        reseed_global_rngs(config.seed, epoch, rank)
        generator = seeded_generator(config.seed, epoch, rank, 0)
        self.denoiser.train()
        rewards_seen, perspectives, grid, backprop_steps = [], {}, [], []
        loss_total, grad_norm = 0.0, float("nan")
        last: dict[str, Any] = {}
        for _ in range(config.train_gradient_accumulation_steps):
            prompts, metadata = draw_prompts(self.prompt_fn, config.train_batch_size)
            with accelerator.accumulate(self.denoiser):
                output = self.sample_with_grad(prompts, generator)
                copies = max(output.lv_copies, 1)
                scored_prompts = [p for p in prompts for _ in range(copies)]
                scored_metadata = [m for m in metadata for _ in range(copies)]
                result = self.reward_fn(output.images, scored_prompts, scored_metadata)
                rewards, info = result if isinstance(result, tuple) else (result, {})
                if not (isinstance(rewards, torch.Tensor) and rewards.requires_grad):
                    raise ValueError("reward: the reward function returned rewards without a graph to the images")
                loss = -rewards.float().mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    self._average_gradients_over_processes()
                    grad_norm = float(accelerator.clip_grad_norm_(self.trainable, config.train_max_grad_norm))
                    self.global_step += 1
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad()
            detached = rewards.detach().float().reshape(-1, copies).mean(dim=1)
            rewards_seen.append(detached)
            for name, values in perspective_values(info).items():
                perspectives.setdefault(name, []).append(values)
            grid.append(output.images.detach().float().cpu()[::copies])
            backprop_steps.append(output.backprop_steps)
            loss_total += float(loss.detach())
            last = {"images": grid[-1], "prompts": prompts, "prompt_metadata": metadata, "rewards": detached.cpu()}
        rewards_all = accelerator.gather(torch.cat(rewards_seen).to(accelerator.device)).cpu().double()
        stats = {
            "reward_mean": float(rewards_all.mean()),
            "reward_std": float(rewards_all.std(unbiased=False)),
            "loss": loss_total / config.train_gradient_accumulation_steps,
            "grad_norm": grad_norm,
            "backprop_steps_mean": sum(backprop_steps) / len(backprop_steps),
            "lr": self.lr_scheduler.get_last_lr()[0],
        }
        for name, values in perspectives.items():
            gathered = accelerator.gather(torch.cat(values).to(accelerator.device)).cpu().double()
            stats[f"reward_{name}_mean"] = float(gathered.mean())
        if accelerator.is_main_process and config.num_grid_images > 0:
            self.outputs.save_grid(torch.cat(grid)[: config.num_grid_images], f"samples/epoch_{epoch:04d}.png")
        return stats, last

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch: sample with a graph, back-propagate the reward, step, log, checkpoint. Returns the global
        step (TRL 0.23's signature)."""
        self.global_step = global_step
        began = time.perf_counter()
        stats, last = self.train_epoch(epoch)
        if self.image_samples_hook is not None and epoch % self.config.log_image_freq == 0:
            tracker = self.accelerator.trackers[0] if self.accelerator.trackers else None
            self.image_samples_hook(last, self.global_step, tracker)
        row = {
            "epoch": epoch,
            "global_step": self.global_step,
            **stats,
            "time_epoch": time.perf_counter() - began,
            "peak_memory_mb": peak_memory_mb(self.accelerator.device),
        }
        self.end_epoch(epoch, row)
        return self.global_step


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    """`rlhf train alignprop --config configs/alignprop/X.yaml [--field value ...]`."""
    return run_trainer_command(argv, AlignPropConfig, AlignPropTrainer, differentiable=True)
