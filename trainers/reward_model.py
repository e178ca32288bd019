"""Training and evaluation of reward perspectives: `RewardModelTrainer` (a `transformers.Trainer` taking TRL's
`RewardConfig`) and the `rlhf train reward` / `rlhf eval reward` commands."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from torch import nn
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from trl import RewardConfig

from reward.data import LabelExample, PairExample, PreferenceData, load_preferences
from reward.losses import (
    TIE_POLICIES,
    bradley_terry_loss,
    center_penalty,
    classification_loss,
    classification_metrics,
    pairwise_accuracy,
)
from reward.model import CONFIG_NAME, PerspectiveConfig, RewardModel
from rlhf.config import ConfigError, parse_config
from rlhf.runs import claim_output_dir, resumable
from trainers.common import RunOutputs

LOSSES = ("bradley_terry", "classification")
# the data kind each loss trains on
_LOSS_KIND = {"bradley_terry": "pairs", "classification": "labels"}
TINY_BASE_PREFIX = "tiny:"
MODEL_SUBDIR = "model"
CHECKPOINTS_SUBDIR = "checkpoints"
CURVES_FILE = "training_curves.png"

Example = PairExample | LabelExample
PreferenceSource = PreferenceData | Sequence[Example] | str | Path | Any


# ------------------------------------------------------------------------------------------- data


def preference_examples(source: PreferenceSource, what: str = "data") -> list[Example]:
    """The examples of `source`: a `PreferenceData`, a list of `PairExample`/`LabelExample`, or anything
    `reward.data.load_preferences` reads (a .jsonl/.json/.parquet path, a `datasets.Dataset`). All pairs or all
    labels: one perspective trains on one kind."""
    if isinstance(source, PreferenceData):
        examples = [*source.pairs, *source.labels]
    elif isinstance(source, Sequence) and not isinstance(source, str) and source \
            and all(isinstance(e, (PairExample, LabelExample)) for e in source):
        examples = list(source)
    else:
        loaded = load_preferences(source)
        examples = [*loaded.pairs, *loaded.labels]
    example_kind(examples, what)
    return examples


def example_kind(examples: Sequence[Example], what: str = "data") -> str:
    """"pairs" or "labels"; a mix of both, or nothing, is an error naming `what`."""
    pairs = sum(isinstance(e, PairExample) for e in examples)
    if not examples or 0 < pairs < len(examples):
        found = "no examples" if not examples else f"{pairs} pairs and {len(examples) - pairs} labelled images"
        raise ValueError(f"{what}: expected only image pairs or only labelled images, got {found}")
    return "pairs" if pairs else "labels"


def collate_preferences(examples: list[Example]) -> dict[str, Any]:
    """Decode a batch's images. Pairs: chosen images then rejected ones, so one forward scores both (each
    rejected image against its own `rejected_prompt` when it has one), with `ties` (bool per pair); labelled
    images: `labels` (float 0/1 per image)."""
    prompts = [e.prompt for e in examples]
    if isinstance(examples[0], PairExample):
        rejected_prompts = [e.prompt if e.rejected_prompt is None else e.rejected_prompt for e in examples]
        return {
            "images": [e.chosen.load() for e in examples] + [e.rejected.load() for e in examples],
            "prompts": prompts + rejected_prompts,
            "ties": torch.tensor([e.tie for e in examples], dtype=torch.bool),
        }
    return {
        "images": [e.image.load() for e in examples],
        "prompts": prompts,
        "labels": torch.tensor([e.label for e in examples], dtype=torch.float32),
    }


def resolve_loss(loss: str | None, kinds: Mapping[str, str]) -> str:
    """The loss for data of `kinds` ({what: "pairs" | "labels"}): `loss` checked against them, or, when None,
    the one that fits (Bradley-Terry for pairs, classification for labelled images)."""
    if loss is None:
        loss = "bradley_terry" if next(iter(kinds.values()), "pairs") == "pairs" else "classification"
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    wrong = [f"{what} holds {kind}" for what, kind in kinds.items() if kind != _LOSS_KIND[loss]]
    if wrong:
        raise ValueError(f"loss {loss!r} trains on {_LOSS_KIND[loss]}, but {', '.join(wrong)}")
    return loss


# ------------------------------------------------------------------------------------------- trainer


class RewardModelTrainer(Trainer):
    """Trains one perspective of a `RewardModel` with `transformers.Trainer` (accelerate underneath: devices,
    DDP, mixed precision, gradient accumulation and checkpointing, logging, checkpoints and exact resume).

    Args:
        model: the `RewardModel`; every parameter is frozen except `model.trainable_parameters(perspective)`
            (its LoRA, SkipCA + head, and projector copy when it has one), so the optimizer takes exactly those.
        perspective: the perspective to train.
        args: a TRL `RewardConfig` (any `TrainingArguments` works); `center_rewards_coefficient` adds
            `coefficient * center_penalty` to the loss, `disable_dropout` (default True) zeroes every dropout.
        train_dataset, eval_dataset: preference data (see `preference_examples`); `eval_dataset` may be a dict
            of named sets.
        loss: "bradley_terry" (pairs: `-log sigmoid((r_chosen - r_rejected - margin) / tau)`, annotator ties
            pulled to a gap of zero) or "classification" (labelled images: BCE on the score as a logit, 1 =
            positive); None picks the one that fits the data.
        tau, margin: Bradley-Terry temperature (paper default 0.1) and margin (reward units).
        tie_policy, tie_eps: how evaluation scores ground-truth ties (`reward.losses.pairwise_accuracy`).

    `compute_metrics` defaults to pairwise accuracy (naming its tie policy) for pairs, classification
    accuracy/precision/recall/F1 for labelled images. Checkpoints hold only the perspective
    (`RewardModel.save_pretrained` layout), not the base model.
    """

    # our losses are per-batch means: the Trainer divides them by the gradient-accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: RewardModel,
        perspective: str,
        args: TrainingArguments | None = None,
        train_dataset: PreferenceSource | None = None,
        eval_dataset: PreferenceSource | dict[str, PreferenceSource] | None = None,
        loss: str | None = None,
        tau: float = 0.1,
        margin: float = 0.0,
        tie_policy: str = "drop",
        tie_eps: float | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
    ) -> None:
        if not isinstance(model, RewardModel):
            raise TypeError(f"model: expected a reward.RewardModel, got {type(model).__name__}")
        if perspective not in model.perspectives:
            raise ValueError(f"perspective: {perspective!r} is not in this model; it has {model.perspectives}")
        if tau <= 0:
            raise ValueError(f"tau: expected a positive temperature, got {tau}")
        if tie_policy not in TIE_POLICIES:
            raise ValueError(f"tie_policy: expected one of {TIE_POLICIES}, got {tie_policy!r}")
        if tie_policy == "predict_ties" and tie_eps is None:
            raise ValueError("tie_eps: tie_policy 'predict_ties' needs it (choose it on a split: reward.losses.choose_tie_eps)")
        train = None if train_dataset is None else preference_examples(train_dataset, "train_dataset")
        if isinstance(eval_dataset, Mapping):
            evals = {name: preference_examples(data, f"eval_dataset[{name!r}]") for name, data in eval_dataset.items()}
        else:
            evals = None if eval_dataset is None else preference_examples(eval_dataset, "eval_dataset")
        named = {} if train is None else {"train_dataset": train}
        if isinstance(evals, dict):
            named.update({f"eval_dataset[{name!r}]": examples for name, examples in evals.items()})
        elif evals is not None:
            named["eval_dataset"] = evals
        loss = resolve_loss(loss, {what: example_kind(examples) for what, examples in named.items()})
        self.perspective, self.loss_type, self.tau, self.margin = perspective, loss, tau, margin
        self.tie_policy, self.tie_eps = tie_policy, tie_eps

        model.requires_grad_(False)
        for parameter in model.trainable_parameters(perspective).values():
            parameter.requires_grad_(True)
        if getattr(args, "disable_dropout", False):
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        super().__init__(
            model=model, args=args, data_collator=collate_preferences, train_dataset=train, eval_dataset=evals,
            compute_metrics=compute_metrics or self.preference_metrics, callbacks=callbacks, optimizers=optimizers,
        )
        if self.args.n_gpu > 1:
            raise ValueError("RewardModelTrainer runs one process per GPU: launch with `accelerate launch` or "
                             "`torchrun` instead of letting one process see several GPUs (DataParallel)")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("RewardModelTrainer saves and loads one perspective's weights; DeepSpeed and FSDP "
                             "sharding are not supported (the trainable part is small: use plain DDP)")

    # -- loss and evaluation --------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Bradley-Terry on pairs or BCE on labels, plus `center_rewards_coefficient * center_penalty` when set.
        Outputs: scores [N, 2] (chosen, rejected) for pairs, [N] for labelled images."""
        scores = model(inputs["images"], inputs["prompts"], perspective=self.perspective).float()
        if "labels" in inputs:
            loss = classification_loss(scores, inputs["labels"])
            centre = center_penalty(scores)
            outputs = scores
        else:
            chosen, rejected = scores.chunk(2)
            loss = bradley_terry_loss(chosen, rejected, self.tau, self.margin, ties=inputs["ties"])
            centre = center_penalty(chosen, rejected)
            outputs = torch.stack([chosen, rejected], dim=1)
        coefficient = getattr(self.args, "center_rewards_coefficient", None)
        if coefficient:
            loss = loss + coefficient * centre
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(loss, scores, targets): targets are the tie flags of pairs or the labels of labelled images."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, scores = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        targets = inputs["labels"] if "labels" in inputs else inputs["ties"].float()
        return loss.detach(), scores.detach(), targets

    def preference_metrics(self, prediction: EvalPrediction) -> dict[str, Any]:
        """Pairwise accuracy under `tie_policy` (scores [N, 2]) or classification metrics (scores [N])."""
        scores, targets = prediction.predictions, prediction.label_ids
        if scores.ndim == 2:
            return pairwise_accuracy(scores[:, 0], scores[:, 1], tie_labels=targets, policy=self.tie_policy,
                                     eps=self.tie_eps, tau=self.tau)
        return classification_metrics(scores, targets)

    # -- checkpoints: the perspective only, never the base model ------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            directory = Path(output_dir or self.args.output_dir)
            self.accelerator.unwrap_model(self.model).save_pretrained(directory, perspectives=[self.perspective])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self._load_perspective(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        self._load_perspective(self.state.best_model_checkpoint)

    def _load_perspective(self, checkpoint: str | Path, model: nn.Module | None = None) -> None:
        source = Path(checkpoint) / "perspectives" / self.perspective
        if not source.is_dir():
            raise FileNotFoundError(f"resume_from_checkpoint: {checkpoint} holds no saved perspective "
                                    f"{self.perspective!r} (expected {source})")
        self.accelerator.unwrap_model(model or self.model).load_perspective(source, self.perspective)


# ------------------------------------------------------------------------------------------- configs


class DataSource(Protocol):
    """Preference data a command plugs into `rlhf train reward` (the `rlhf` command plugs in the toy world's): a
    dataclass parsed with the config, so its fields are config keys, that names default files and writes them."""

    def default_data(self, perspective: str) -> tuple[str, str] | None:
        """(training file, held-out file) for a perspective that names no train_data, or None."""

    def prepare(self) -> None:
        """Write the files where absent (on the main process first, then the others)."""


@dataclasses.dataclass
class PerspectiveTraining(PerspectiveConfig):
    """One entry of `perspectives` in a `rlhf train reward` config (its key is the name). Besides the
    `PerspectiveConfig` fields (lora_r 16, lora_alpha 32, lora_dropout 0.05, hidden_layer -1, skipca_heads 1,
    train_projector False):

    train_data: JSONL/JSON/parquet preference file ("" = the command's data source's file for this perspective).
    eval_data: held-out file ("" = the data source's held-out file when it gave train_data, else the training data,
        reported as such).
    data_kind: row layout for `load_preferences` ("auto"; or pairs, labels, imagereward, pickapic, hpdv2,
        llava_reward).
    ties: "keep" (default) trains annotator ties towards equal rewards; "drop" leaves them out.
    image_root / path_map: as in `load_preferences`, for both files: the folder relative image paths resolve
        against ("" = each file's own), and {path prefix in the file: local folder} ({} = none).
    loss: "auto" (default: bradley_terry for pairs, classification for labelled images), "bradley_terry" or
        "classification".
    tau / margin: Bradley-Terry temperature (0.1) and margin (0.0).
    tie_policy / tie_eps: how evaluation scores ground-truth ties ("drop"; or "half", "predict_ties" with tie_eps).
    training: `RewardConfig` fields overriding the shared ones for this perspective (e.g. {learning_rate: 3.0e-4}).
    """

    name: str = ""
    train_data: str = ""
    eval_data: str = ""
    data_kind: str = "auto"
    ties: str = "keep"
    image_root: str = ""
    path_map: dict = dataclasses.field(default_factory=dict)
    loss: str = "auto"
    tau: float = 0.1
    margin: float = 0.0
    tie_policy: str = "drop"
    tie_eps: float | None = None
    training: dict = dataclasses.field(default_factory=dict)

    def perspective_config(self) -> PerspectiveConfig:
        return PerspectiveConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PerspectiveConfig)})


