"""Loop plumbing the diffusion trainers share: accelerator, seeding, checkpoints and exact resume, run outputs,
evaluation before/after training, sample grids."""

from __future__ import annotations

import json
import math
import random
import re
import resource
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import ProjectConfiguration, gather_object
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rlhf.config import save_config
from rlhf.runs import claim_output_dir, resumable

CHECKPOINT_PREFIX = "checkpoint_"
TRAINER_STATE_FILE = "trainer_state.json"
HISTORY_FILE = "history.jsonl"
METRICS_FILE = "metrics.json"
TIMINGS_FILE = "timings.json"
POLICY_WEIGHTS_FILE = "policy.safetensors"
LORA_SUBDIR = "lora"

# ------------------------------------------------------------------------------------------- seeds


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on `seed` and `keys` (e.g. epoch, process, purpose).

    Seeding each epoch's draws from (seed, epoch, ...) instead of carrying RNG state forward makes a resumed
    run draw exactly what the uninterrupted run drew, with nothing to restore.
    """
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, np.uint64)[0]) >> 1


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded with `derive_seed(seed, *keys)`."""
    return torch.Generator("cpu").manual_seed(derive_seed(seed, *keys))


def reseed_global_rngs(seed: int, *keys: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs from (seed, keys), for user callbacks that use them
    (a TRL-style `prompt_function` calling `random.choice`)."""
    value = derive_seed(seed, *keys)
    random.seed(value)
    np.random.seed(value % (1 << 32))
    torch.manual_seed(value)


# ------------------------------------------------------------------------------------------- accelerator


def inference_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights take under `mixed_precision` ("no", "fp16", "bf16")."""
    dtypes = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if mixed_precision not in dtypes:
        raise ValueError(f"mixed_precision: expected one of {list(dtypes)}, got {mixed_precision!r}")
    return dtypes[mixed_precision]


def build_accelerator(
    output_dir: str | Path,
    *,
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    log_with: str | None = None,
    logdir: str = "logs",
    project_kwargs: dict | None = None,
    accelerator_kwargs: dict | None = None,
) -> Accelerator:
    """An `Accelerator` whose project (checkpoints, tracker logs) lives under `output_dir` unless `project_kwargs`
    names another `project_dir` (TRL 0.23's `ProjectConfiguration(**project_kwargs)`); refuses fp16 without CUDA.

    `project_kwargs` reach accelerate unchanged: with TRL's documented `automatic_checkpoint_naming` accelerate
    names (`checkpoint_<n>`, the n-th save) and rotates (`total_limit`) the checkpoints; without it a `Checkpointer`
    names them by epoch under `output_dir/checkpoints`, still saved and rotated by accelerate."""
    inference_dtype(mixed_precision)
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision: 'fp16' needs a CUDA GPU; use 'no' (or 'bf16') on a CPU")
    # a TRL config without project_dir would fail at its first automatically named save (accelerate joins None)
    project = {"project_dir": str(output_dir), "logging_dir": str(Path(output_dir) / logdir), **(project_kwargs or {})}
    project["project_dir"] = project["project_dir"] or str(output_dir)
    try:
        configuration = ProjectConfiguration(**project)
    except TypeError as error:
        raise ValueError(f"project_kwargs: expected accelerate ProjectConfiguration fields ({error})") from error
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_config=configuration,
        **(accelerator_kwargs or {}),
    )


def accelerate_names_checkpoints(config: Any) -> bool:
    """Whether a trainer config asks accelerate to name its checkpoints (TRL 0.23's documented
    `project_kwargs={"project_dir": D, "automatic_checkpoint_naming": True, "total_limit": N}`): then, as under
    TRL, checkpoints are `D/checkpoints/checkpoint_<n>` (the n-th save), `total_limit` rotates them, and the run
    writes nothing outside `D`."""
    return bool((getattr(config, "project_kwargs", None) or {}).get("automatic_checkpoint_naming"))


def run_directory(config: Any) -> Path:
    """Where a trainer writes its run (history, metrics, grids, checkpoints, final policy): `project_kwargs`'
    `project_dir` when accelerate names the checkpoints (a ported TRL script writes nothing outside it; TRL's configs
    have no `output_dir`), else `output_dir`."""
    if accelerate_names_checkpoints(config):
        return Path(config.project_kwargs.get("project_dir") or config.output_dir)
    return Path(config.output_dir)


