"""`rlhf demo`: the toy world end to end on a CPU, through the same commands and configs a user runs.

It trains three LLaVA-Reward perspectives on a tiny VLM, fine-tunes the toy generator's LoRA with DDPO and with
online Diffusion-DPO on their weighted reward (safety as a gate), and judges the generators with the toy oracles,
which the training never sees. Everything lands in `--output_dir`: report.md, metrics.json, the PNGs, and the
YAML configs of each stage (rerun any stage alone with `rlhf train ... --config DIR/configs/STAGE.yaml`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf.config import parse_config
from rlhf.toy import ALL_PROMPTS
from trainers.base import HELDOUT
from trainers.common import SAMPLE_PROMPTS


@dataclass
class DemoConfig:
    """Arguments of `rlhf demo`."""

    output_dir: str = field(default="runs/demo", metadata={"help": "Where everything is written."})
    quick: bool = field(default=False, metadata={"help": "A smaller run (fewer toy rows, training steps and epochs) "
                                                         "that finishes in a few minutes."})
    seed: int = field(default=0, metadata={"help": "The seed of every stage."})
    stages: list[str] = field(default=None, metadata={"help": "Which stages to run, in order (default: reward ddpo "
                                                              "dpo)."})  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.stages = list(self.stages or ["reward", "ddpo", "dpo"])
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise ValueError(f"stages: unknown {unknown}; expected some of {list(STAGES)}")


STAGES = ("reward", "ddpo", "dpo")
# Raw scores, not batch z-scores: a batch-normalised reward has mean ~0 in every evaluation batch, so before/after
# could not be compared (DDPO normalises advantages within each prompt's group anyway).
WEIGHTING = {
    "perspectives": {
        "alignment": {"weight": 1.0},
        "fidelity": {"weight": 0.5},
        "safety": {"constraint": "gate", "threshold": 0.0, "floor": -3.0},
    }
}


# the targets the report judges each stage by: a gain of more than 3 std over seeds counts as real (the bar
# for oracle alignment), and every toy perspective should rank >= 0.90 of its held-out data right
TARGET_GAIN_STD = 3.0
TARGET_ACCURACY = 0.90
TARGET_KEY = "alignment"  # the oracle number the generator stages are judged by
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOY_REWARD_CONFIG = CONFIGS / "reward" / "toy.yaml"
# where the generator stages deliberately differ from configs/<stage>/tiny.yaml: the epochs (full run, --quick) and
# the DPO guidance scale (3.0, the toy generator's best, as DDPO's tiny.yaml has it; tiny.yaml's DPO samples at
# 5.0) that the demo's measured numbers (README) were made with
EPOCHS = {"ddpo": (32, 8), "dpo": (16, 8)}
DPO_GUIDANCE_SCALE = 3.0


def _config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the demo runs from a checkout of this repository")
    return yaml.safe_load(path.read_text())


def reward_stage(out: Path, quick: bool, seed: int) -> dict[str, Any]:
    """`configs/reward/toy.yaml` (the config whose held-out accuracies the tests check), written into `out`;
    `--quick` trains on a quarter of the rows for 300 steps instead of 1000."""
    config = _config(TOY_REWARD_CONFIG)
    config.update(toy_data_dir=str(out / "toy_data"), output_dir=str(out / "reward"), seed=seed,
                  save_strategy="no", disable_tqdm=False, overwrite_output_dir=True)
    if quick:  # its own data directory: toy data is only written where absent
        config.update(toy_data_n=1024, max_steps=300, eval_steps=100, toy_data_dir=str(out / "toy_data_quick"))
    return config


def generator_stage(out: Path, name: str, quick: bool, seed: int) -> dict[str, Any]:
    """`configs/<name>/tiny.yaml` (the tuned toy settings) on the learned reward, evaluated on every toy prompt;
    its epochs (and DPO's guidance scale) the demo's own (`EPOCHS`)."""
    config = _config(CONFIGS / name / "tiny.yaml")
    config.update(
        output_dir=str(out / name),
        seed=seed,
        reward={"model": str(out / "reward" / "model"), "weighting": WEIGHTING, "batch_size": 32},
        num_epochs=EPOCHS[name][quick],
        save_freq=100,  # no intermediate checkpoints: a demo rerun starts its stage over
        eval_seeds=[0, 1] if quick else [0, 1, 2, 3],
        # 45 prompts x 4 images per seed: with one image per prompt the std over seeds of oracle alignment (a 0/1
        # per image) was 0.07-0.11, larger than any gain a few minutes of DDPO can make
        eval_prompts=ALL_PROMPTS * 4,
    )
    if name == "dpo":
        config["sample_guidance_scale"] = DPO_GUIDANCE_SCALE
    return config


def _run(words: list[str], config: dict[str, Any], path: Path) -> None:
    from trainers.cli import INTERRUPTED, main

    path.write_text(yaml.safe_dump(config, sort_keys=False))
    code = main([*words, "--config", str(path)])
    if code == INTERRUPTED:  # the stage said how to resume it; the demo itself ends as interrupted, untraced
        raise KeyboardInterrupt
    if code:
        raise RuntimeError(f"`rlhf {' '.join(words)} --config {path}` failed with exit code {code}")


def _gain(metrics: dict[str, Any], key: str) -> dict[str, float] | None:
    """Before/after of the reward, a learned perspective ("learned NAME") or a held-out reward (NAME: the toy
    oracles the stage configs name, `per_perspective["heldout/NAME"]`), and the gain in units of the std over seeds
    (the larger of the two runs' std, as the trainers' tests use)."""
    before, after = metrics.get("eval_before") or {}, metrics.get("eval_after") or {}
    if key == "reward":
        b, a = before.get("reward_mean"), after.get("reward_mean")
        std = max(before.get("reward_std") or 0.0, after.get("reward_std") or 0.0)
    else:
        learned = key.startswith("learned ")
        name = key.removeprefix("learned ") if learned else HELDOUT + key
        b, a = (before.get("per_perspective") or {}).get(name), (after.get("per_perspective") or {}).get(name)
        stds = [(run.get("per_perspective_std") or {}).get(name) or 0.0 for run in (before, after)]
        std = None if learned else max(stds)
    if b is None or a is None:
        return None
    sigmas = None if std is None else (a - b) / std if std else math.inf if a > b else -math.inf if a < b else 0.0
    return {"before": b, "after": a, "std": std, "gain_in_std": sigmas}


def _label(key: str) -> str:
    """A `_gain` key as the report names it: the learned numbers as they are, the held-out toy oracles as
    "oracle NAME"."""
    return key if key == "reward" or key.startswith("learned ") else f"oracle {key}"


def verdict(gain: dict[str, float] | None) -> str:
    """"met" / "missed" against `TARGET_GAIN_STD`, and "went down" for any number that fell (with or without a
    std)."""
    if not gain:
        return ""
    if gain["after"] < gain["before"]:
        return "went down"
    if gain["gain_in_std"] is None:
        return ""
    return "met" if gain["gain_in_std"] > TARGET_GAIN_STD else "missed"


def stage_findings(stage: str, gains: dict[str, Any]) -> list[str]:
    """The stage's target, met or missed, and every number that went down, as report lines."""
    lines = []
    target = gains.get(TARGET_KEY)
    if target:
        state = "met" if verdict(target) == "met" else "**missed**"
        lines.append(f"- Target, oracle {TARGET_KEY} above +{TARGET_GAIN_STD:.0f} std over seeds: {state} "
                     f"({target['before']:.3f} -> {target['after']:.3f}, {target['gain_in_std']:+.1f} std).")
    fell = [f"{_label(k)} ({g['before']:.4f} -> {g['after']:.4f}"
            + (f", {g['gain_in_std']:+.1f} std)" if g["gain_in_std"] is not None else ")")
            for k, g in gains.items() if verdict(g) == "went down"]
    if fell:
        lines.append(f"- **Went down** under {stage.upper()}: " + "; ".join(fell) + ".")
    return lines


def write_report(out: Path, summary: dict[str, Any]) -> None:
    lines = ["# Toy-world demo", "",
             "A tiny LLaVA-Reward model learns three perspectives of the toy world (coloured shapes); the toy "
             "generator is then fine-tuned on their weighted reward (alignment 1.0, fidelity 0.5 on raw scores; "
             "safety a gate: below 0 the reward is -3). The oracles read the truth from pixels and are "
             "never used in training.", ""]
    if "reward" in summary:
        lines += ["## Reward model (held-out toy data)", "", "| perspective | accuracy | metric | before training |"
                  f" train time | target >= {TARGET_ACCURACY:.2f} |", "|---|---|---|---|---|---|"]
        for name, entry in summary["reward"].items():
            met = "met" if entry["accuracy"] >= TARGET_ACCURACY else "**missed**"
            lines.append(f"| {name} | {entry['accuracy']:.3f} | {entry['metric']} (ties: {entry.get('tie_policy')})"
                         f" | {entry['accuracy_before']:.3f} | {entry['train_seconds']:.0f} s | {met} |")
        lines += ["", "![reward-model training curves](reward/training_curves.png)", ""]
    for stage in ("ddpo", "dpo"):
        if stage not in summary:
            continue
        lines += [f"## {stage.upper()} on the learned reward", "",
                  f"| number | before | after | gain in std over seeds | above +{TARGET_GAIN_STD:.0f} std |",
                  "|---|---|---|---|---|"]
        for key, gain in summary[stage].items():
            if gain:
                sigmas = "" if gain["gain_in_std"] is None else f"{gain['gain_in_std']:+.1f}"
                lines.append(f"| {_label(key)} | {gain['before']:.4f} | {gain['after']:.4f} | {sigmas} "
                             f"| {verdict(gain)} |")
        lines += ["", *stage_findings(stage, summary[stage])]
        lines += ["", f"The first {SAMPLE_PROMPTS} evaluation prompts (columns) for every evaluation seed (rows), "
                  "before training above after, and the training curves (per epoch, moving average, evaluations):",
                  "", f"![before above after]({stage}/eval_before_after.png)", "",
                  f"![{stage} training curves]({stage}/training_curves.png)", ""]
    lines += ["## What the numbers mean", "",
              "- *accuracy*: for pairs, the fraction of held-out pairs whose preferred image scores higher "
              "(ground-truth ties dropped); for safety, the fraction of labelled images classified right.",
              "- *reward*: the weighted learned reward on fixed evaluation prompts and seeds.",
              "- *oracle alignment*: the fraction of generated images whose colour and shape match the prompt, "
              "read from pixels; *oracle colour*: the named colour is present; *oracle shape*: the image's "
              "dominant colour draws the named shape (alignment needs both at once).",
              "- *learned NAME*: the mean raw score of that learned perspective (arbitrary units; higher is better).",
              "- *gain in std*: (after - before) / the larger std over evaluation seeds of the per-seed mean; "
              "above +3 counts as a real gain.",
              "", f"Total time: {summary['seconds']:.0f} s."]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    """`rlhf demo [--output_dir DIR] [--quick]`."""
    (config,) = parse_config(DemoConfig, argv)
    out = Path(config.output_dir)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    start, summary = time.perf_counter(), {}
    if "reward" in config.stages:
        print("== stage 1/3: training the reward perspectives (alignment, fidelity, safety)")
        _run(["train", "reward"], reward_stage(out, config.quick, config.seed), out / "configs" / "reward.yaml")
        summary["reward"] = json.loads((out / "reward" / "metrics.json").read_text())
    for number, stage in ((2, "ddpo"), (3, "dpo")):
        if stage not in config.stages:
            continue
        print(f"== stage {number}/3: fine-tuning the toy generator with {stage.upper()} on the learned reward")
        shutil.rmtree(out / stage, ignore_errors=True)  # a demo rerun starts over, never resumes a stale run
        stage_config = generator_stage(out, stage, config.quick, config.seed)
        _run(["train", stage], stage_config, out / "configs" / f"{stage}.yaml")
        metrics = json.loads((out / stage / "metrics.json").read_text())
        # the toy oracles: the held-out rewards the stage's tiny.yaml names
        keys = ["reward", *(f"learned {name}" for name in WEIGHTING["perspectives"]), *stage_config["heldout_rewards"]]
        summary[stage] = {key: _gain(metrics, key) for key in keys}
    summary["seconds"] = time.perf_counter() - start
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    write_report(out, summary)
    print((out / "report.md").read_text())
    return 0
