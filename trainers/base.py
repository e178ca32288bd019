"""What every diffusion trainer shares, written once: the config fields (`DiffusionTrainerConfig`) and the trainer
lifecycle (`DiffusionTrainer`); each algorithm adds its own (the policy-gradient ones through
`trainers.policy_gradient`). A trainer's command is in `trainers.command`."""

from __future__ import annotations

import copy
import os
from contextlib import AbstractContextManager, nullcontext
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from rlhf.generators.sampling import Trajectories, sample_trajectories
from trainers.common import (
    PhaseTimer,
    PolicyExport,
    build_lr_scheduler,
    build_optimizer,
    build_process_reward,
    epoch_progress,
    evaluate,
    finish_run,
    inference_dtype,
    load_weighting_state,
    policy_checkpointer,
    reward_call,
    reward_evaluations,
    start_run,
    warmup_check,
    weighting_state,
)

HELDOUT = "heldout/"  # prefix of the held-out rewards among an evaluation's per-perspective means
DEFAULT_IN_HELP = re.compile(r"\(default [^()]*(\([^()]*\))?[^()]*\)")


def redeclare(name: str, default: Any, shown: str) -> Any:
    """`DiffusionTrainerConfig`'s field `name` with another default, for a subclass whose default differs: the same
    metadata, its help's "(default ...)" now showing `shown`. A list or dict default is copied for each instance."""
    base = DiffusionTrainerConfig.__dataclass_fields__[name]
    help_text, count = DEFAULT_IN_HELP.subn(f"(default {shown})", base.metadata["help"])
    if count != 1:
        raise ValueError(f"{name}: its help must show its default once, as '(default ...)'")
    metadata = {**base.metadata, "help": help_text}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def require(checks: Sequence[tuple[bool, str, str]]) -> None:
    """Raise ValueError "<field>: expected <what>" for the first `(ok, field, what)` check that fails."""
    for ok, name, expected in checks:
        if not ok:
            raise ValueError(f"{name}: expected {expected}")