def start_run(config: Any, sd_pipeline: Any, gradient_accumulation_steps: int = 1) -> tuple[Accelerator, "RunOutputs"]:
    """What every diffusion trainer does first, from its TRL-style config: the accelerator, the run's outputs (with
    the config saved), TF32, trackers, and the pipeline moved to the device in the frozen weights' dtype."""
    accelerator = build_accelerator(
        run_directory(config),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=config.log_with,
        logdir=config.logdir,
        project_kwargs=config.project_kwargs,
        accelerator_kwargs=config.accelerator_kwargs,
    )
    outputs = RunOutputs(run_directory(config), accelerator.is_main_process)
    outputs.save_config(config)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process and config.log_with:
        accelerator.init_trackers(config.tracker_project_name, config=config.to_dict(), init_kwargs=config.tracker_kwargs)
    sd_pipeline.to(accelerator.device, inference_dtype(config.mixed_precision))
    sd_pipeline.set_progress_bar_config(disable=True)
    return accelerator, outputs


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on a GPU, the process's max resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / 2**20 if sys.platform == "darwin" else kilobytes / 2**10


# ------------------------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """Checkpoints through `accelerator.save_state` with accelerate's automatic naming and rotation (optimizer, LR
    schedule, gradient-accumulation step, RNG states), the trainable weights written by `save_weights(dir)` instead
    of the full model (a LoRA, not the 3 GB UNet), and a JSON `state` of the loop (`trainer_state.json`), all inside
    the directory accelerate creates.

    Two layouts, both named and rotated by accelerate:
    - by epoch (this project's): `output_dir/checkpoints/checkpoint_<epoch>` (the save iteration is set to the
      epoch), keeping `limit` of them;
    - by save count (`by_epoch=False`, TRL 0.23 with `automatic_checkpoint_naming`): `project_dir/checkpoints/
      checkpoint_<n>` for the n-th save, `total_limit` of `project_kwargs` keeping them; a resumed run goes on
      counting after the highest checkpoint there.

    Args:
        accelerator: the run's accelerator, after `prepare`.
        output_dir: the run directory (by epoch); with `by_epoch=False` the accelerator's `project_dir` is used.
        limit: how many checkpoints to keep by epoch (accelerate deletes the oldest); 0 or less keeps all.
        save_weights, load_weights: write / read the trainable weights in a checkpoint directory; the model
            registered with `accelerator.prepare` is then left out of accelerate's own files.
        by_epoch: name by epoch under `output_dir` (default) or leave accelerate's project configuration as given.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        output_dir: str | Path,
        limit: int,
        save_weights: Callable[[Path], None],
        load_weights: Callable[[Path], None],
        *,
        by_epoch: bool = True,
    ) -> None:
        self.accelerator = accelerator
        self.by_epoch = by_epoch
        project = accelerator.project_configuration
        if by_epoch:
            project.project_dir = str(output_dir)
            project.automatic_checkpoint_naming = True
            project.total_limit = limit if limit > 0 else None
        elif not (project.automatic_checkpoint_naming and project.project_dir):
            raise ValueError("project_kwargs: by save count, checkpoints need automatic_checkpoint_naming and a "
                             "project_dir")
        self.root = Path(project.project_dir) / "checkpoints"

        def save_hook(models: list, weights: list, directory: str) -> None:
            if accelerator.is_main_process:
                save_weights(Path(directory))
            weights.clear()

        def load_hook(models: list, directory: str) -> None:
            load_weights(Path(directory))
            models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def save(self, epoch: int, state: dict[str, Any]) -> Path:
        """Save after `epoch` (every process must call this); returns the checkpoint directory."""
        accelerator = self.accelerator
        if self.by_epoch:
            accelerator.project_configuration.iteration = epoch
        directory = self.root / f"{CHECKPOINT_PREFIX}{accelerator.save_iteration}"
        if self.by_epoch and accelerator.is_main_process and directory.exists():
            shutil.rmtree(directory)  # left by the continuation a resumed run abandoned; accelerate refuses to reuse it
        accelerator.wait_for_everyone()
        accelerator.save_state()
        if accelerator.is_main_process:
            (directory / TRAINER_STATE_FILE).write_text(json.dumps({"epoch": epoch, **state}))
        accelerator.wait_for_everyone()
        return directory

    def load(self, resume_from: str | Path) -> dict[str, Any]:
        """Restore a checkpoint (or the latest one under a run, project or checkpoints directory); returns its
        state. By save count, the next save is numbered after every checkpoint there (accelerate refuses to
        overwrite one)."""
        directory = self.resolve(resume_from)
        self.accelerator.load_state(str(directory))
        if not self.by_epoch:
            numbers = [checkpoint_number(path) for path in [directory, *self.sorted_checkpoints(self.root)]]
            self.accelerator.project_configuration.iteration = max(numbers) + 1
        return json.loads((directory / TRAINER_STATE_FILE).read_text())

    @staticmethod
    def sorted_checkpoints(root: Path) -> list[Path]:
        found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
        return sorted(found, key=checkpoint_number)

    @classmethod
    def resolve(cls, resume_from: str | Path) -> Path:
        """A checkpoint directory itself, or the highest-numbered `checkpoint_<n>` in `resume_from` (TRL 0.23's
        reading of a `checkpoints` folder) or in its `checkpoints` subfolder (a run or project directory)."""
        path = Path(resume_from).expanduser()
        if (path / TRAINER_STATE_FILE).is_file():
            return path
        for root in (path, path / "checkpoints"):
            found = cls.sorted_checkpoints(root) if root.is_dir() else []
            if found:
                return found[-1]
        raise FileNotFoundError(f"resume_from: no {CHECKPOINT_PREFIX}<n> checkpoint with {TRAINER_STATE_FILE} found "
                                f"in {path}")


