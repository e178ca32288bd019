"""TRL 0.23's example scripts port by changing their imports.

Each test below is a minimal adaptation of the `__main__` block of one of TRL 0.23's scripts
(https://github.com/huggingface/trl, `examples/scripts/ddpo.py` and `examples/scripts/alignprop.py`): the same
calls in the same order (`HfArgumentParser((ScriptArguments, Config)).parse_args_into_dataclasses`, the
`project_kwargs` the scripts set, `DefaultDDPOStableDiffusionPipeline(model, pretrained_model_revision=...,
use_lora=...)`, the trainer's positional constructor with `image_samples_hook`, `train()`, `save_model(output_dir)`,
`push_to_hub(dataset_name=...)`), with our imports instead of `trl`'s. Two substitutions, both about weights this
offline suite cannot download: the tiny pipeline for `runwayml/stable-diffusion-v1-5`, and a built-in reward for the
LAION aesthetic scorer. The image hook keeps the scripts' unpacking but collects instead of logging to wandb.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from transformers import HfArgumentParser

from rlhf.rewards.reward_fn import build_reward  # was: the aesthetic scorer (downloads CLIP and an MLP)
from tests.conftest import reset_accelerator_state
from trainers import (  # was: from trl import ...
    AlignPropConfig, AlignPropTrainer, DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline,
)

pytestmark = pytest.mark.usefixtures("isolated_accelerator")

ANIMALS = ["cat", "dog", "horse"]


@dataclass
class ScriptArguments:
    """The scripts' own arguments (the fields they read)."""

    pretrained_model: str = field(default="runwayml/stable-diffusion-v1-5")
    pretrained_revision: str = field(default="main")
    hf_hub_model_id: str = field(default="ddpo-finetuned-stable-diffusion")
    use_lora: bool = field(default=True)


def prompt_fn():
    return np.random.choice(ANIMALS), {}


def run_script(config_class, trainer_class, argv: list[str], hook) -> None:
    """The scripts' `__main__`, with the tiny pipeline and a weight-free reward."""
    parser = HfArgumentParser((ScriptArguments, config_class))
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.project_kwargs = {
        "logging_dir": "./logs",
        "automatic_checkpoint_naming": True,
        "total_limit": 5,
        "project_dir": "./save",
    }
    pipeline = DefaultDDPOStableDiffusionPipeline(
        script_args.pretrained_model,
        pretrained_model_revision=script_args.pretrained_revision,
        use_lora=script_args.use_lora,
    )
    trainer = trainer_class(
        training_args, build_reward({"builtin": "brightness"}), prompt_fn, pipeline, image_samples_hook=hook
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name="unused")


COMMON = ["--num_epochs=1", "--sample_num_steps=2", "--train_batch_size=2", "--mixed_precision=no",
          "--eval_seeds", "0", "--eval_prompts", "cat", "--num_grid_images=0", "--push_to_hub=True"]