# the annotation of each PerspectiveTraining field -> the YAML values it accepts
_OPTION_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "float | None": (int, float, type(None)),
                 "bool": (bool,), "dict": (dict,)}


@dataclasses.dataclass
class RewardTrainingScript:
    """What `rlhf train reward` trains; TRL's `RewardConfig` (in the same YAML) gives the training arguments.

    base_model: path or Hugging Face id of the base VLM (local or cached, never downloaded by tests), or
        "tiny:FAMILY" (llava, llava_next, qwen2_vl, phi3_v): a tiny random VLM built into `<output_dir>/model/base`
        (default "tiny:llava").
    base_seed: seed of the tiny base's random weights (0).
    dtype: dtype of the base weights: float32 (default), bfloat16 or float16.
    max_prompt_tokens: prompts longer than this are truncated, with a warning (256).
    perspectives: name -> `PerspectiveTraining` fields; trained one at a time, in order.
    overwrite_output_dir: replace an earlier run in output_dir (else it is refused unless resume_from_checkpoint).
    """

    base_model: str = dataclasses.field(default="tiny:llava", metadata={"help": "Base VLM path/id, or tiny:FAMILY (llava, llava_next, qwen2_vl, phi3_v)."})
    base_seed: int = dataclasses.field(default=0, metadata={"help": "Seed of a tiny base's random weights."})
    dtype: str = dataclasses.field(default="float32", metadata={"help": "Base weights dtype."})
    max_prompt_tokens: int = dataclasses.field(default=256, metadata={"help": "Prompt truncation length."})
    perspectives: dict = dataclasses.field(default_factory=dict, metadata={"help": "name -> perspective options."})
    overwrite_output_dir: bool = dataclasses.field(
        default=False, metadata={"help": "Replace an earlier run in output_dir (its outputs are deleted)."})

    def perspective_trainings(self, data_source: DataSource | None = None) -> list[PerspectiveTraining]:
        """The validated perspectives, the data source's files filled in where a perspective names no train_data;
        errors name the perspective and the key."""
        if not self.perspectives or not isinstance(self.perspectives, Mapping):
            raise ConfigError("perspectives: expected a mapping of perspective name -> options, e.g. "
                              "{alignment: {train_data: pairs.jsonl}}")
        allowed = sorted(f.name for f in dataclasses.fields(PerspectiveTraining) if f.name != "name")
        training_keys = sorted(f.name for f in dataclasses.fields(RewardConfig) if f.init)
        trainings = []
        for name, options in self.perspectives.items():
            options = {} if options is None else options
            if not isinstance(options, Mapping):
                raise ConfigError(f"perspectives.{name}: expected a mapping of options, got {options!r}")
            unknown = sorted(set(options) - set(allowed))
            if unknown:
                raise ConfigError(f"perspectives.{name}: unknown key(s) {unknown}; allowed keys: {allowed}")
            entry = PerspectiveTraining(name=str(name), **options)
            for field in dataclasses.fields(PerspectiveTraining):
                expected = _OPTION_TYPES[str(field.type)]
                value = getattr(entry, field.name)
                if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
                    raise ConfigError(f"perspectives.{name}.{field.name}: expected {field.type}, got {value!r}")
            unknown = sorted(set(entry.training) - set(training_keys) - {"output_dir"})
            if unknown or "output_dir" in entry.training:
                raise ConfigError(f"perspectives.{name}.training: unknown or per-run key(s) "
                                  f"{unknown or ['output_dir']}; allowed: RewardConfig fields {training_keys}")
            for key, choices in (("loss", ("auto", *LOSSES)), ("ties", ("keep", "drop")), ("tie_policy", TIE_POLICIES)):
                if getattr(entry, key) not in choices:
                    raise ConfigError(f"perspectives.{name}.{key}: expected one of {list(choices)}, "
                                      f"got {getattr(entry, key)!r}")
            defaults = None if entry.train_data or data_source is None else data_source.default_data(entry.name)
            if defaults:
                entry.train_data, entry.eval_data = defaults[0], entry.eval_data or defaults[1]
            if not entry.train_data:
                raise ConfigError(f"perspectives.{name}.train_data: required (a preference file)")
            trainings.append(entry)
        return trainings