@dataclass
class DiffusionTrainerConfig:
    """The fields every diffusion trainer's config shares, with TRL 0.23.1's names and DDPO's defaults (a trainer
    whose TRL default differs re-declares the field with `redeclare`). Each field's `help` says its default."""

    # ---- run, trackers, checkpoints (TRL 0.23) ----
    exp_name: str = field(
        default=os.path.basename(sys.argv[0]).removesuffix(".py"),  # TRL cut 3 characters: "rlhf" gave "r"
        metadata={"help": "Name of this experiment (default: the script's file name without extension)."},
    )
    run_name: str = field(default="", metadata={"help": "Name of this run, for the tracker (default '')."})
    seed: int = field(default=0, metadata={"help": "Random seed; every draw of the run derives from it (default 0)."})
    log_with: Optional[str] = field(
        default=None,
        metadata={"help": "Tracker: 'wandb' or 'tensorboard' (default None: files only).", "choices": ["wandb", "tensorboard"]},
    )
    tracker_kwargs: dict = field(default_factory=dict, metadata={"help": "init_kwargs for the tracker (default {})."})
    accelerator_kwargs: dict = field(default_factory=dict, metadata={"help": "Extra Accelerator kwargs (default {})."})
    project_kwargs: dict = field(
        default_factory=dict,
        metadata={"help": "accelerate ProjectConfiguration kwargs, as TRL 0.23 passes them (default {}). TRL's "
                  "documented {project_dir: D, automatic_checkpoint_naming: true, total_limit: N}: checkpoints are "
                  "D/checkpoints/checkpoint_<n> (the n-th save), accelerate keeps the last N, and the run writes only "
                  "under D (output_dir is then unused)."},
    )
    tracker_project_name: str = field(default="trl", metadata={"help": "Tracker project name (default 'trl')."})
    logdir: str = field(
        default="logs", metadata={"help": "Tracker logging directory, relative to output_dir (default 'logs')."}
    )
    num_epochs: int = field(default=100, metadata={"help": "Number of epochs (default 100)."})
    save_freq: int = field(default=1, metadata={"help": "Checkpoint every this many epochs (default 1)."})
    num_checkpoint_limit: int = field(
        default=5,
        metadata={"help": "Checkpoints kept (accelerate deletes older ones; 0 keeps all) when checkpoints are named by "
                  "epoch; with project_kwargs' automatic_checkpoint_naming, its total_limit decides, as under TRL "
                  "(default 5)."},
    )
    mixed_precision: str = field(
        default="fp16",
        metadata={"help": "'no', 'fp16' (CUDA only) or 'bf16': dtype of the frozen weights; LoRA stays float32 (default 'fp16')."},
    )
    allow_tf32: bool = field(default=True, metadata={"help": "Allow TF32 matmuls on Ampere+ GPUs (default True)."})
    resume_from: str = field(
        default="",
        metadata={"help": "Resume from a checkpoint_<n> directory, or the latest one in a checkpoints, run or project "
                  "directory (default '')."},
    )
    # ---- sampling ----
    sample_num_steps: int = field(default=50, metadata={"help": "Denoising steps per image (default 50)."})
    sample_guidance_scale: float = field(default=5.0, metadata={"help": "Classifier-free guidance weight (default 5.0)."})
    sample_height: int = field(default=0, metadata={"help": "Image height; 0 = the model's size (default 0)."})
    sample_width: int = field(default=0, metadata={"help": "Image width; 0 = the model's size (default 0)."})
    negative_prompts: str = field(
        default="", metadata={"help": "One negative prompt used for every sample; '' = unconditional (default '')."}
    )
    # ---- optimisation ----
    train_batch_size: int = field(default=1, metadata={"help": "Samples per training minibatch, per process (default 1)."})
    train_use_8bit_adam: bool = field(
        default=False, metadata={"help": "8-bit AdamW from bitsandbytes (must be installed) (default False)."}
    )
    train_learning_rate: float = field(default=3e-4, metadata={"help": "Learning rate (default 3e-4)."})
    train_adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1 (default 0.9)."})
    train_adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2 (default 0.999)."})
    train_adam_weight_decay: float = field(default=1e-4, metadata={"help": "Adam weight decay (default 1e-4)."})
    train_adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam epsilon (default 1e-8)."})
    train_gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Minibatches accumulated per optimizer step (default 1)."}
    )
    train_max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (default 1.0)."})
    train_lr_scheduler: str = field(
        default="constant", metadata={"help": "diffusers LR schedule name, e.g. constant, cosine (default constant)."}
    )
    train_lr_warmup_steps: int = field(
        default=0, metadata={"help": "LR warmup optimizer steps; not with the 'constant' schedule, which ignores them (default 0)."}
    )
    push_to_hub: bool = field(
        default=False,
        metadata={"help": "Call push_to_hub() after training: saves the LoRA locally; the upload itself needs "
                  "network (huggingface_hub) (default False)."},
    )
    # ---- this project: outputs, prompts, reward, evaluation ----
    output_dir: str = field(
        default="runs",
        metadata={"help": "Run directory (default 'runs'); with project_kwargs' automatic_checkpoint_naming the run is "
                  "written under its project_dir instead."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "CLI: replace an earlier run in output_dir (its outputs are deleted); without it, or "
                  "resume_from, a directory holding a run is refused (default False)."},
    )
    prompts: list[str] = field(
        default_factory=list, metadata={"help": "CLI: training prompts, drawn uniformly (default: toy prompts)."}
    )
    prompts_file: str = field(
        default="", metadata={"help": "CLI: a text file of training prompts, one per line (default '')."}
    )
    reward: dict = field(
        default_factory=lambda: {"builtin": "toy_colour"},
        metadata={"help": "CLI: the reward block for rlhf.rewards.reward_fn.build_reward (default {builtin: toy_colour})."},
    )
    eval_prompts: list[str] = field(
        default_factory=list,
        metadata={"help": "Evaluation prompts, sampled with every eval seed before and after training (default: none, "
                  "no evaluation; the CLI uses the first 8 training prompts when given prompts that are not toy "
                  "prompts)."},
    )
    eval_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3], metadata={"help": "Evaluation seeds (default 0 1 2 3)."}
    )
    heldout_rewards: dict = field(
        default_factory=dict,
        metadata={"help": "Rewards scored at every evaluation but never optimised, {name: reward block} (e.g. the toy "
                  "oracles, {alignment: {builtin: toy_alignment}}); an evaluation reports each as its "
                  "per_perspective 'heldout/<name>' (default {})."},
    )
    num_grid_images: int = field(default=16, metadata={"help": "Images per epoch sample grid (default 16)."})

    def to_dict(self) -> dict[str, Any]:
        """Flat `{name: scalar}` for trackers (TRL's shape): nested keys joined with '/', lists as strings."""
        flat: dict[str, Any] = {}

        def add(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    add(f"{prefix}/{key}", item)
            else:
                flat[prefix] = str(value) if isinstance(value, (list, tuple)) else value

        for name, value in asdict(self).items():
            add(name, value)
        return flat

    def validate(self) -> None:
        """Raise ValueError naming the first shared field that does not fit; a subclass checks its own fields after
        calling this."""
        require([
            (self.num_epochs >= 0, "num_epochs", "a value >= 0"),
            (self.save_freq >= 1, "save_freq", "a value >= 1"),
            (self.num_checkpoint_limit >= 0, "num_checkpoint_limit", "a value >= 0 (0 keeps all)"),
            (isinstance(self.project_kwargs, dict), "project_kwargs", "a mapping of accelerate ProjectConfiguration fields"),
            (self.sample_num_steps >= 1, "sample_num_steps", "a value >= 1"),
            (self.sample_height >= 0 and self.sample_width >= 0, "sample_height/sample_width", "values >= 0"),
            (self.train_batch_size >= 1, "train_batch_size", "a value >= 1"),
            (self.train_gradient_accumulation_steps >= 1, "train_gradient_accumulation_steps", "a value >= 1"),
            (self.num_grid_images >= 0, "num_grid_images", "a value >= 0"),
            (not self.eval_prompts or len(self.eval_seeds) >= 1, "eval_seeds", "at least one seed with eval_prompts"),
            (isinstance(self.heldout_rewards, dict) and all(isinstance(spec, dict) for spec in self.heldout_rewards.values()),
             "heldout_rewards", "a mapping {name: reward block}"),
            warmup_check(self),
        ])
        inference_dtype(self.mixed_precision)
        if self.train_use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError as error:
                raise ValueError("train_use_8bit_adam: needs bitsandbytes installed (pip install bitsandbytes)") from error


@dataclass
class DDIMTrainerConfig(DiffusionTrainerConfig):
    """The shared fields of the trainers with TRL 0.23 counterparts (DDPO, AlignProp, Diffusion-DPO), plus TRL's
    `sample_eta`: DDIM's eta, which a flow family reads as its SDE's noise level (`DiffusionTrainer.noise_level`).
    GRPO names the same knob `noise_level`, as Flow-GRPO does."""

    sample_eta: float = field(
        default=1.0,
        metadata={"help": "DDIM eta (a flow family: its SDE's noise level), >= 0; 0 = the deterministic sampler "
                  "(default 1.0)."},
    )

    def validate(self) -> None:
        super().validate()
        require([(self.sample_eta >= 0, "sample_eta", "a value >= 0")])


class DiffusionTrainer(PolicyExport):
    """The lifecycle every diffusion trainer shares, written once; a subclass supplies its algorithm.

    The generator (`sd_pipeline`, TRL's name) is any `GeneratorAdapter`: the lifecycle only calls that interface
    (`denoiser`, `trainable_parameters`, `sample_trajectories` over `encode_prompt`/`predict`/`step`/`decode`).

    Set-up (TRL 0.23's constructor): `start` (config, generator, reward and prompt functions, accelerator and run
    outputs, image size), then the subclass's `setup`, then `prepare` (optimizer, LR schedule, the accelerator-prepared
    denoiser, checkpointer, resume); a trainer with another constructor (Diffusion-DPO) calls these three itself.
    `train()` evaluates (`evaluations("before")`, unless a resumed checkpoint holds it), runs `step(epoch,
    global_step)` over the epochs, evaluates again and finishes the run (metrics.json, curves, the policy, exported
    with `evaluation_weights`).

    A subclass implements `step` (ending with `end_epoch`) and `optimizer_steps`, and may extend `check_inputs`,
    `backward_calls_per_step`, `setup`, `checkpoint_state` / `load_checkpoint_state`
    and `save_checkpoint_files` (what its checkpoint holds beyond the shared state), `extra_metrics`, `evaluations`,
    `evaluation_weights`, `sample_images`, `noise_level` and the class attributes `progress_name`, `progress_columns`
    and `curves`.
    """

    progress_name = "epochs"  # the epoch bar's description
    progress_columns: tuple[str, ...] = ("reward_mean",)  # history columns the epoch bar shows
    curves: tuple[str, ...] = ("reward_mean", "loss")  # history columns drawn in training_curves.png

    def __init__(
        self,
        config: DiffusionTrainerConfig,
        reward_function: Callable[..., Any],
        prompt_function: Callable[[], Any],
        sd_pipeline: Any,
        image_samples_hook: Callable[[Any, int, Any], Any] | None = None,
        *,
        heldout_rewards: dict[str, Callable[..., Any]] | None = None,
    ) -> None:
        """TRL 0.23's constructor: `config.validate()`, `check_inputs`, `start`, `setup`, `prepare`.
        `heldout_rewards` (`{name: reward function}`) replace the ones `config.heldout_rewards` would build."""
        config.validate()
        self.check_inputs(config, reward_function, prompt_function, sd_pipeline)
        self.image_samples_hook = image_samples_hook
        self.start(config, sd_pipeline, reward_function, prompt_function, heldout_rewards)
        self.setup()
        self.prepare()

    def start(
        self,
        config: DiffusionTrainerConfig,
        sd_pipeline: Any,
        reward_function: Callable[..., Any] | None,
        prompt_function: Callable[[], Any] | None,
        heldout_rewards: dict[str, Callable[..., Any]] | None = None,
    ) -> None:
        """Keep the run's inputs (the held-out rewards built from `config.heldout_rewards` unless given); build the
        accelerator (counting `backward_calls_per_step()`) and the run outputs; move the generator to the device; set
        the image size."""
        self.config, self.sd_pipeline = config, sd_pipeline
        self.reward_fn, self.prompt_fn = reward_function, prompt_function
        self.heldout_rewards = build_heldout_rewards(config.heldout_rewards) if heldout_rewards is None else heldout_rewards
        self.accelerator, self.outputs = start_run(config, sd_pipeline, self.backward_calls_per_step())
        self.height = config.sample_height or sd_pipeline.default_size
        self.width = config.sample_width or sd_pipeline.default_size
        self.first_epoch, self.global_step, self.num_nonfinite = 0, 0, 0
        self.before: dict[str, Any] | None = None  # evaluations("before"), once taken (kept in checkpoints)
        self.last_row: dict[str, Any] = {}

    def prepare(self) -> None:
        """AdamW and the LR schedule over `optimizer_steps()` for the generator's trainable parameters, prepared with
        its denoiser by accelerate (`self.denoiser`: the module to call in training, a DDP wrapper across processes);
        the checkpointer; then the state of `config.resume_from`, if given."""
        self.trainable = self.sd_pipeline.trainable_parameters()
        optimizer = build_optimizer(self.config, self.trainable)
        lr_scheduler = build_lr_scheduler(self.config, optimizer, self.optimizer_steps(), self.accelerator.num_processes)
        self.denoiser, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.sd_pipeline.denoiser, optimizer, lr_scheduler
        )
        self.checkpointer = policy_checkpointer(self.accelerator, self.config, self.sd_pipeline)
        # a resumed run rewrites what followed its checkpoint; a new one starts its own history
        resumed_epoch = -1
        if self.config.resume_from:
            state = self.checkpointer.load(self.config.resume_from)
            resumed_epoch = state["epoch"]
            self.first_epoch, self.global_step = resumed_epoch + 1, state["global_step"]
            self.num_nonfinite, self.before = state["num_nonfinite_rewards"], state.get("before")
            load_weighting_state(self.reward_fn, state.get("weighting"))
            self.load_checkpoint_state(state)
        self.outputs.keep_history_until(resumed_epoch)

    # ---- what a subclass may extend ----------------------------------------------------------------------------

    def check_inputs(
        self, config: Any, reward_function: Callable[..., Any], prompt_function: Callable[[], Any], sd_pipeline: Any
    ) -> None:
        """Refuse inputs the algorithm cannot train with, before anything is written (ValueError naming the field)."""

    def backward_calls_per_step(self) -> int:
        """Backward calls per optimizer step, as accelerate's gradient accumulation counts them (1: the trainer
        accumulates by itself)."""
        return 1

    def setup(self) -> None:
        """The algorithm's own set-up, between `start` and `prepare`."""

    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run, for the LR schedule."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, Any]:
        """The trainer state a checkpoint holds besides the policy, optimizer and RNGs (JSON-serialisable)."""
        return {
            "global_step": self.global_step,
            "num_nonfinite_rewards": self.num_nonfinite,
            "before": self.before,
            "weighting": weighting_state(self.reward_fn),
        }

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore the algorithm's own part of `checkpoint_state` (the shared part is restored by `prepare`)."""

    def save_checkpoint_files(self, directory: Path) -> None:
        """Write the algorithm's own files into a checkpoint `directory` just saved (every process calls this)."""

    def evaluation_weights(self) -> AbstractContextManager:
        """A context within which the policy holds the weights evaluations use and `train()` exports (e.g. an EMA
        of the trained ones); by default the trained weights themselves."""
        return nullcontext()

    def extra_metrics(self) -> dict[str, Any]:
        """The algorithm's entries in metrics.json besides the evaluations, epochs and global step."""
        return {}

    def evaluations(self, stage: str) -> dict[str, Any]:
        """The evaluations taken before and after training, by name; metrics.json holds each as `<name>_<stage>`."""
        return {"eval": self.evaluate(stage)}

    def evaluation_points(self, metrics: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
        """The evaluations drawn on the training curves, by history column."""
        return reward_evaluations(metrics)

    def sample_images(self, prompts: list[str], generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """Evaluation images of `prompts`, float BCHW in [0, 1], from the current policy."""
        return self.sample(prompts, generator).images

    @property
    def noise_level(self) -> float:
        """The stochasticity `sample` draws with by default: DDIM's eta (`sample_eta`) for SD, the SDE's noise level
        for a flow family; 0 is the family's deterministic sampler."""
        return self.config.sample_eta

    def evaluation_batch_size(self) -> int:
        """Images per evaluation sampling call."""
        return self.config.sample_batch_size

    def release(self) -> None:
        """Free what the run holds besides the accelerator (called once training and evaluation are done)."""

    # ---- the lifecycle -----------------------------------------------------------------------------------------

    def sample(
        self,
        prompts: list[str],
        generator: torch.Generator | list[torch.Generator],
        *,
        num_steps: int | None = None,
        noise_level: float | None = None,
        stochastic: torch.Tensor | None = None,
        initial_latents: torch.Tensor | None = None,
    ) -> Trajectories:
        """Trajectories of `prompts` through the one sampling loop (`sample_trajectories`) with the configured size,
        guidance and negative prompt; `num_steps` (default `sample_num_steps`) and `noise_level` (default
        `self.noise_level`) for every step, or only for the `stochastic` ones (the rest deterministic)."""
        negatives = [self.config.negative_prompts] * len(prompts) if self.config.negative_prompts else None
        return sample_trajectories(
            self.sd_pipeline,
            prompts,
            num_steps=num_steps or self.config.sample_num_steps,
            guidance_scale=self.config.sample_guidance_scale,
            noise_level=self.noise_level if noise_level is None else noise_level,
            height=self.height,
            width=self.width,
            generator=generator,
            stochastic=stochastic,
            negative_prompts=negatives,
            initial_latents=initial_latents,
        )

    def end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Record an epoch's `row` (history, tracker) and checkpoint every `save_freq` epochs and after the last."""
        self.outputs.append_history(row)
        if self.config.log_with:
            self.accelerator.log(row, step=epoch)
        if (epoch + 1) % self.config.save_freq == 0 or epoch == self.config.num_epochs - 1:
            self.save_checkpoint_files(self.checkpointer.save(epoch, self.checkpoint_state()))
        self.last_row = row

    def evaluate(self, stage: str | None = None) -> dict[str, Any] | None:
        """Mean reward (and each held-out reward, as `per_perspective["heldout/<name>"]`) on the fixed evaluation
        prompts and seeds (see `trainers.common.evaluate`), with `evaluation_weights`; None without a reward function
        or `eval_prompts` (TRL never evaluated: a run samples only what the user asked for)."""
        prompts = self.eval_prompts()
        if self.reward_fn is None or not prompts:
            return None
        self.sd_pipeline.denoiser.eval()
        with self.evaluation_weights():
            metrics, samples = evaluate(
                self.sample_images,
                self.evaluation_reward,
                prompts,
                self.config.eval_seeds,
                batch_size=self.evaluation_batch_size(),
                accelerator=self.accelerator,
                description=f"evaluating ({stage or 'policy'})",
            )
        if stage:
            self.outputs.save_evaluation(stage, samples)
        return metrics

    def evaluation_reward(self, images: torch.Tensor, prompts: list[str], metadata: list[Any]) -> tuple[torch.Tensor, dict]:
        """The reward and its info, the held-out rewards added to `info["raw"]` as `heldout/<name>`."""
        rewards, info = reward_call(self.reward_fn, images, prompts, metadata)
        raw = dict(info.get("raw") or {})
        for name, reward in self.heldout_rewards.items():
            raw[HELDOUT + name] = reward_call(reward, images, prompts, metadata)[0]
        return rewards, {**info, "raw": raw}

    def eval_prompts(self) -> list[str]:
        """The config's evaluation prompts (empty: no evaluation)."""
        return list(self.config.eval_prompts)

    def train(self, epochs: int | None = None) -> dict[str, Any]:
        """Evaluate (when asked: `eval_prompts`, or the algorithm's own evaluations), train from `first_epoch` to
        `epochs` (default `num_epochs`), evaluate again; write `metrics.json` (the evaluations as `<name>_before` /
        `<name>_after`; `eval_seconds` apart from `train_seconds` in timings.json), the curves and the final policy
        (`lora` in the run directory). Returns the metrics."""
        end = self.config.num_epochs if epochs is None else epochs
        timer = PhaseTimer()
        with timer("eval"):
            if self.before is None:
                self.before = self.evaluations("before")
        progress = epoch_progress(self.first_epoch, end, self.progress_name, self.accelerator.is_local_main_process)
        with timer("train"):
            for epoch in progress:
                self.step(epoch, self.global_step)
                progress.set_postfix({key: f"{self.last_row.get(key, float('nan')):.4f}" for key in self.progress_columns})
        with timer("eval"):
            after = self.evaluations("after")
        metrics: dict[str, Any] = {}
        for name in self.before:
            metrics[f"{name}_before"], metrics[f"{name}_after"] = self.before[name], after[name]
        metrics.update({"epochs": end, "global_step": self.global_step, **self.extra_metrics(), **timer.metrics()})
        self.release()
        with self.evaluation_weights():
            finish_run(self, metrics, self.curves, self.evaluation_points(metrics), plot=self.write_curves)
        return metrics

    def step(self, epoch: int, global_step: int) -> int:
        """One epoch of the algorithm, ending with `end_epoch`. Returns the global step (TRL 0.23's signature)."""
        raise NotImplementedError


def build_heldout_rewards(specs: dict[str, dict[str, Any]]) -> dict[str, Callable[..., Any]]:
    """`{name: reward function}` from `heldout_rewards`' `{name: reward block}`; an error names the bad entry."""
    rewards = {}
    for name, spec in specs.items():
        try:
            rewards[name] = build_process_reward(spec)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"heldout_rewards.{name}: {error}") from error
    return rewards