def checkpoint_number(path: Path) -> int:
    """The n of a `checkpoint_<n>` directory."""
    return int(path.name[len(CHECKPOINT_PREFIX):])


# ------------------------------------------------------------------------------------------- run outputs


def policy_checkpointer(accelerator: Accelerator, config: Any, sd_pipeline: Any) -> Checkpointer:
    """A `Checkpointer` whose weights are the pipeline's trainable policy (its LoRA, or the whole UNet without one),
    in one safetensors file: by epoch under `config.output_dir` keeping `config.num_checkpoint_limit`, or, with
    TRL's `project_kwargs` (`accelerate_names_checkpoints`), as accelerate names and rotates them."""

    def save(directory: Path) -> None:
        save_file(sd_pipeline.policy_state_dict(), directory / POLICY_WEIGHTS_FILE)

    def load(directory: Path) -> None:
        sd_pipeline.load_policy_state_dict(load_file(directory / POLICY_WEIGHTS_FILE, device=str(accelerator.device)))

    return Checkpointer(accelerator, config.output_dir, config.num_checkpoint_limit, save, load,
                        by_epoch=not accelerate_names_checkpoints(config))


def build_optimizer(config: Any, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW (8-bit from bitsandbytes with `train_use_8bit_adam`) from TRL's `train_*` optimizer fields."""
    if config.train_use_8bit_adam:
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        parameters,
        lr=config.train_learning_rate,
        betas=(config.train_adam_beta1, config.train_adam_beta2),
        weight_decay=config.train_adam_weight_decay,
        eps=config.train_adam_epsilon,
    )


def warmup_check(config: Any) -> tuple[bool, str, str]:
    """A trainer config's `(ok, field, expected)` check of its LR warmup, for its `validate()`."""
    # diffusers' "constant" schedule drops num_warmup_steps without a word: such a run would train without warmup
    warmup = config.train_lr_warmup_steps
    ok = warmup >= 0 and not (warmup and config.train_lr_scheduler == "constant")
    return ok, "train_lr_warmup_steps", (f"a value >= 0, and 0 with train_lr_scheduler 'constant' (which ignores "
                                         f"warmup; use 'constant_with_warmup'); got {warmup} with "
                                         f"{config.train_lr_scheduler!r}")


def build_lr_scheduler(config: Any, optimizer: torch.optim.Optimizer, optimizer_steps: int, processes: int) -> Any:
    """diffusers' `train_lr_scheduler` over `optimizer_steps`, with `train_lr_warmup_steps` of warmup."""
    # accelerate steps a prepared scheduler once per process per call (its data-parallel convention)
    return get_scheduler(
        config.train_lr_scheduler,
        optimizer,
        num_warmup_steps=config.train_lr_warmup_steps * processes,
        num_training_steps=max(optimizer_steps, 1) * processes,
    )