@dataclasses.dataclass
class RewardEvalScript:
    """Arguments of `rlhf eval reward`.

    model: a saved RewardModel directory, or a `rlhf train reward` output directory (its `model/` is used).
    data: the preference file to evaluate on (pairs or labelled images).
    perspective: the perspective to evaluate ("" = every perspective of the model).
    output_dir: where metrics.json is written (default "runs/reward_eval").
    data_kind / ties: as in `load_preferences` ("auto" / "keep").
    image_root / path_map: as in `load_preferences` ("" = the data file's folder / {} = no mapping).
    tie_policy / tie_eps / tau: how ties are scored ("drop"; tau 0.1 is only used by "predict_ties").
    batch_size: images per forward (32). device: "auto" (a GPU when there is one) or "cpu".
    """

    model: str = dataclasses.field(default="", metadata={"help": "RewardModel or training output directory."})
    data: str = dataclasses.field(default="", metadata={"help": "Preference file to evaluate on."})
    perspective: str = dataclasses.field(default="", metadata={"help": "Perspective ('' = all)."})
    output_dir: str = dataclasses.field(default="runs/reward_eval", metadata={"help": "Output directory."})
    data_kind: str = dataclasses.field(default="auto", metadata={"help": "Row layout of the data."})
    ties: str = dataclasses.field(default="keep", metadata={"help": "keep or drop annotator ties."})
    image_root: str = dataclasses.field(default="", metadata={"help": "Folder relative image paths resolve against."})
    path_map: dict = dataclasses.field(default_factory=dict, metadata={"help": "JSON {path prefix: local folder}."})
    tie_policy: str = dataclasses.field(default="drop", metadata={"help": "drop, half or predict_ties."})
    tie_eps: float | None = dataclasses.field(default=None, metadata={"help": "Tie threshold for predict_ties."})
    tau: float = dataclasses.field(default=0.1, metadata={"help": "Temperature for predict_ties."})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "Images per forward."})
    device: str = dataclasses.field(default="auto", metadata={"help": "auto or cpu."})


