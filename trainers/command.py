"""A trainer's command, written once: the generator it loads (`GeneratorArguments`, `load_policy`), its prompts,
and `run_trainer_command` (parse the config, load, train, summarise). The top floor: the trainers' `main` functions
and the `rlhf` command use it; the trainers' Python API does not."""

from __future__ import annotations

import inspect
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from accelerate import PartialState

from trainers.base import DiffusionTrainerConfig
from trainers.common import build_process_reward, eval_reward_change, run_directory, training_command


@dataclass
class GeneratorArguments:
    """The generator a trainer's command loads. Kept out of the TRL-named configs because TRL 0.23's example
    scripts declare these names in their own `ScriptArguments`, parsed together with the config by one parser."""

    pretrained_model: str = field(
        default="",
        metadata={"help": "A diffusers pipeline path or hub id, or a saved policy directory (SD 1.x/2.x/SDXL, "
                  "SD3/3.5, FLUX.1); 'toy' or '' = the toy generator, "
                  "'toy-flow' = the toy flow generator (SD3); 'tiny', 'tiny-sd3', 'tiny-flux' = a random tiny "
                  "pipeline (plumbing only) (default '')."},
    )
    pretrained_revision: str = field(default="main", metadata={"help": "Hub revision (default 'main')."})
    use_lora: bool = field(
        default=True, metadata={"help": "Train a LoRA (True) or the whole denoiser (default True)."}
    )
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank (default 4)."})
    lora_alpha: float = field(default=4.0, metadata={"help": "LoRA alpha (default 4)."})
    sde_type: str = field(
        default="",
        metadata={"help": "The flow families' stochastic step ('flow_sde', 'dance', 'cps'), passed to the adapter; "
                  "'' = the family's default (DDIM has one) (default '')."},
    )


# `pretrained_model` names a command resolves itself: random tiny pipelines (plumbing only), built by these
# `rlhf.testing` functions under the run directory; and the committed toy generators (`trainers.cli.generator_path`,
# the names `rlhf search` takes too)
TINY_BUILDERS = {"tiny": "build_tiny_sd", "tiny-sd3": "build_tiny_sd3", "tiny-flux": "build_tiny_flux"}


def load_policy(arguments: Any, seed: int, output_dir: str) -> Any:
    """The generator adapter `arguments` (`GeneratorArguments` fields) names, its LoRA seeded by `seed`:
    `pretrained_model` 'toy' or '' = the toy generator, 'toy-flow' = the toy flow generator (SD3), a `TINY_BUILDERS` name = a
    random tiny pipeline built under `output_dir`, else any diffusers pipeline directory or hub id, or a directory
    a policy was saved to (the family read from it by `rlhf.generators.load_generator`)."""
    from rlhf import testing
    from rlhf.generators import generator_class
    from trainers.cli import generator_path

    name = arguments.pretrained_model
    if name in TINY_BUILDERS:
        path = Path(output_dir) / TINY_BUILDERS[name].removeprefix("build_")
        with PartialState().main_process_first():
            if not (path / "model_index.json").is_file():
                getattr(testing, TINY_BUILDERS[name])(path, seed=seed)
        name = str(path)
    else:
        name = generator_path(name or "toy")
    adapter = generator_class(name, arguments.pretrained_revision)
    options: dict[str, Any] = dict(use_lora=arguments.use_lora, lora_rank=arguments.lora_rank,
                                   lora_alpha=arguments.lora_alpha, lora_seed=seed)
    sde_type = getattr(arguments, "sde_type", "")
    if sde_type:
        if "sde_type" not in inspect.signature(adapter.__init__).parameters:
            raise ValueError(f"sde_type: {adapter.__name__} has one stochastic step; leave sde_type ''")
        options["sde_type"] = sde_type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' deprecation notices while loading
        return adapter.from_pretrained(name, revision=arguments.pretrained_revision, **options)


def load_training_prompts(config: DiffusionTrainerConfig) -> list[str]:
    """The prompts list, else the prompts file (one per line), else 256 random toy prompts."""
    if config.prompts and config.prompts_file:
        raise ValueError("prompts and prompts_file: give one or the other")
    if config.prompts_file:
        path = Path(config.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file: no such file {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts_file: {path} holds no prompts")
        return prompts
    if config.prompts:
        return list(config.prompts)
    from rlhf.toy import toy_prompts

    return toy_prompts(256, seed=config.seed)


def load_run_prompts(config: DiffusionTrainerConfig) -> list[str]:
    """`load_training_prompts`; without `eval_prompts`, the run evaluates on the first 8 of them, unless they are
    toy prompts (a toy config names its evaluation prompts, as configs/*/tiny.yaml do)."""
    prompts = load_training_prompts(config)
    if not config.eval_prompts and not are_toy_prompts(prompts):
        config.eval_prompts = prompts[:8]
    return prompts


def are_toy_prompts(prompts: Sequence[str]) -> bool:
    """Whether every prompt names a toy colour and shape (so the toy oracles can judge its images): the
    command floor's toy fallback, which the trainers themselves never see."""
    from rlhf import toy

    try:
        for prompt in prompts:
            toy.parse_prompt(prompt)
    except ValueError:
        return False
    return True


def uniform_prompt_function(prompts: list[str]) -> Callable[[], tuple[str, dict]]:
    """A TRL-style prompt function drawing uniformly with Python's `random` (reseeded per epoch by the trainer)."""

    def draw() -> tuple[str, dict]:
        return random.choice(prompts), {}

    return draw


def run_trainer_command(argv: list[str], config_class: type, trainer_class: type, **reward_defaults: Any) -> int:
    """A command around a trainer with TRL's `(config, reward_function, prompt_function, generator)` constructor:
    parse `GeneratorArguments` + `config_class`, load the generator (any family), train in a claimed output
    directory, push if asked, summarise. `reward_defaults` fill what the config's reward block leaves out."""
    from rlhf.config import parse_config

    generator, config = parse_config([GeneratorArguments, config_class], argv)
    config.validate()
    with training_command(argv, config):
        prompts = load_run_prompts(config)
        reward = build_process_reward(config.reward, **reward_defaults)
        policy = load_policy(generator, config.seed, str(run_directory(config)))
        trainer = trainer_class(config, reward, uniform_prompt_function(prompts), policy)
        trainer.write_curves = True  # the command draws training_curves.png; the Python API leaves it to the caller
        trainer.outputs.save_config([generator, config])
        metrics = trainer.train()
    if config.push_to_hub:
        trainer.push_to_hub()
    if trainer.accelerator.is_main_process:
        if metrics["eval_before"] and metrics["eval_after"]:
            summary = eval_reward_change(metrics["eval_before"], metrics["eval_after"])
        else:
            summary = (f"last epoch reward {trainer.last_row.get('reward_mean', float('nan')):.4f} "
                       "(no eval_prompts: no evaluation)")
        print(f"{summary}; outputs in {run_directory(config)}")
    return 0
