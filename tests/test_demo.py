"""`rlhf demo`: its report states every number with its gain in std over seeds, and links the PNGs it writes."""

from __future__ import annotations

import math

import pytest
import yaml

from trainers.cli import main as rlhf_main
from trainers.demo import CONFIGS, _gain, generator_stage, write_report


def evaluation(reward: float, reward_std: float, alignment: float, alignment_std: float) -> dict:
    """An evaluation as metrics.json holds it: the toy oracles are held-out rewards ("heldout/NAME")."""
    return {"reward_mean": reward, "reward_std": reward_std,
            "per_perspective": {"alignment": reward, "heldout/alignment": alignment, "heldout/colour": 0.5},
            "per_perspective_std": {"alignment": 0.3, "heldout/alignment": alignment_std, "heldout/colour": 0.0}}


def test_gain_is_measured_in_the_larger_std_over_seeds():
    metrics = {"eval_before": evaluation(0.0, 0.1, 0.4, 0.05), "eval_after": evaluation(0.6, 0.2, 0.5, 0.02)}
    assert _gain(metrics, "reward")["gain_in_std"] == pytest.approx(3.0)  # 0.6 / max(0.1, 0.2)
    assert _gain(metrics, "alignment")["gain_in_std"] == pytest.approx(2.0)  # 0.1 / 0.05
    assert _gain(metrics, "learned alignment") == {"before": 0.0, "after": 0.6, "std": None, "gain_in_std": None}
    assert _gain(metrics, "colour")["gain_in_std"] == 0.0  # equal with zero std: no gain
    assert _gain(metrics, "shape") is None
    metrics["eval_after"]["per_perspective"]["heldout/colour"] = 0.6
    assert _gain(metrics, "colour")["gain_in_std"] == math.inf


def test_report_lists_every_stage_with_its_pictures(tmp_path):
    metrics = {"eval_before": evaluation(0.0, 0.1, 0.4, 0.05), "eval_after": evaluation(0.6, 0.2, 0.5, 0.02)}
    summary = {
        "reward": {"alignment": {"accuracy": 0.94, "metric": "pairwise accuracy", "tie_policy": "drop",
                                 "accuracy_before": 0.5, "train_seconds": 80.0}},
        "ddpo": {key: _gain(metrics, key) for key in ("reward", "learned alignment", "alignment")},
        "seconds": 321.0,
    }
    write_report(tmp_path, summary)
    report = (tmp_path / "report.md").read_text()
    assert "| alignment | 0.940 | pairwise accuracy" in report
    assert "| oracle alignment | 0.4000 | 0.5000 | +2.0 |" in report and "| reward | 0.0000 | 0.6000 | +3.0 |" in report
    for picture in ("reward/training_curves.png", "ddpo/eval_before_after.png", "ddpo/training_curves.png"):
        assert f"({picture})" in report
    assert "DPO on the learned reward" not in report.replace("DDPO on the learned reward", "")


def test_demo_rejects_an_unknown_stage(capsys):
    assert rlhf_main(["demo", "--stages", "ddpo", "sampling"]) == 2
    assert "stages" in capsys.readouterr().err


def test_report_names_a_missed_target_and_what_went_down(tmp_path):
    """Oracle alignment +2.0 std misses the +3 target, and a learned reward that fell is called out."""
    before, after = evaluation(0.5, 0.1, 0.4, 0.05), evaluation(0.3, 0.1, 0.5, 0.02)
    metrics = {"eval_before": before, "eval_after": after}
    summary = {
        "reward": {"alignment": {"accuracy": 0.85, "metric": "pairwise accuracy", "tie_policy": "drop",
                                 "accuracy_before": 0.5, "train_seconds": 80.0}},
        "ddpo": {key: _gain(metrics, key) for key in ("reward", "alignment")},
        "seconds": 1.0,
    }
    write_report(tmp_path, summary)
    report = (tmp_path / "report.md").read_text()
    assert "| alignment | 0.850 | pairwise accuracy (ties: drop) | 0.500 | 80 s | **missed** |" in report
    assert "| oracle alignment | 0.4000 | 0.5000 | +2.0 | missed |" in report
    assert "Target, oracle alignment above +3 std over seeds: **missed** (0.400 -> 0.500, +2.0 std)" in report
    assert "**Went down** under DDPO: reward (0.5000 -> 0.3000, -2.0 std)." in report


@pytest.mark.parametrize("stage", ["ddpo", "dpo"])
@pytest.mark.parametrize("quick", [False, True])
def test_generator_stages_are_the_tiny_configs_but_for_the_demo_s_own_settings(stage, quick, tmp_path):
    """The tuned toy settings live in configs/<stage>/tiny.yaml alone: the demo changes only its run's own."""
    tiny = yaml.safe_load((CONFIGS / stage / "tiny.yaml").read_text())
    config = generator_stage(tmp_path, stage, quick, seed=3)
    own = {"output_dir", "seed", "reward", "num_epochs", "save_freq", "eval_seeds", "eval_prompts",
           "sample_guidance_scale"}
    assert {k: v for k, v in config.items() if k not in own} == {k: v for k, v in tiny.items() if k not in own}
    assert config["reward"]["model"] == str(tmp_path / "reward" / "model") and config["seed"] == 3
    assert config["sample_guidance_scale"] == 3.0  # the toy generator's best guidance (tiny.yaml's DPO: 5.0)
    # the oracles the report judges the stage by are the held-out rewards its tiny.yaml names
    assert set(config["heldout_rewards"]) >= {"alignment", "colour", "shape"}