def build_process_reward(spec: dict[str, Any], **defaults: Any) -> Any:
    """`rlhf.rewards.reward_fn.build_reward` for this process: `defaults` fill the keys `spec` leaves out, and a reward
    model scores on this process's accelerator unless `spec` names a device."""
    from rlhf.rewards.reward_fn import build_reward

    spec = {**defaults, **spec}
    if "model" in spec and "device" not in spec:
        spec["device"] = str(PartialState().device)
    return build_reward(spec)


def eval_reward_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    """One line for the CLI: the evaluation reward before and after training, each held-out reward's (the
    per-perspective means named `heldout/<name>`), and "WENT DOWN" on any that fell (a trained policy that got worse
    must not read like a result)."""

    def change(name: str, b: float, a: float) -> str:
        return f"{name} {b:.4f} -> {a:.4f}" + (" (WENT DOWN)" if a < b else "")

    parts = [change("eval reward", before["reward_mean"], after["reward_mean"]) +
             f" (std over seeds {before['reward_std']:.4f} / {after['reward_std']:.4f})"]
    heldout_before, heldout_after = before.get("per_perspective") or {}, after.get("per_perspective") or {}
    parts += [change(name.replace("/", " "), value, heldout_after[name]) for name, value in heldout_before.items()
              if name.startswith("heldout/") and name in heldout_after]
    return "; ".join(parts)


def finish_run(trainer: Any, metrics: dict[str, Any], curves: Sequence[str],
               evaluations: dict[str, list[tuple[float, float]]] | None = None, *, plot: bool = True) -> None:
    """The end of every diffusion trainer's `train()`: metrics.json and (with `plot`) training_curves.png of
    `curves` (with the `evaluations` points), then the final policy in the run directory's `lora`, then the trackers
    closed.

    The wall times of `PhaseTimer` (`eval_seconds`, `train_seconds`) go to timings.json, not metrics.json: the
    metrics of a resumed run equal the uninterrupted run's, its times cannot."""
    timing_keys = [key for key in metrics if key in PhaseTimer.KEYS]
    trainer.outputs.write_metrics({key: value for key, value in metrics.items() if key not in timing_keys})
    trainer.outputs.write_metrics({key: metrics[key] for key in timing_keys}, TIMINGS_FILE)
    if plot:
        trainer.outputs.plot_history(list(curves), evaluations=evaluations)
    trainer.accelerator.wait_for_everyone()
    trainer.save_pretrained(run_directory(trainer.config) / LORA_SUBDIR)
    trainer.accelerator.end_training()


class PolicyExport:
    """TRL 0.23's trainer methods that export the trained policy (the pipeline's LoRA in diffusers' format, or the
    whole UNet without one), for a diffusion trainer with `sd_pipeline`, `accelerator` and `config.output_dir`.

    `write_curves`: whether `train()` ends by drawing training_curves.png. The commands (`rlhf train ...`, the demo)
    turn it on; a Python API run leaves it off, as TRL drew none: matplotlib's import and drawing cost seconds,
    more than a small run's epochs (history.jsonl holds every number; `outputs.plot_history` draws them on demand)."""

    sd_pipeline: Any
    accelerator: Accelerator
    config: Any
    write_curves: bool = False

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write the policy into `save_directory` (main process only)."""
        self.sd_pipeline.save_pretrained(save_directory, self.accelerator.is_main_process)

    def save_model(self, output_dir: str | Path | None = None) -> None:
        """`save_pretrained` into `output_dir` (default: the run directory), the call TRL's example scripts end with."""
        self.save_pretrained(output_dir or run_directory(self.config))

    def push_to_hub(self, repo_id: str | None = None, **kwargs: Any) -> Path:
        """Save the policy into the run directory's `lora` and say how to upload it: this project runs offline, so the upload
        to the Hugging Face Hub (which needs network) is left to `hf upload`. `kwargs` (TRL's `dataset_name`,
        `commit_message`, ...) are accepted and unused. Returns the saved directory."""
        directory = run_directory(self.config) / LORA_SUBDIR
        self.save_pretrained(directory)
        if self.accelerator.is_main_process:
            print(f"push_to_hub: saved the policy in {directory}; uploading it needs network: "
                  f"hf upload {repo_id or 'USER/REPO'} {directory}")
        return directory