# ------------------------------------------------------------------------------------------- commands


def _base_path(script: RewardTrainingScript, model_dir: Path) -> str:
    """The base VLM's path; a tiny base is built inside the model directory, so the directory is self-contained."""
    if not script.base_model.startswith(TINY_BASE_PREFIX):
        return script.base_model
    from reward.testing import FAMILIES, build_tiny_vlm

    family = script.base_model[len(TINY_BASE_PREFIX):]
    if family not in FAMILIES:
        raise ConfigError(f"base_model: tiny bases are {[TINY_BASE_PREFIX + f for f in FAMILIES]}, got {script.base_model!r}")
    base = model_dir / "base"
    if not (base / "config.json").is_file():
        build_tiny_vlm(base, family, seed=script.base_seed)
    return str(base)


def _perspective_args(args: RewardConfig, entry: PerspectiveTraining, output_dir: Path) -> RewardConfig:
    return dataclasses.replace(args, output_dir=str(output_dir / CHECKPOINTS_SUBDIR / entry.name), **entry.training)


def _eval_summary(metrics: dict[str, Any], prefix: str = "eval_") -> dict[str, Any]:
    """Evaluation metrics without the Trainer's prefix, and without its speed counters."""
    speed = ("runtime", "samples_per_second", "steps_per_second", "model_preparation_time")
    return {key[len(prefix):]: value for key, value in metrics.items()
            if key.startswith(prefix) and key[len(prefix):] not in speed}


