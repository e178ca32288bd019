"""The `rlhf` command as a newcomer meets it: help for every command, typos, abbreviations, bad values, one run per
output directory, toy data that matches its config, and Ctrl-C."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainers.cli import COMMANDS, PLUG_INS, ToyDataConfig, main
from rlhf.config import ConfigError, build_parser, running_command
from rlhf.runs import claim_output_dir, resume_command

ROOT = Path(__file__).resolve().parents[1]


def _config_types(words: tuple[str, ...]) -> list[type]:
    """The dataclasses a command parses (found in its module: those with a field named in its --help), and those the
    `rlhf` command plugs into it (the toy data of `rlhf train reward`)."""
    module = importlib.import_module(COMMANDS[words][0].split(":")[0])
    plugged = [value for value in PLUG_INS.get(words, {}).values() if dataclasses.is_dataclass(value)]
    return [t for t in vars(module).values() if dataclasses.is_dataclass(t) and t.__module__ == module.__name__] + plugged


@pytest.mark.parametrize("words", list(COMMANDS), ids=lambda words: "_".join(words))
def test_every_command_prints_its_own_help_and_exits_zero(words, capsys):
    assert main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: rlhf {' '.join(words)} [--config FILE.yaml]")
    assert COMMANDS[words][1] in out  # the one-line description heads the help
    options = [line for line in out.splitlines() if line.startswith("  --")]
    assert options, "the help lists the command's fields"
    undocumented = [line.split()[0] for line in options if "(default:" in line and line.split("(default:")[0].strip()
                    == line.split()[0]]
    assert not undocumented, f"fields without a description: {undocumented}"


def test_every_config_field_has_a_description():
    seen = set()
    for words, (target, _) in COMMANDS.items():
        with running_command(f"rlhf {' '.join(words)}"):
            parser_types = [t for t in _config_types(words) if t.__name__.endswith(("Config", "Script"))]
        for kind in parser_types:
            if kind in seen:
                continue
            seen.add(kind)
            missing = [f.name for f in dataclasses.fields(kind) if not f.metadata.get("help")]
            assert not missing, f"{kind.__name__}: fields without help {missing}"
    assert len(seen) >= 10


def test_train_reward_help_leads_with_our_fields_then_trl_s(capsys):
    assert main(["train", "reward", "--help"]) == 0
    out = capsys.readouterr().out
    ours, toy, trl = (out.index(f"{name}:") for name in ("RewardTrainingScript (trainers)", "ToyDataConfig (trainers)",
                                                         "RewardConfig (trl)"))
    assert ours < out.index("--base_model ") < toy < out.index("--toy_data_n ") < trl < out.index("--learning_rate ")


def test_top_level_help_describes_each_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for words, (_, summary) in COMMANDS.items():
        assert f"rlhf {' '.join(words)}" in out and summary in out


@pytest.mark.parametrize("typed, suggested", [(["trian", "ddpo"], "rlhf train ddpo"), (["sore"], "rlhf score"),
                                              (["train", "alignpro"], "rlhf train alignprop")])
def test_a_mistyped_command_suggests_the_closest(typed, suggested, capsys):
    assert main(typed) == 2
    assert f"did you mean '{suggested}'?" in capsys.readouterr().err


def test_an_abbreviated_field_is_refused_with_the_full_name(capsys):
    assert main(["demo", "--qui", "--stages", "ddpo"]) == 2
    err = capsys.readouterr().err
    assert "unknown argument(s) ['--qui']" in err and "qui -> quick" in err


def test_a_bad_value_names_the_field_in_one_line(capsys):
    assert main(["train", "ddpo", "--num_epochs", "two"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "rlhf train ddpo: error: argument --num_epochs/--num-epochs: invalid int value: 'two'"


def test_the_parser_names_the_running_command():
    with running_command("rlhf demo", "the demo"):
        parser = build_parser(_config_types(("demo",)))
    assert parser.prog == "rlhf demo" and parser.description == "the demo" and parser.allow_abbrev is False


def test_score_refuses_data_together_with_images(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("")
    assert main(["score", "--model", str(tmp_path), "--data", str(rows), "--images", str(tmp_path)]) == 2
    assert "not both" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- run directories


def test_an_output_dir_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    (run / "history.jsonl").write_text('{"epoch": 0}\n')
    (run / "tiny_sd").mkdir()  # a cache, not a run output: kept
    claim_output_dir(tmp_path / "fresh", resuming=False, overwrite=False, resume_flag="--resume_from")
    with pytest.raises(ConfigError, match=r"already holds a run \(history.jsonl, checkpoints\).*--resume_from.*"
                                          r"--overwrite_output_dir"):
        claim_output_dir(run, resuming=False, overwrite=False, resume_flag="--resume_from")
    claim_output_dir(run, resuming=True, overwrite=False, resume_flag="--resume_from")
    assert (run / "history.jsonl").is_file()
    claim_output_dir(run, resuming=False, overwrite=True, resume_flag="--resume_from")
    assert sorted(p.name for p in run.iterdir()) == ["tiny_sd"]


@pytest.mark.parametrize("command", ["ddpo", "dpo", "alignprop", "reward"])
def test_every_training_command_refuses_a_used_output_dir(command, tmp_path, capsys):
    (tmp_path / "metrics.json").write_text("{}")
    config = ROOT / "configs" / command / ("toy.yaml" if command == "reward" else "tiny.yaml")
    assert main(["train", command, "--config", str(config), "--output_dir", str(tmp_path)]) == 2
    assert "already holds a run (metrics.json)" in capsys.readouterr().err


def test_resume_command_replaces_earlier_resume_and_overwrite_flags():
    with running_command("rlhf train ddpo"):
        command = resume_command(["--config", "c.yaml", "--overwrite_output_dir", "--resume_from", "old", "--seed",
                                  "1"], ["--resume_from", "runs/x"])
    assert command == "rlhf train ddpo --config c.yaml --seed 1 --resume_from runs/x"


def test_toy_data_of_another_size_is_rewritten_or_refused(tmp_path):
    from rlhf.toy import toy_data_size, write_toy_datasets

    root = tmp_path / "toy"
    write_toy_datasets(root, n=3, n_test=2, seed=0)
    ToyDataConfig(toy_data_dir=str(root), toy_data_n=4, toy_data_n_test=2).prepare()
    assert toy_data_size(root) == {"n": 4, "n_test": 2, "seed": 0}
    assert len((root / "alignment" / "train.jsonl").read_text().splitlines()) == 4
    (root / "toy_data.json").unlink()  # data of unknown origin and another size: not ours to rewrite
    with pytest.raises(ConfigError, match=r"holds 4 train / 2 test rows.*asks for 8 / 2"):
        ToyDataConfig(toy_data_dir=str(root), toy_data_n=8, toy_data_n_test=2).prepare()
    ToyDataConfig(toy_data_dir=str(root), toy_data_n=4, toy_data_n_test=2).prepare()  # same size: used


def test_a_resumed_progress_bar_counts_from_where_it_resumed():
    from trainers.common import epoch_progress

    bar = epoch_progress(2, 5, "epochs", enabled=False)
    assert (bar.n, bar.total, list(bar)) == (2, 5, [2, 3, 4])


# ------------------------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_ends_a_training_run_with_the_command_that_resumes(tmp_path):
    """SIGINT to `rlhf train ddpo` after its first checkpoint: exit 130, no traceback, the resume command."""
    output = tmp_path / "run"
    command = [sys.executable, "-m", "trainers.cli", "train", "ddpo", "--config", str(ROOT / "configs/ddpo/tiny.yaml"),
               "--pretrained_model", "tiny", "--output_dir", str(output), "--num_epochs", "100", "--save_freq", "1",
               "--sample_num_steps", "2", "--sample_batch_size", "2", "--sample_num_batches_per_epoch", "1",
               "--train_batch_size", "2", "--group_size", "2", "--eval_seeds", "0", "--eval_prompts",
               "a red circle on a white background", "--num_grid_images", "0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 240
    while not (output / "checkpoints" / "checkpoint_0" / "trainer_state.json").is_file():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert f"--resume_from {output}" in err.splitlines()[-1] and err.splitlines()[-1].strip().startswith(
        "rlhf train ddpo --config")
    assert json.loads((output / "checkpoints" / "checkpoint_0" / "trainer_state.json").read_text())["epoch"] == 0


def test_a_trainer_s_summary_line_says_what_went_down():
    from trainers.common import eval_reward_change

    # the toy oracles are held-out rewards (per_perspective "heldout/<name>"); a learned perspective is not listed
    before = {"reward_mean": 0.45, "reward_std": 0.1,
              "per_perspective": {"alignment": 1.0, "heldout/alignment": 0.45, "heldout/shape": 0.6}}
    after = {"reward_mean": 0.2, "reward_std": 0.1,
             "per_perspective": {"alignment": 0.5, "heldout/alignment": 0.2, "heldout/shape": 0.7}}
    line = eval_reward_change(before, after)
    assert "eval reward 0.4500 -> 0.2000 (WENT DOWN)" in line
    assert "heldout alignment 0.4500 -> 0.2000 (WENT DOWN)" in line and "1.0000" not in line
    assert "heldout shape 0.6000 -> 0.7000;" not in line and line.endswith("heldout shape 0.6000 -> 0.7000")


def test_eval_reward_picks_the_perspective_its_data_is_for(tmp_path):
    from trainers.reward_model import _perspectives_for

    data = tmp_path / "alignment" / "test.jsonl"
    (tmp_path / "metrics.json").write_text(json.dumps({"alignment": {"evaluated_on": str(data)},
                                                       "fidelity": {"evaluated_on": str(tmp_path / "f.jsonl")}}))
    assert _perspectives_for(str(data), str(tmp_path), ["alignment", "fidelity"]) == ["alignment"]
    assert _perspectives_for(str(data), str(tmp_path), ["safety"]) == ["safety"]
    with pytest.raises(ConfigError, match=r"pass --perspective NAME.*alignment: .*test.jsonl; fidelity: .*f.jsonl"):
        _perspectives_for(str(tmp_path / "other.jsonl"), str(tmp_path), ["alignment", "fidelity"])



# ------------------------------------------------------------------------------------------- pictures


def test_before_after_grid_puts_every_seed_of_a_few_labelled_prompts_before_above_after(tmp_path):
    import torch

    from trainers.common import GRID_CELL, LABEL_WIDTH, EvaluationSamples, labelled_grid

    prompts = ["a red circle on a white background", "a blue square on a black background"]
    before = EvaluationSamples(prompts, {0: torch.zeros(2, 3, 32, 32), 1: torch.zeros(2, 3, 32, 32)})
    after = EvaluationSamples(prompts, {0: torch.ones(2, 3, 32, 32), 1: torch.ones(2, 3, 32, 32)})
    before.save(tmp_path / "before.safetensors")
    loaded = EvaluationSamples.load(tmp_path / "before.safetensors")
    assert loaded.prompts == prompts and sorted(loaded.images) == [0, 1]
    image = labelled_grid([("before", loaded), ("after", after)])
    assert image.size == (LABEL_WIDTH + 2 * (GRID_CELL + 4), 40 + 4 * (GRID_CELL + 4))  # upscaled from 32 px
    centre = LABEL_WIDTH + GRID_CELL // 2
    rows = [image.getpixel((centre, 40 + row * (GRID_CELL + 4) + GRID_CELL // 2)) for row in range(4)]
    assert rows == [(0, 0, 0), (0, 0, 0), (255, 255, 255), (255, 255, 255)]  # both seeds before, then after
    label_area = image.crop((0, 40, LABEL_WIDTH, 40 + GRID_CELL))
    assert label_area.getextrema()[0][0] < 128, "the row is labelled"


def test_moving_average_is_trailing():
    from trainers.common import moving_average

    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