@contextmanager
def training_command(argv: Sequence[str], config: Any) -> Iterator[None]:
    """The frame of a diffusion trainer's command: its run directory (`run_directory`) must not hold another run
    (unless `resume_from` or `overwrite_output_dir`), and a Ctrl-C ends with the command that resumes from the last
    checkpoint."""
    directory = run_directory(config)
    with PartialState().main_process_first():
        claim_output_dir(directory, resuming=bool(config.resume_from), overwrite=config.overwrite_output_dir,
                         resume_flag="--resume_from")
    root = directory / "checkpoints"
    with resumable(argv, ["--resume_from", str(directory)], lambda: bool(Checkpointer.sorted_checkpoints(root))):
        yield


class PhaseTimer:
    """Wall seconds a `train()` spends per phase, so that evaluation (sampling the evaluation prompts before and
    after) is reported apart from training: `with timer("eval"): ...`, then `timer.metrics()` gives
    `{"eval_seconds", "train_seconds"}`."""

    KEYS = ("eval_seconds", "train_seconds")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {"eval": 0.0, "train": 0.0}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - began

    def metrics(self) -> dict[str, float]:
        return {f"{phase}_seconds": round(self.seconds[phase], 3) for phase in ("eval", "train")}


def epoch_progress(first_epoch: int, end: int, description: str, enabled: bool) -> Any:
    """A tqdm bar over epochs `first_epoch..end-1` that counts from `first_epoch` (a resumed run shows 2/5, not 0/3)."""
    return tqdm(range(first_epoch, end), desc=description, initial=first_epoch, total=end, disable=not enabled)