def _metric_name(kind: str) -> str:
    return "pairwise accuracy" if kind == "pairs" else "classification accuracy (score > 0 means label 1)"


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss and held-out accuracy against step, one line per perspective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for axis, key, title in ((axes[0], "loss", "training loss"), (axes[1], "eval_accuracy", "held-out accuracy")):
        for name in dict.fromkeys(row["perspective"] for row in history):
            points = [(row["step"], row[key]) for row in history if row["perspective"] == name and key in row]
            if points:
                axis.plot(*zip(*points), marker=".", label=name)
        axis.set_xlabel("step")
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: list[str], data_source: type[DataSource] | None = None) -> int:
    """`rlhf train reward --config configs/reward/X.yaml [--output_dir DIR] [--field value ...]`.

    data_source: a `DataSource` dataclass the calling command plugs in (the `rlhf` command's toy data): its fields
    are parsed with the config's, between this command's and TRL's."""
    script, *sources, args = parse_config([RewardTrainingScript, *([data_source] if data_source else []),
                                           RewardConfig], argv)
    trainings = script.perspective_trainings(*sources)
    resume = args.resume_from_checkpoint
    if resume is not None and str(resume).lower() not in ("true", "last"):
        raise ConfigError(f"resume_from_checkpoint: this command resumes its own output_dir; use 'true', got {resume!r}")
    with args.main_process_first(desc="claiming the output directory"):
        claim_output_dir(args.output_dir, resuming=resume is not None, overwrite=script.overwrite_output_dir,
                         resume_flag="--resume_from_checkpoint true")
    for source in sources:
        with args.main_process_first(desc="preparing the data"):
            source.prepare()
    output_dir = Path(args.output_dir)
    with resumable(argv, ["--resume_from_checkpoint", "true"], lambda: _has_checkpoint(output_dir)):
        return _train(script, args, trainings, resume, sources)