def test_trl_ddpo_script_runs_with_changed_imports(tiny_sd, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    logged = []

    def image_outputs_logger(image_data, global_step, accelerate_logger):  # the script's hook, collecting
        images, prompts, _, rewards, _ = image_data[-1]
        for i, image in enumerate(images):
            logged.append((f"{prompts[i]:.25} | {rewards[i].item():.2f}", image.unsqueeze(0).float().shape))

    argv = [f"--pretrained_model={tiny_sd}", "--sample_batch_size=2", "--sample_num_batches_per_epoch=1",
            "--per_prompt_stat_tracking=True", "--output_dir=out", *COMMON]
    run_script(DDPOConfig, DDPOTrainer, argv, image_outputs_logger)
    assert len(logged) == 2 and logged[0][1][0] == 1
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()  # save_model(output_dir)
    # the trainer writes under the scripts' project_dir only: the run, its checkpoint named by accelerate, the policy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "save"]
    assert (tmp_path / "save" / "checkpoints" / "checkpoint_0" / "trainer_state.json").is_file()
    assert (tmp_path / "save" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "uploading it needs network" in capsys.readouterr().out  # push_to_hub saves locally, says so


def test_trl_alignprop_script_runs_with_changed_imports(tiny_sd, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    logged = []

    def image_outputs_logger(image_pair_data, global_step, accelerate_logger):  # the script's hook, collecting
        images, prompts, _ = [image_pair_data["images"], image_pair_data["prompts"], image_pair_data["rewards"]]
        for i, image in enumerate(images[:4]):
            logged.append((prompts[i], image.unsqueeze(0).float().shape))

    argv = [f"--pretrained_model={tiny_sd}", "--train_gradient_accumulation_steps=1", "--output_dir=out", *COMMON]
    run_script(AlignPropConfig, AlignPropTrainer, argv, image_outputs_logger)
    assert logged and logged[0][0] in ANIMALS
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "save"]
    assert (tmp_path / "save" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "uploading it needs network" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- TRL's project_kwargs

# TRL 0.23's documented checkpointing: accelerate names checkpoints by save count under project_dir and keeps
# total_limit of them; `resume_from` may name the checkpoints folder (its highest checkpoint_<n> is taken)
TRL_PROJECT = {"automatic_checkpoint_naming": True, "total_limit": 1}


def ddpo_trainer(pipeline, **fields):
    config = DDPOConfig(sample_batch_size=2, sample_num_batches_per_epoch=1, train_clip_range=1e-2, **fields)
    return DDPOTrainer(config, brightness_reward, prompt_fn, pipeline)


def alignprop_trainer(pipeline, **fields):
    return AlignPropTrainer(AlignPropConfig(**fields), brightness_reward, prompt_fn, pipeline)


def dpo_trainer(pipeline, **fields):
    from trainers.dpo import DiffusionDPOConfig, DiffusionDPOTrainer

    config = DiffusionDPOConfig(sample_batch_size=4, sample_num_batches_per_epoch=1, group_size=2, **fields)
    return DiffusionDPOTrainer(config, pipeline, reward_function=brightness_reward, prompt_function=prompt_fn)


def brightness_reward(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3)), {}


@pytest.mark.parametrize("make", [ddpo_trainer, alignprop_trainer, dpo_trainer], ids=["ddpo", "alignprop", "dpo"])
def test_trl_project_kwargs_checkpoint_under_project_dir_and_resume_exactly(make, tiny_sd, tmp_path, monkeypatch):
    """TRL's documented `project_kwargs` end to end: every file under project_dir, accelerate's checkpoint names
    with total_limit kept, and a run resumed from the `checkpoints` folder ends with the uninterrupted run's LoRA."""
    
    from rlhf.generators.ddpo_pipeline import DDPOStableDiffusionPipeline

    monkeypatch.chdir(tmp_path)
    fields = dict(num_epochs=3, save_freq=1, sample_num_steps=2, train_batch_size=2, train_learning_rate=3e-3,
                  mixed_precision="no", num_grid_images=0)

    def trainer(project_dir: str, **extra):
        reset_accelerator_state()
        pipeline = DDPOStableDiffusionPipeline.from_pretrained(tiny_sd, lora_seed=0)
        return make(pipeline, project_kwargs={"project_dir": project_dir, **TRL_PROJECT}, **fields, **extra)

    uninterrupted = trainer("full")
    metrics = uninterrupted.train()
    expected = uninterrupted.sd_pipeline.policy_state_dict()
    assert metrics["eval_before"] is None and metrics["eval_after"] is None  # no eval_prompts: nothing sampled
    trainer("save").train(epochs=2)  # stops after epoch 1: checkpoint_0 and checkpoint_1 saved, one kept
    assert [p.name for p in (tmp_path / "save" / "checkpoints").iterdir()] == ["checkpoint_1"]
    resumed = trainer("save", resume_from="save/checkpoints")
    assert resumed.first_epoch == 2
    resumed.train()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "save"]  # nothing outside project_dir
    for run in ("full", "save"):
        assert [p.name for p in (tmp_path / run / "checkpoints").iterdir()] == ["checkpoint_2"]  # total_limit 1
        checkpoint = tmp_path / run / "checkpoints" / "checkpoint_2"
        assert json.loads((checkpoint / "trainer_state.json").read_text())["epoch"] == 2
        assert (checkpoint / "policy.safetensors").is_file() and (tmp_path / run / "lora").is_dir()
        assert not list((tmp_path / run).glob("*.png"))  # no evaluation grids nor curves: TRL's API drew none
    history = [json.loads(line) for line in (tmp_path / "save" / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [0, 1, 2]
    for name, value in resumed.sd_pipeline.policy_state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    assert any(value.abs().max() > 0 for name, value in expected.items() if "lora_B" in name)  # it trained


def test_resume_from_reads_trl_s_forms_of_a_checkpoint_path(tmp_path):
    """TRL 0.23 resumes from a `checkpoint_<n>` or the highest one in the folder given; ours also from the project
    directory above `checkpoints`, and refuses a folder without any, naming the field."""
    from trainers.common import Checkpointer

    for number in (2, 10, 9):  # numeric order: checkpoint_10 is the latest, not checkpoint_9
        (tmp_path / "checkpoints" / f"checkpoint_{number}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"checkpoint_{number}" / "trainer_state.json").write_text("{}")
    latest = tmp_path / "checkpoints" / "checkpoint_10"
    assert Checkpointer.resolve(tmp_path / "checkpoints") == latest  # TRL's documented form
    assert Checkpointer.resolve(tmp_path) == latest
    assert Checkpointer.resolve(tmp_path / "checkpoints" / "checkpoint_2") == tmp_path / "checkpoints" / "checkpoint_2"
    with pytest.raises(FileNotFoundError, match="resume_from"):
        Checkpointer.resolve(tmp_path / "empty")


def test_a_bad_project_kwargs_key_names_the_field(tmp_path):
    from trainers.common import build_accelerator

    with pytest.raises(ValueError, match="project_kwargs: .*automatic_checkpoint_namin"):
        build_accelerator(tmp_path, project_kwargs={"automatic_checkpoint_namin": True})