def reward_evaluations(metrics: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """The evaluation points of the "reward_mean" curve: before training at epoch -1, after at the last epoch."""
    before, after = metrics.get("eval_before"), metrics.get("eval_after")
    if not before or not after:
        return {}
    return {"reward_mean": [(-1, before["reward_mean"]), (metrics["epochs"] - 1, after["reward_mean"])]}


def draw_prompts(prompt_fn: Callable[[], Any], groups: int, group_size: int = 1) -> tuple[list[str], list[Any]]:
    """`groups` draws of a TRL-style `prompt_fn() -> (prompt, metadata)` (or just a prompt), each repeated
    `group_size` times in a row."""
    prompts, metadata = [], []
    for _ in range(groups):
        drawn = prompt_fn()
        prompt, meta = drawn if isinstance(drawn, tuple) else (drawn, {})
        prompts += [prompt] * group_size
        metadata += [meta] * group_size
    return prompts, metadata


class RunOutputs:
    """The files every run writes into its output directory (main process only): the resolved config,
    `history.jsonl` (one row per epoch), `metrics.json`, PNG plots and sample grids."""

    def __init__(self, output_dir: str | Path, is_main_process: bool = True) -> None:
        self.dir = Path(output_dir)
        self.is_main = is_main_process
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)

    def save_config(self, config: Any | Sequence[Any], name: str = "config.yaml") -> None:
        if self.is_main:
            save_config(config, self.dir / name)

    def history(self) -> list[dict[str, Any]]:
        path = self.dir / HISTORY_FILE
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []

    def keep_history_until(self, epoch: int) -> None:
        """Drop rows after `epoch` (a resumed run rewrites what followed its checkpoint)."""
        if self.is_main:
            rows = [row for row in self.history() if row.get("epoch", -1) <= epoch]
            (self.dir / HISTORY_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))

    def append_history(self, row: dict[str, Any]) -> None:
        if self.is_main:
            with (self.dir / HISTORY_FILE).open("a") as handle:
                handle.write(json.dumps(row) + "\n")

    def write_metrics(self, metrics: dict[str, Any], filename: str = METRICS_FILE) -> None:
        if self.is_main:
            (self.dir / filename).write_text(json.dumps(metrics, indent=2))

    def plot_history(self, keys: Sequence[str], filename: str = "training_curves.png",
                     evaluations: dict[str, list[tuple[float, float]]] | None = None) -> None:
        """One panel per key of `history.jsonl` against epoch: the per-epoch values, their moving average, and the
        `evaluations[key]` points (epoch, value) of the fixed-prompt evaluations."""
        rows = self.history()
        keys = [k for k in keys if any(k in row for row in rows)]
        if not self.is_main or not keys:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for axis, key in zip(axes[0], keys):
            epochs, values = zip(*[(row["epoch"], row[key]) for row in rows if key in row])
            axis.plot(epochs, values, marker=".", alpha=0.35, label="per epoch")
            window = max(2, len(values) // 8)
            axis.plot(epochs, moving_average(values, window), linewidth=2, label=f"moving average ({window})")
            if evaluations and key in evaluations:
                axis.plot(*zip(*evaluations[key]), "s", color="black", label="evaluation (fixed prompts, seeds)")
            axis.set_xlabel("epoch")
            axis.set_title(key)
            axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(self.dir / filename)
        plt.close(figure)

    def save_grid(self, images: torch.Tensor, filename: str, columns: int | None = None) -> None:
        if self.is_main:
            save_image_grid(images, self.dir / filename, columns)

    def save_evaluation(self, stage: str, samples: "EvaluationSamples") -> None:
        """`eval_<stage>.png` (a few prompts x every seed, labelled), the samples themselves (so a resumed run can
        still compare), and after training `eval_before_after.png`: before above after."""
        if not self.is_main:
            return
        labelled_grid([(stage, samples)]).save(self.dir / f"eval_{stage}.png")
        samples.save(self.dir / f"eval_{stage}_samples.safetensors")
        before = self.dir / "eval_before_samples.safetensors"
        if stage == "after" and before.is_file():
            labelled_grid([("before", EvaluationSamples.load(before)), ("after", samples)]).save(
                self.dir / "eval_before_after.png")


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> None:
    """Write float images [N, 3, H, W] in [0, 1] as one PNG grid (2 px gaps)."""
    images = images.detach().float().cpu().clamp(0, 1)
    count, _, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    gap = 2
    canvas = torch.ones(3, rows * (height + gap) - gap, columns * (width + gap) - gap)
    for index, image in enumerate(images):
        top, left = (index // columns) * (height + gap), (index % columns) * (width + gap)
        canvas[:, top : top + height, left : left + width] = image
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# ------------------------------------------------------------------------------------------- labelled grids

SAMPLE_PROMPTS = 6  # evaluation prompts shown in the before/after grids (every seed of each)
GRID_CELL = 96  # px: the toy generator's 32 px images are upscaled to be seen
LABEL_WIDTH = 110  # px: the row labels' column


@dataclass
class EvaluationSamples:
    """The images of an evaluation's first prompts, per seed: `images[seed]` is [len(prompts), 3, H, W]."""

    prompts: list[str]
    images: dict[int, torch.Tensor]

    def save(self, path: Path) -> None:
        save_file({str(seed): images.contiguous() for seed, images in self.images.items()}, path,
                  metadata={"prompts": json.dumps(self.prompts)})

    @classmethod
    def load(cls, path: Path) -> "EvaluationSamples":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            prompts = json.loads(handle.metadata()["prompts"])
        return cls(prompts, {int(seed): images for seed, images in load_file(path).items()})


def labelled_grid(blocks: Sequence[tuple[str, EvaluationSamples]]) -> Image.Image:
    """One picture: a column per prompt (its text on top), a row per (block, seed) labelled "before, seed 0", the
    blocks one above the other; images upscaled to `GRID_CELL` px without smoothing."""
    import textwrap

    from PIL import ImageDraw

    prompts = blocks[0][1].prompts
    rows = [(f"{label}, seed {seed}", images)
            for label, samples in blocks for seed, images in sorted(samples.images.items())]
    header, gap = 40, 4
    width = LABEL_WIDTH + len(prompts) * (GRID_CELL + gap)
    canvas = Image.new("RGB", (width, header + len(rows) * (GRID_CELL + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, prompt in enumerate(prompts):
        text = "\n".join(textwrap.wrap(prompt, width=GRID_CELL // 6)[:3])
        draw.multiline_text((LABEL_WIDTH + column * (GRID_CELL + gap), 2), text, fill="black", spacing=1)
    for row, (label, images) in enumerate(rows):
        top = header + row * (GRID_CELL + gap)
        draw.text((4, top + GRID_CELL // 2 - 6), label, fill="black")
        for column, image in enumerate(images[: len(prompts)]):
            array = (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(array).resize((GRID_CELL, GRID_CELL), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + column * (GRID_CELL + gap), top))
    return canvas


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """The trailing mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value - (values[index - window] if index >= window else 0.0)
        out.append(total / min(index + 1, window))
    return out


# ------------------------------------------------------------------------------------------- evaluation


def reward_call(
    reward_fn: Callable[..., Any], images: torch.Tensor, prompts: list[str], metadata: list[Any]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Call a reward function (TRL signature) and return float32 CPU rewards [N] and its info dict."""
    return reward_result(reward_fn(images, prompts, metadata), len(prompts))


def reward_result(result: Any, count: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """A reward function's return value (`rewards` or `(rewards, info)`) as float32 CPU rewards [count] and info."""
    rewards, info = result if isinstance(result, tuple) else (result, {})
    rewards = torch.as_tensor(np.asarray(rewards.detach().cpu() if isinstance(rewards, torch.Tensor) else rewards))
    rewards = rewards.to(torch.float32).reshape(-1)
    if len(rewards) != count:
        raise ValueError(f"reward function: expected {count} rewards, got {len(rewards)}")
    return rewards, dict(info or {})


def perspective_values(info: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per-perspective raw scores from a reward's info (`info["raw"]`), as float32 CPU tensors."""
    raw = info.get("raw") or {}
    return {name: torch.as_tensor(values).detach().float().cpu().reshape(-1) for name, values in raw.items()}


def gathered_advantages(
    accelerator: Accelerator,
    reward_fn: Any,
    rewards: torch.Tensor,
    perspectives: dict[str, torch.Tensor],
    prompts: list[str],
    normalise: Callable[[torch.Tensor, list[int], list[str], int], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The policy-gradient trainers' advantages: gather every process's rewards (and per-perspective scores and
    prompts), drop the non-finite ones, and turn the rest into advantages; return this process's share
    (`advantages`, `valid`, on the accelerator's device) and the epoch's reward statistics.

    A reward weighted at the level "advantage" (GDPO) computes them itself from the gathered per-perspective scores;
    otherwise `normalise(kept_rewards, kept_indices, gathered_prompts, rewards_per_process)` does (the trainer's
    group, tracker or batch normalisation).
    """
    local = len(prompts)
    all_rewards = accelerator.gather(rewards).cpu().double()
    all_perspectives = {name: accelerator.gather(values).cpu() for name, values in perspectives.items()}
    all_prompts = gather_object(prompts) if accelerator.num_processes > 1 else prompts
    finite = torch.isfinite(all_rewards)
    advantages = torch.zeros_like(all_rewards, dtype=torch.float32)
    weighting = getattr(reward_fn, "weighting", None)
    if getattr(weighting, "level", "reward") == "advantage":
        folded = weighting.advantages(all_perspectives, all_prompts).total.cpu()
        finite &= torch.isfinite(folded)
        advantages[finite] = folded[finite].float()
    elif finite.any():
        kept = finite.nonzero().squeeze(1).tolist()
        advantages[kept] = normalise(all_rewards[kept], kept, all_prompts, local)
    rank = accelerator.process_index
    stats = {"num_nonfinite_rewards": int((~finite).sum()), **mean_std("reward", all_rewards[finite])}
    for name, values in all_perspectives.items():
        stats.update(mean_std(f"reward_{name}", values.double()[torch.isfinite(values)]))
    return (advantages.reshape(-1, local)[rank].to(accelerator.device),
            finite.reshape(-1, local)[rank].to(accelerator.device), stats)


def mean_std(prefix: str, values: torch.Tensor) -> dict[str, float]:
    """`{prefix}_mean` and `{prefix}_std` (population) of `values`; NaN for none."""
    if len(values) == 0:
        return {f"{prefix}_mean": float("nan"), f"{prefix}_std": float("nan")}
    return {f"{prefix}_mean": float(values.mean()), f"{prefix}_std": float(values.std(unbiased=False))}


def weighting_state(reward_fn: Any) -> dict[str, Any] | None:
    """The running normalisation statistics of a reward's weighting (None without one), for checkpoints: a
    resumed run must fold rewards exactly as the uninterrupted one."""
    weighting = getattr(reward_fn, "weighting", None)
    return weighting.state_dict() if weighting is not None else None


def load_weighting_state(reward_fn: Any, state: dict[str, Any] | None) -> None:
    """Restore what `weighting_state` saved (nothing to do for a reward without a weighting)."""
    if state is not None:
        reward_fn.weighting.load_state_dict(state)


def evaluate(
    sample_fn: Callable[[list[str], list[torch.Generator]], torch.Tensor],
    reward_fn: Callable[..., Any],
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int,
    accelerator: Accelerator | None = None,
    description: str = "evaluating",
) -> tuple[dict[str, Any], "EvaluationSamples"]:
    """Score a policy on fixed prompts and seeds; the seeds are shared out across processes.

    `sample_fn(prompts, generators)` draws one image per prompt (float [N, 3, H, W] in [0, 1]), image i from
    its own generator; prompt i of seed s draws from `seeded_generator(s, i)`, so an evaluation depends on
    neither the batch size nor the process count.

    Returns `{"reward_mean", "reward_std" (sample std over seeds of the per-seed mean; 0 with one seed),
    "per_perspective": {name: mean}, "per_perspective_std": {name: sample std over seeds of the per-seed mean},
    "num_seeds", "num_prompts"}` (a perspective is a name in the reward's `info["raw"]`) and the images of the first `SAMPLE_PROMPTS`
    prompts for every seed (gathered from all processes), for the labelled grids. A progress bar named `description`
    counts the sampled batches (an evaluation samples as many images as many epochs do).
    """
    prompts, seeds = list(prompts), list(seeds)
    if not prompts or not seeds:
        raise ValueError("eval_prompts and eval_seeds: expected at least one of each")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    results, samples = [], {}
    batches = len(seeds[rank::world]) * math.ceil(len(prompts) / batch_size)
    show = accelerator is None or accelerator.is_local_main_process
    progress = tqdm(total=batches, desc=description, unit="batch", disable=not show, leave=False)
    for seed in seeds[rank::world]:
        rewards, perspectives, images = [], {}, []
        for start in range(0, len(prompts), batch_size):
            progress.update(1)
            chunk = prompts[start : start + batch_size]
            generators = [seeded_generator(seed, index) for index in range(start, start + len(chunk))]
            batch_images = sample_fn(chunk, generators).float().cpu()
            batch_rewards, info = reward_call(reward_fn, batch_images, chunk, [{} for _ in chunk])
            rewards.append(batch_rewards)
            for name, values in perspective_values(info).items():
                perspectives.setdefault(name, []).append(values)
            images.append(batch_images)
        samples[seed] = torch.cat(images)[:SAMPLE_PROMPTS]
        results.append(
            {
                "rewards": torch.cat(rewards).tolist(),
                "perspectives": {k: torch.cat(v).tolist() for k, v in perspectives.items()},
            }
        )
    progress.close()
    if accelerator is not None and world > 1:
        results = gather_object(results)
        samples = {seed: images for part in gather_object([samples]) for seed, images in part.items()}
    return summarise_evaluation(results, len(prompts)), EvaluationSamples(prompts[:SAMPLE_PROMPTS], samples)


def summarise_evaluation(results: list[dict[str, Any]], num_prompts: int) -> dict[str, Any]:
    per_seed = np.array([np.mean(r["rewards"]) for r in results])
    finite = [v for r in results for v in r["rewards"] if math.isfinite(v)]

    def means(key: str) -> dict[str, float]:
        names = sorted({name for r in results for name in r[key]})
        return {name: float(np.nanmean([v for r in results for v in r[key].get(name, [])])) for name in names}

    def stds_over_seeds(key: str) -> dict[str, float]:
        names = sorted({name for r in results for name in r[key]})
        per_seed_means = {name: [np.nanmean(r[key][name]) for r in results if r[key].get(name)] for name in names}
        return {name: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for name, v in per_seed_means.items()}

    return {
        "reward_mean": float(np.mean(finite)) if finite else float("nan"),
        "reward_std": float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0,
        "per_perspective": means("perspectives"),
        "per_perspective_std": stds_over_seeds("perspectives"),
        "num_seeds": len(results),
        "num_prompts": num_prompts,
    }