def _has_checkpoint(output_dir: Path) -> bool:
    """Whether a run in `output_dir` can resume: a finished perspective, or a Trainer checkpoint of one."""
    return (output_dir / "metrics.json").is_file() or any((output_dir / CHECKPOINTS_SUBDIR).glob("*/checkpoint-*"))


def _train(script: RewardTrainingScript, args: RewardConfig, trainings: list[PerspectiveTraining],
           resume: str | None, sources: Sequence[DataSource] = ()) -> int:
    """Train `trainings` one perspective at a time into `args.output_dir` (resuming its run when `resume`)."""
    data = {}
    for entry in trainings:
        options = dict(ties=entry.ties, image_root=entry.image_root or None, path_map=entry.path_map)
        train = load_preferences(entry.train_data, entry.data_kind, **options)
        held_out = load_preferences(entry.eval_data, entry.data_kind, **options) if entry.eval_data else train
        resolve_loss(None if entry.loss == "auto" else entry.loss,
                     {f"perspectives.{entry.name}.train_data": example_kind(preference_examples(train)),
                      f"perspectives.{entry.name}.eval_data": example_kind(preference_examples(held_out))})
        data[entry.name] = (train, held_out)

    output_dir = Path(args.output_dir)
    model_dir = output_dir / MODEL_SUBDIR
    outputs = RunOutputs(output_dir, args.should_save)
    with args.main_process_first(desc="building the tiny base"):
        base = _base_path(script, model_dir)
    source_fields = {key: value for source in sources for key, value in dataclasses.asdict(source).items()}
    resolved = {**dataclasses.asdict(script), **source_fields, "perspectives": {
        entry.name: {k: v for k, v in dataclasses.asdict(entry).items() if k != "name"} for entry in trainings}}
    if args.should_save:
        (output_dir / "config.yaml").write_text(yaml.safe_dump(
            {"script": resolved, "training": json.loads(args.to_json_string())}, sort_keys=False))
    model = RewardModel.from_backbone(base, [entry.perspective_config() for entry in trainings], dtype=script.dtype,
                                      max_prompt_tokens=script.max_prompt_tokens, seed=args.seed)
    metrics_path = output_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if resume and metrics_path.is_file() else {}
    history = [row for row in outputs.history() if row.get("perspective") in metrics] if resume else []

    for entry in trainings:
        if entry.name in metrics and (model_dir / "perspectives" / entry.name).is_dir():
            model.load_perspective(model_dir / "perspectives" / entry.name, entry.name)
            print(f"{entry.name}: already trained in {model_dir}, loaded")
            continue
        train, held_out = data[entry.name]
        trainer = RewardModelTrainer(
            model, entry.name, _perspective_args(args, entry, output_dir), train_dataset=train, eval_dataset=held_out,
            loss=None if entry.loss == "auto" else entry.loss, tau=entry.tau, margin=entry.margin,
            tie_policy=entry.tie_policy, tie_eps=entry.tie_eps,
        )
        before = _eval_summary(trainer.evaluate())
        checkpoint = get_last_checkpoint(trainer.args.output_dir) if resume and Path(trainer.args.output_dir).is_dir() else None
        start = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=checkpoint)
        train_seconds = time.perf_counter() - start
        after = _eval_summary(trainer.evaluate())
        trainer.save_model(str(model_dir))
        kind = example_kind(preference_examples(held_out))
        metrics[entry.name] = {
            "accuracy": after["accuracy"],
            "tie_policy": after.get("tie_policy"),
            "metric": _metric_name(kind),
            "accuracy_before": before["accuracy"],
            "evaluated_on": entry.eval_data or f"{entry.train_data} (the training data: no eval_data given)",
            "loss": trainer.loss_type,
            "eval": after,
            "train_seconds": round(train_seconds, 2),
            "train_steps": result.global_step,
            "train_loss": result.training_loss,
            "resumed_from": checkpoint,
            "data": {"train": train.summary(), "eval": held_out.summary()},
        }
        history += [{"perspective": entry.name, **row} for row in trainer.state.log_history]
        if args.should_save:
            outputs.write_metrics(metrics)
            (output_dir / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
            plot_curves(history, output_dir / CURVES_FILE)
        print(f"{entry.name}: {metrics[entry.name]['metric']} {before['accuracy']:.3f} -> {after['accuracy']:.3f} "
              f"on {metrics[entry.name]['evaluated_on']} ({train_seconds:.0f} s of training)")
    print(f"reward model in {model_dir}; metrics in {metrics_path}")
    return 0


def _model_directory(path: str) -> Path:
    directory = Path(path)
    if not (directory / CONFIG_NAME).is_file() and (directory / MODEL_SUBDIR / CONFIG_NAME).is_file():
        return directory / MODEL_SUBDIR
    return directory


def _perspectives_for(data: str, model: str, perspectives: list[str]) -> list[str]:
    """The perspectives `data` is for, when `--perspective` is not given: the only one, or those the training run
    of `model` evaluated on this very file (its metrics.json says which file each was evaluated on). Anything else
    is an error naming each perspective's file: a fidelity accuracy computed on alignment pairs means nothing."""
    if len(perspectives) == 1:
        return perspectives
    metrics_path = Path(model) / "metrics.json"
    trained = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    files = {name: trained[name].get("evaluated_on", "") for name in perspectives if name in trained}
    matching = [name for name, path in files.items() if path and Path(path).resolve() == Path(data).resolve()]
    if matching:
        return matching
    known = "; ".join(f"{name}: {path}" for name, path in files.items()) or "not recorded for this model"
    raise ConfigError(f"perspective: {data} is not the held-out file of any one perspective of {model}, so which "
                      f"perspective it is for is unknown; pass --perspective NAME (one of {perspectives}). "
                      f"Each perspective's held-out file: {known}")


def eval_main(argv: list[str]) -> int:
    """`rlhf eval reward --model DIR --data FILE [--perspective NAME] [--output_dir OUT]`."""
    (config,) = parse_config(RewardEvalScript, argv)
    if not config.model or not config.data:
        raise ConfigError("--model and --data are required: a saved reward model (or training run) and a preference file")
    if config.batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive number of images, got {config.batch_size}")
    if config.device not in ("auto", "cpu"):
        raise ConfigError(f"device: expected 'auto' or 'cpu', got {config.device!r}")
    data = load_preferences(config.data, config.data_kind, ties=config.ties, image_root=config.image_root or None,
                            path_map=config.path_map)
    model = RewardModel.from_pretrained(_model_directory(config.model))
    if config.perspective and config.perspective not in model.perspectives:
        raise ConfigError(f"perspective: {config.perspective!r} is not in {config.model}; it has {model.perspectives}")
    names = [config.perspective] if config.perspective else _perspectives_for(config.data, config.model,
                                                                             model.perspectives)
    # activation_checkpointing set: TRL's RewardConfig defaults the deprecated gradient_checkpointing to True, which
    # transformers warns about whenever the new name is left unset (and evaluation needs no checkpointing)
    args = RewardConfig(output_dir=config.output_dir, per_device_eval_batch_size=config.batch_size, bf16=False,
                        activation_checkpointing=False,
                        use_cpu=config.device == "cpu", report_to="none", save_strategy="no",
                        dataloader_pin_memory=config.device != "cpu" and torch.cuda.is_available())
    metrics = {}
    for name in names:
        trainer = RewardModelTrainer(model, name, args, eval_dataset=data, tau=config.tau,
                                     tie_policy=config.tie_policy, tie_eps=config.tie_eps)
        summary = _eval_summary(trainer.evaluate())
        metrics[name] = {"accuracy": summary["accuracy"], "tie_policy": summary.get("tie_policy"),
                         "metric": _metric_name(example_kind(preference_examples(data))),
                         "evaluated_on": config.data, "eval": summary, "data": data.summary()}
        print(f"{name}: {metrics[name]['metric']} {summary['accuracy']:.4f} on {config.data}")
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"metrics in {output / 'metrics.json'}")
    return 0
