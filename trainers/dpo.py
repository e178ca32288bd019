"""Diffusion-DPO (Wallace et al. 2023) on accelerate: offline from preference pairs, or online from pairs a reward
ranks among the policy's own samples, on any generator family (SD 1.x/2.x, SDXL: the UNet's epsilon/v target;
SD3/3.5, FLUX.1: the flow-matching velocity, as flow DPO trains). The reference policy is the same denoiser with
its LoRA disabled. Its config and trainer; the loss is in `trainers.dpo_loss`, the pairs in `trainers.dpo_pairs`
(readers in `reward.pairs`)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from reward.pairs import load_pairs
from rlhf.generators.base import GeneratorAdapter
from trainers.base import DDIMTrainerConfig, DiffusionTrainer, redeclare, require
from trainers.command import load_policy, load_run_prompts, uniform_prompt_function
from trainers.common import (
    build_process_reward, draw_prompts, eval_reward_change, peak_memory_mb, perspective_values,
    reseed_global_rngs, reward_call, reward_evaluations, run_directory, save_image_grid, seeded_generator,
    training_command,
)
from trainers.dpo_loss import LOSS_TYPES, diffusion_dpo_loss
from trainers.dpo_pairs import (
    PAIR_STRATEGIES, OnlineRound, PairBatch, PairLatents, build_preference_pairs,
)

MODES = ("offline", "online")
# second key of the held-out evaluation's random streams; training streams are keyed (epoch, process, purpose)
HELDOUT_STREAM = 2**31 - 1
SAMPLING, SHUFFLING, NOISE = 0, 1, 2
# per-pair sums accumulated over an epoch, in this order
STAT_NAMES = (
    "loss", "dpo_loss", "implicit_accuracy", "implicit_reward_margin", "implicit_reward_chosen",
    "implicit_reward_rejected", "model_mse_chosen", "model_mse_rejected", "reference_mse_chosen",
    "reference_mse_rejected",
)


@dataclass
class DiffusionDPOConfig(DDIMTrainerConfig):
    r"""Configuration of `DiffusionDPOTrainer`. Field names shared with `DDPOConfig` mean the same; each field's
    `help` says its default and meaning.

    The loss (Wallace et al.): one noise draw and one timestep per pair, shared by its two images; `mse` is the
    per-image mean squared error of the denoiser's prediction against the family's training target (SD: epsilon
    or v by the scheduler's `prediction_type`, timesteps uniform; SD3/FLUX: the velocity noise - x0, timesteps
    logit-normal as their training scripts draw them), for the policy (LoRA on) and the reference (LoRA off);
    `model_diff = mse_chosen - mse_rejected`, `ref_diff` the same for the reference, and

        margin = -beta / 2 * (model_diff - ref_diff)      (the implicit reward margin)
        sigmoid: -log sigmoid(margin)    hinge: relu(1 - margin)    ipo: (margin / (beta / 2) - 1 / beta) ** 2

    `beta` follows the Salesforce DiffusionDPO convention (5000, with the factor 1/2); diffusers' example
    writes `beta_dpo * (ref_diff - model_diff)` without it, so its 2500 is this 5000 (its IPO target `1 / (2 beta)`
    is this `1 / beta`). `sft_weight` adds `sft_weight * mse_chosen`, the plain denoising loss on the winners.

    Modes: "offline" trains on `dataset` (JSONL pairs, Pick-a-Pic v2 columns with ties dropped, ...: the layouts of
    `reward.data.load_preferences`); an epoch is `train_steps_per_epoch` optimizer steps (0 = one pass over the
    pairs). "online" runs rounds: K = `group_size` images per prompt from the current policy, scored by the reward,
    paired (`pair_strategy`), trained on for `train_num_inner_epochs` passes; each round's pairs and rewards are
    written to `output_dir/pairs/`.
    """

    # ---- run ----
    output_dir: str = redeclare("output_dir", "runs/dpo", "'runs/dpo'")
    mode: str = field(
        default="online", metadata={"help": "'offline' (preference dataset) or 'online' (reward-ranked samples) (default 'online')."}
    )
    num_epochs: int = field(
        default=100, metadata={"help": "Epochs: online rounds, or offline blocks of train_steps_per_epoch steps (default 100)."}
    )
    # ---- model ----
    pretrained_model: str = field(
        default="",
        metadata={"help": "A diffusers pipeline path or hub id (SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1) or a saved policy "
                  "directory; '' = the toy generator, 'toy-flow' = the toy flow generator (SD3); 'tiny', 'tiny-sd3', "
                  "'tiny-flux' = a random tiny pipeline (plumbing only) (default '')."},
    )
    pretrained_revision: str = field(default="main", metadata={"help": "Hub revision (default 'main')."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank; the LoRA is the policy, the denoiser without it the reference (default 4)."})
    lora_alpha: float = field(default=4.0, metadata={"help": "LoRA alpha (default 4)."})
    # ---- loss ----
    beta: float = field(default=5000.0, metadata={"help": "DPO temperature, Salesforce convention (see class notes) (default 5000)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "'sigmoid', 'hinge' or 'ipo' (default 'sigmoid')."})
    sft_weight: float = field(default=0.0, metadata={"help": "Weight of the denoising loss on the chosen images (default 0)."})
    # ---- offline data ----
    dataset: str = field(
        default="",
        metadata={"help": "Offline: a .jsonl/.json/.parquet file (toy-world pairs: `rlhf toy data --out DIR` writes "
                  "DIR/alignment/train.jsonl), a `datasets.save_to_disk` directory or a hub dataset id (local cache) "
                  "(default '')."},
    )
    dataset_kind: str = field(
        default="auto", metadata={"help": "Row layout for reward.data.load_preferences: auto, pairs, pickapic, imagereward, hpdv2 (default auto)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub or saved DatasetDict (default 'train')."})
    eval_dataset: str = field(
        default="",
        metadata={"help": "Held-out pairs, same forms as dataset; implicit accuracy is measured on them before and "
                  "after training (default '': none)."},
    )
    eval_dataset_split: str = field(default="test", metadata={"help": "Split of a hub or saved eval DatasetDict (default 'test')."})
    image_root: str = field(default="", metadata={"help": "Directory relative image paths resolve against (default: the file's)."})
    check_images: bool = field(
        default=True, metadata={"help": "Decode every image once when loading, skipping corrupt rows (default True)."}
    )
    max_train_pairs: int = field(default=0, metadata={"help": "Use at most this many training pairs; 0 = all (default 0)."})
    max_eval_pairs: int = field(default=0, metadata={"help": "Use at most this many held-out pairs; 0 = all (default 0)."})
    resolution: int = field(
        default=0, metadata={"help": "Offline images: shorter side resized to this, centre-cropped square; 0 = the model's size (default 0)."}
    )
    latent_cache_dir: str = field(
        default="",
        metadata={"help": "Encode every image to VAE latents once into this directory (float16, reused by later runs of "
                  "the same data and model); '' = encode each batch as it is used (default '')."},
    )
    train_steps_per_epoch: int = field(
        default=0, metadata={"help": "Offline optimizer steps per epoch; 0 = one pass over the pairs (default 0)."}
    )
    heldout_noise_draws: int = field(
        default=4, metadata={"help": "Noise/timestep draws per held-out pair when measuring implicit accuracy (default 4)."}
    )
    # ---- online sampling and pairing ----
    reward: dict = field(
        default_factory=lambda: {"builtin": "toy_colour_soft"},
        metadata={"help": "The reward block for rlhf.rewards.reward_fn.build_reward (with its weighting): online it ranks the "
                  "samples; both modes evaluate with it; {} = none (offline only) (default {builtin: toy_colour_soft})."},
    )
    group_size: int = field(default=4, metadata={"help": "Online: K images per drawn prompt, paired within the group (default 4)."})
    pair_strategy: str = field(
        default="best_worst",
        metadata={"help": "Online: 'best_worst' (one pair per group) or 'all' (every pair in a group) (default 'best_worst')."},
    )
    pair_margin: float = field(
        default=0.0, metadata={"help": "Online: a pair needs a reward gap above this (default 0: any strict gap)."}
    )
    save_pair_images: bool = field(
        default=True, metadata={"help": "Online: write each round's paired images as PNG next to its JSONL (default True)."}
    )
    sample_batch_size: int = field(default=4, metadata={"help": "Images per sampling batch, per process (default 4)."})
    sample_num_batches_per_epoch: int = field(
        default=2, metadata={"help": "Online: sampling batches per round, per process (default 2)."}
    )
    # ---- optimisation ----
    train_batch_size: int = field(default=4, metadata={"help": "Pairs per minibatch, per process (default 4)."})
    train_num_inner_epochs: int = field(default=1, metadata={"help": "Online: passes over each round's pairs (default 1)."})
    train_learning_rate: float = redeclare("train_learning_rate", 1e-5, "1e-5")
    train_adam_weight_decay: float = redeclare("train_adam_weight_decay", 1e-2, "1e-2")

    @property
    def use_lora(self) -> bool:
        """Always: the reference policy is the denoiser with its LoRA disabled (read by `trainers.command.load_policy`)."""
        return True

    def validate(self) -> None:
        """Raise ValueError naming the first field that does not fit."""
        super().validate()
        per_process = self.sample_batch_size * self.sample_num_batches_per_epoch
        online = self.mode == "online"
        require([
            (self.mode in MODES, "mode", f"one of {MODES}"),
            (self.loss_type in LOSS_TYPES, "loss_type", f"one of {LOSS_TYPES}"),
            (self.beta > 0, "beta", "a value > 0"),
            (self.sft_weight >= 0, "sft_weight", "a value >= 0"),
            (self.train_num_inner_epochs >= 1, "train_num_inner_epochs", "a value >= 1"),
            (self.sample_batch_size >= 1 and self.sample_num_batches_per_epoch >= 1, "sample_batch_size", "positive batch sizes"),
            (not online or self.group_size >= 2, "group_size", "at least 2 images per prompt to rank (online)"),
            (not online or per_process % self.group_size == 0, "group_size",
             f"a divisor of sample_batch_size * sample_num_batches_per_epoch = {per_process}"),
            (self.pair_strategy in PAIR_STRATEGIES, "pair_strategy", f"one of {PAIR_STRATEGIES}"),
            (self.pair_margin >= 0, "pair_margin", "a value >= 0"),
            (not online or bool(self.reward), "reward", "a reward block (online pairs are ranked by it)"),
            (online or bool(self.dataset), "dataset", "a preference dataset (offline mode)"),
            (self.train_steps_per_epoch >= 0, "train_steps_per_epoch", "a value >= 0"),
            (self.resolution >= 0, "resolution", "a value >= 0"),
            (self.heldout_noise_draws >= 1, "heldout_noise_draws", "a value >= 1"),
            (self.max_train_pairs >= 0 and self.max_eval_pairs >= 0, "max_train_pairs/max_eval_pairs", "values >= 0"),
        ])


# ------------------------------------------------------------------------------------------- the trainer


class DiffusionDPOTrainer(DiffusionTrainer):
    """Diffusion-DPO with a LoRA policy; the reference is the same denoiser with the LoRA disabled (no second copy).
    It reaches the generator only through the `GeneratorAdapter` interface (sampling, `encode_images`,
    `training_timesteps`, `add_noise`, `training_target`, `predict`, `reference_policy`), so any family trains.

    Args:
        config: a `DiffusionDPOConfig`.
        sd_pipeline: a `GeneratorAdapter` of any family with a LoRA (`use_lora=True`), e.g. a
            `DDPOStableDiffusionPipeline`, `SD3Adapter` or `FluxAdapter`.
        reward_function: `reward_function(images, prompts, metadata) -> (rewards, info)`, images float BCHW in [0, 1];
            ranks online samples, and evaluates either mode before/after training (None: no reward evaluation).
        prompt_function: online: `prompt_function() -> (prompt, metadata)` (or a prompt), called once per group; the
            global RNGs are reseeded from (seed, round, process) before each round, so it reproduces and resumes.
        train_pairs, eval_pairs: offline: `reward.data.PairExample` lists; default: read from `config.dataset` /
            `config.eval_dataset`.
    """

    progress_name = "DPO epochs"
    progress_columns = ("loss", "implicit_accuracy")
    curves = ("loss", "implicit_accuracy", "implicit_reward_margin", "reward_mean")

    def __init__(
        self,
        config: DiffusionDPOConfig,
        sd_pipeline: GeneratorAdapter,
        reward_function: Callable[..., Any] | None = None,
        prompt_function: Callable[[], Any] | None = None,
        train_pairs: Sequence[Any] | None = None,
        eval_pairs: Sequence[Any] | None = None,
    ) -> None:
        config.validate()
        if not sd_pipeline.use_lora:
            raise ValueError("sd_pipeline: expected use_lora=True (the reference policy is the denoiser without its LoRA)")
        if config.mode == "online" and (reward_function is None or prompt_function is None):
            raise ValueError("mode: 'online' needs a reward_function and a prompt_function")
        self.start(config, sd_pipeline, reward_function, prompt_function)
        self.train_data, self.heldout = self._offline_data(train_pairs, eval_pairs)
        self._data_order: tuple[int, torch.Tensor] = (-1, torch.empty(0))  # (data pass, its permutation)
        self.prepare()

    def optimizer_steps(self) -> int:
        return self.config.num_epochs * self.steps_per_epoch()

    # ---- setup -----------------------------------------------------------------------------------------------

    def _offline_data(self, train_pairs: Sequence[Any] | None, eval_pairs: Sequence[Any] | None) -> tuple[Any, Any]:
        config = self.config
        resolution = config.resolution or self.sd_pipeline.default_size
        try:
            self.sd_pipeline.latent_shape(1, resolution, resolution)
        except ValueError as error:
            raise ValueError(f"resolution: {error}") from error

        def read(source: str, split: str, limit: int, field_name: str) -> Sequence[Any]:
            return load_pairs(source, config.dataset_kind, split, config.image_root, config.check_images, limit, field_name)

        cache = Path(config.latent_cache_dir) if config.latent_cache_dir else None
        train = heldout = None
        if config.mode == "offline":
            if train_pairs is None:
                train_pairs = read(config.dataset, config.dataset_split, config.max_train_pairs, "dataset")
            train = PairLatents(train_pairs, self.sd_pipeline, resolution, cache and cache / "train", config.train_batch_size)
        if eval_pairs is None and config.eval_dataset:
            eval_pairs = read(config.eval_dataset, config.eval_dataset_split, config.max_eval_pairs, "eval_dataset")
        if eval_pairs:
            heldout = PairLatents(eval_pairs, self.sd_pipeline, resolution, cache and cache / "heldout", config.train_batch_size)
        return train, heldout

    def steps_per_epoch(self) -> int:
        """Offline optimizer steps per epoch; online, an upper bound (every group fully paired) for LR schedules."""
        config, processes = self.config, self.accelerator.num_processes
        if self.train_data is not None:
            pairs_per_step = config.train_batch_size * config.train_gradient_accumulation_steps * processes
            return config.train_steps_per_epoch or math.ceil(len(self.train_data) / pairs_per_step)
        groups = config.sample_batch_size * config.sample_num_batches_per_epoch // config.group_size
        per_group = 1 if config.pair_strategy == "best_worst" else config.group_size * (config.group_size - 1) // 2
        minibatches = math.ceil(groups * per_group / config.train_batch_size)
        return config.train_num_inner_epochs * math.ceil(minibatches / config.train_gradient_accumulation_steps)

    # ---- the loss --------------------------------------------------------------------------------------------

    def reference_prediction(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The reference's prediction: the policy's own denoiser with its LoRA disabled, without gradients."""
        with torch.no_grad(), self.sd_pipeline.reference_policy(), self.accelerator.autocast():
            return self.sd_pipeline.predict(noisy, timesteps, conditioning, self.config.sample_guidance_scale)

    def pair_errors(self, batch: PairBatch, generator: torch.Generator, with_grad: bool = True) -> dict[str, torch.Tensor]:
        """Per-image denoising errors [B] of the policy and the reference on both images of each pair, with one noise
        draw and then one timestep per pair (from `generator`, in that order), shared by its two images; the
        timesteps, noising and target are the generator family's training objective."""
        generator_model = self.sd_pipeline
        count = len(batch.chosen)
        noise = torch.randn(batch.chosen.shape, generator=generator).to(batch.chosen.device)
        timesteps = generator_model.training_timesteps(count, generator)
        latents = torch.cat([batch.chosen, batch.rejected])
        noise, timesteps = torch.cat([noise, noise]), timesteps.repeat(2).to(noise.device)
        noisy = generator_model.add_noise(latents, noise, timesteps)
        target = generator_model.training_target(latents, noise, timesteps).float()
        image_dims = tuple(range(1, latents.ndim))
        # the conditioning holds no negatives, so no classifier-free guidance: the scale reaches only a guidance
        # embedding (FLUX.1-dev), which diffusers' FLUX training also feeds the sampling guidance
        guidance = self.config.sample_guidance_scale
        with torch.enable_grad() if with_grad else torch.no_grad():
            prediction = generator_model.predict(noisy, timesteps, batch.conditioning, guidance, denoiser=self.denoiser)
            model = ((prediction - target) ** 2).mean(dim=image_dims)
        reference = self.reference_prediction(noisy, timesteps, batch.conditioning)
        reference = ((reference - target) ** 2).mean(dim=image_dims)
        return {
            "model_chosen": model[:count], "model_rejected": model[count:],
            "reference_chosen": reference[:count], "reference_rejected": reference[count:],
        }

    def pair_loss(
        self, batch: PairBatch, generator: torch.Generator, with_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The minibatch loss (mean over pairs of the DPO loss + `sft_weight` * policy error on the chosen image) and
        the per-pair sums of `STAT_NAMES` (float64, CPU)."""
        config = self.config
        errors = self.pair_errors(batch, generator, with_grad)
        losses, margin = diffusion_dpo_loss(
            errors["model_chosen"], errors["model_rejected"], errors["reference_chosen"], errors["reference_rejected"],
            config.beta, config.loss_type,
        )
        per_pair = losses + config.sft_weight * errors["model_chosen"]
        with torch.no_grad():
            scale = config.beta / 2
            columns = [
                per_pair, losses, (margin > 0).float() + 0.5 * (margin == 0).float(), margin,
                scale * (errors["reference_chosen"] - errors["model_chosen"]),
                scale * (errors["reference_rejected"] - errors["model_rejected"]),
                errors["model_chosen"], errors["model_rejected"], errors["reference_chosen"], errors["reference_rejected"],
            ]
            sums = torch.stack([column.sum() for column in columns]).double().cpu()
        return per_pair.mean(), torch.cat([sums, torch.tensor([float(len(losses))], dtype=torch.float64)])

    def training_step(self, batches: Sequence[PairBatch], generator: torch.Generator) -> torch.Tensor:
        """One optimizer step over the minibatches `batches` (gradients accumulated, synchronised on the last);
        returns the summed per-pair statistics."""
        totals = torch.zeros(len(STAT_NAMES) + 1, dtype=torch.float64)
        self.denoiser.train()
        for index, batch in enumerate(batches):
            last = index == len(batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.denoiser):
                loss, stats = self.pair_loss(batch, generator)
                self.accelerator.backward(loss / len(batches))
            totals += stats
        self.accelerator.clip_grad_norm_(self.trainable, self.config.train_max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.global_step += 1
        return totals

    def _summarise(self, totals: torch.Tensor) -> dict[str, float]:
        totals = self.accelerator.reduce(totals.to(self.accelerator.device), reduction="sum").cpu()
        count = float(totals[-1])
        values = {name: float(totals[i]) / count if count else float("nan") for i, name in enumerate(STAT_NAMES)}
        return {**values, "num_pairs": int(count)}

    # ---- offline ---------------------------------------------------------------------------------------------

    def _offline_indices(self, microbatch: int) -> list[int]:
        """This process's pairs for the run's `microbatch`-th minibatch: passes over the data in a seeded order
        each, so any epoch is known from its number alone (exact resume)."""
        size, rank, world = self.config.train_batch_size, self.accelerator.process_index, self.accelerator.num_processes
        count = len(self.train_data)
        first = (microbatch * world + rank) * size
        indices = []
        for position in range(first, first + size):
            data_pass = position // count
            if self._data_order[0] != data_pass:
                order = torch.randperm(count, generator=seeded_generator(self.config.seed, data_pass, SHUFFLING))
                self._data_order = (data_pass, order)
            indices.append(int(self._data_order[1][position % count]))
        return indices

    def train_offline_epoch(self, epoch: int) -> dict[str, float]:
        config, accumulation = self.config, self.config.train_gradient_accumulation_steps
        generator = seeded_generator(config.seed, epoch, self.accelerator.process_index, NOISE)
        totals = torch.zeros(len(STAT_NAMES) + 1, dtype=torch.float64)
        steps = self.steps_per_epoch()
        quiet = not self.accelerator.is_local_main_process
        for step in tqdm(range(steps), desc=f"epoch {epoch}", leave=False, disable=quiet):
            first = (epoch * steps + step) * accumulation
            batches = [self.train_data.batch(self._offline_indices(first + k)) for k in range(accumulation)]
            totals += self.training_step(batches, generator)
        return self._summarise(totals)

    @torch.no_grad()
    def evaluate_heldout(self) -> dict[str, float] | None:
        """Implicit accuracy, loss and reward margin on the held-out pairs, `heldout_noise_draws` fixed draws each
        (the same draws before and after training). Accuracy counts a zero margin as 0.5, so the initial policy
        (equal to the reference) scores exactly 0.5."""
        if self.heldout is None:
            return None
        self.denoiser.eval()
        size, rank, world = self.config.train_batch_size, self.accelerator.process_index, self.accelerator.num_processes
        totals = torch.zeros(len(STAT_NAMES) + 1, dtype=torch.float64)
        starts = range(rank * size, len(self.heldout), size * world)
        for start in tqdm(starts, desc="held-out pairs", unit="batch", leave=False,
                          disable=not self.accelerator.is_local_main_process):
            batch = self.heldout.batch(range(start, min(start + size, len(self.heldout))))
            for draw in range(self.config.heldout_noise_draws):
                generator = seeded_generator(self.config.seed, HELDOUT_STREAM, start, draw)
                totals += self.pair_loss(batch, generator, with_grad=False)[1]
        summary = self._summarise(totals)
        return {
            "implicit_accuracy": summary["implicit_accuracy"], "loss": summary["dpo_loss"],
            "implicit_reward_margin": summary["implicit_reward_margin"], "num_pairs": len(self.heldout),
            "noise_draws": self.config.heldout_noise_draws,
        }

    # ---- online ----------------------------------------------------------------------------------------------

    def sample_round(self, epoch: int) -> tuple[OnlineRound, dict[str, float]]:
        """Sample K images for each drawn prompt with the current policy, score them and pair them."""
        config, rank = self.config, self.accelerator.process_index
        reseed_global_rngs(config.seed, epoch, rank)
        generator = seeded_generator(config.seed, epoch, rank, SAMPLING)
        groups = config.sample_batch_size * config.sample_num_batches_per_epoch // config.group_size
        prompts, metadata = draw_prompts(self.prompt_fn, groups, config.group_size)
        self.denoiser.eval()
        latents, conditioning, images, rewards, perspectives = [], [], [], [], {}
        timings = {"time_sampling": 0.0, "time_reward": 0.0}
        for start in range(0, len(prompts), config.sample_batch_size):
            chunk = prompts[start : start + config.sample_batch_size]
            began = time.perf_counter()
            output = self.sample(chunk, generator)
            timings["time_sampling"] += time.perf_counter() - began
            began = time.perf_counter()
            batch_rewards, info = reward_call(self.reward_fn, output.images, chunk, metadata[start : start + len(chunk)])
            timings["time_reward"] += time.perf_counter() - began
            latents.append(output.latents[:, -1])
            conditioning.append({k: v for k, v in output.conditioning.items() if not k.startswith("negative_")})
            images.append(output.images.float().cpu())
            rewards.append(batch_rewards)
            for name, values in perspective_values(info).items():
                perspectives.setdefault(name, []).append(values)
        rewards_all = torch.cat(rewards)
        round_ = OnlineRound(
            prompts=prompts,
            latents=torch.cat(latents),
            conditioning={key: torch.cat([c[key] for c in conditioning]) for key in conditioning[0]},
            images=torch.cat(images),
            rewards=rewards_all,
            perspectives={name: torch.cat(values) for name, values in perspectives.items()},
            pairs=build_preference_pairs(rewards_all, config.group_size, config.pair_strategy, config.pair_margin),
        )
        return round_, timings

    def save_round(self, epoch: int, round_: OnlineRound) -> Path:
        """Write the round's pairs (prompt, rewards, per-perspective scores and, if asked, the two images as PNG) to
        `pairs/round_<epoch>[_rank<r>].jsonl`, a file `reward.data.load_preferences` reads back as pairs."""
        rank = self.accelerator.process_index
        suffix = f"_rank{rank}" if self.accelerator.num_processes > 1 else ""
        directory = run_directory(self.config) / "pairs"
        image_dir = f"round_{epoch:04d}{suffix}"
        rows = []
        for chosen, rejected in round_.pairs:
            row: dict[str, Any] = {"prompt": round_.prompts[chosen], "round": epoch}
            for role, index in (("chosen", chosen), ("rejected", rejected)):
                if self.config.save_pair_images:
                    row[role] = f"{image_dir}/sample_{index:04d}.png"
                    save_image_grid(round_.images[index : index + 1], directory / row[role], columns=1)
                row[f"{role}_index"] = index
                row[f"{role}_reward"] = float(round_.rewards[index])
                if round_.perspectives:
                    row[f"{role}_scores"] = {name: float(v[index]) for name, v in round_.perspectives.items()}
            rows.append(row)
        path = directory / f"{image_dir}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path

    def train_online_round(self, epoch: int, round_: OnlineRound) -> dict[str, float]:
        """`train_num_inner_epochs` shuffled passes over the round's pairs. Every process runs the same number of
        minibatches (the fewest any process can fill), so that gradient synchronisation lines up."""
        config, accelerator = self.config, self.accelerator
        rank = accelerator.process_index
        order_generator = seeded_generator(config.seed, epoch, rank, SHUFFLING)
        noise_generator = seeded_generator(config.seed, epoch, rank, NOISE)
        local = torch.tensor([math.ceil(len(round_.pairs) / config.train_batch_size)], device=accelerator.device)
        minibatches = int(accelerator.gather(local).min())
        totals = torch.zeros(len(STAT_NAMES) + 1, dtype=torch.float64)
        for _ in range(config.train_num_inner_epochs if minibatches else 0):
            order = torch.randperm(len(round_.pairs), generator=order_generator)
            chunks = [order[i * config.train_batch_size : (i + 1) * config.train_batch_size] for i in range(minibatches)]
            for start in range(0, minibatches, config.train_gradient_accumulation_steps):
                window = chunks[start : start + config.train_gradient_accumulation_steps]
                totals += self.training_step([round_.batch(chunk) for chunk in window], noise_generator)
        return self._summarise(totals)

    def online_epoch(self, epoch: int) -> dict[str, Any]:
        round_, timings = self.sample_round(epoch)
        accelerator = self.accelerator
        rewards = accelerator.gather(round_.rewards.to(accelerator.device)).cpu().double()
        finite = rewards[torch.isfinite(rewards)]
        self.num_nonfinite += len(rewards) - len(finite)
        gaps = torch.tensor([float(round_.rewards[c] - round_.rewards[r]) for c, r in round_.pairs], dtype=torch.float64)
        gap_sum = torch.tensor([gaps.sum(), len(gaps)], dtype=torch.float64, device=accelerator.device)
        gap_sum = accelerator.reduce(gap_sum, "sum").cpu()
        row: dict[str, Any] = {
            "reward_mean": float(finite.mean()) if len(finite) else float("nan"),
            "reward_std": float(finite.std(unbiased=False)) if len(finite) else float("nan"),
            "num_nonfinite_rewards": len(rewards) - len(finite),
            "round_pairs": int(gap_sum[1]),
            "pair_reward_gap_mean": float(gap_sum[0] / gap_sum[1]) if gap_sum[1] else float("nan"),
        }
        for name, values in round_.perspectives.items():
            gathered = accelerator.gather(values.to(accelerator.device)).cpu().double()
            row[f"reward_{name}_mean"] = float(gathered[torch.isfinite(gathered)].mean())
        self.save_round(epoch, round_)
        if accelerator.is_main_process and self.config.num_grid_images > 0:
            self.outputs.save_grid(round_.images[: self.config.num_grid_images], f"samples/epoch_{epoch:04d}.png")
        began = time.perf_counter()
        row.update(self.train_online_round(epoch, round_))
        return {**row, **timings, "time_training": time.perf_counter() - began}

    # ---- the loop --------------------------------------------------------------------------------------------

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch (offline: `steps_per_epoch()` optimizer steps; online: one round): train, log, checkpoint.
        Returns the global step."""
        self.global_step = global_step
        began = time.perf_counter()
        if self.config.mode == "offline":
            row = self.train_offline_epoch(epoch)
        else:
            row = self.online_epoch(epoch)
        row = {"epoch": epoch, "global_step": self.global_step, **row, "lr": self.lr_scheduler.get_last_lr()[0],
               "time_epoch": time.perf_counter() - began, "peak_memory_mb": peak_memory_mb(self.accelerator.device)}
        self.end_epoch(epoch, row)
        return self.global_step

    def evaluations(self, stage: str) -> dict[str, Any]:
        """The reward evaluation (`evaluate`) and the held-out pairs' implicit accuracy (`evaluate_heldout`)."""
        return {"eval": self.evaluate(stage), "heldout": self.evaluate_heldout()}

    def evaluation_points(self, metrics: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
        heldout = [(epoch, metrics[f"heldout_{stage}"]["implicit_accuracy"])
                   for epoch, stage in ((-1, "before"), (metrics["epochs"] - 1, "after")) if metrics[f"heldout_{stage}"]]
        return {**reward_evaluations(metrics), **({"implicit_accuracy": heldout} if heldout else {})}

    def extra_metrics(self) -> dict[str, Any]:
        return {"mode": self.config.mode, "num_nonfinite_rewards": self.num_nonfinite}


# ------------------------------------------------------------------------------------------- CLI


def main(argv: list[str]) -> int:
    """`rlhf train dpo --config configs/dpo/X.yaml [--output_dir DIR] [--field value ...]`."""
    from rlhf.config import parse_config

    (config,) = parse_config(DiffusionDPOConfig, argv)
    config.validate()
    with training_command(argv, config):
        prompt_function = uniform_prompt_function(load_run_prompts(config)) if config.mode == "online" else None
        reward = build_process_reward(config.reward) if config.reward else None
        policy = load_policy(config, config.seed, config.output_dir)
        trainer = DiffusionDPOTrainer(config, policy, reward_function=reward, prompt_function=prompt_function)
        trainer.write_curves = True
        if reward is not None and not config.eval_prompts and trainer.train_data is not None:
            # the command evaluates a reward on the first 8 distinct offline prompts; the Python API only on request
            config.eval_prompts = list(dict.fromkeys(trainer.train_data.prompts(64)))[:8]
        metrics = trainer.train()
    if config.push_to_hub:
        trainer.push_to_hub()
    if trainer.accelerator.is_main_process:
        for key in ("eval", "heldout"):
            before, after = metrics[f"{key}_before"], metrics[f"{key}_after"]
            if key == "eval" and before:
                print(eval_reward_change(before, after))
            elif key == "heldout" and before:
                print(f"held-out implicit accuracy {before['implicit_accuracy']:.3f} -> {after['implicit_accuracy']:.3f} "
                      f"({before['num_pairs']} pairs x {before['noise_draws']} draws)")
        print(f"outputs in {run_directory(config)}")
    return 0
