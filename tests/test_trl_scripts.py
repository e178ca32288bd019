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

from dataclasses import dataclass, field

import numpy as np
import pytest
from transformers import HfArgumentParser

from rlhf.pipeline import DefaultDDPOStableDiffusionPipeline  # was: from trl import DefaultDDPOStableDiffusionPipeline
from rlhf.reward_fn import build_reward  # was: the aesthetic scorer (downloads CLIP and an MLP)
from trainers import AlignPropConfig, AlignPropTrainer, DDPOConfig, DDPOTrainer  # was: from trl import ...

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
    assert (tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").is_file()
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
    assert "uploading it needs network" in capsys.readouterr().out
