"""Training loops on accelerate: the reward model, DDPO, GRPO, Diffusion-DPO, AlignProp/DRaFT; and, on top of them,
the `rlhf` command (`trainers.cli`) and the toy-world demo (`trainers.demo`).

The trainers are imported on first use, so that `rlhf --help` or `rlhf score` does not load every algorithm.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "AlignPropConfig": "trainers.alignprop",
    "AlignPropTrainer": "trainers.alignprop",
    "DDPOConfig": "trainers.ddpo",
    "DDPOTrainer": "trainers.ddpo",
    # TRL 0.23's pipeline classes, so that a TRL script ports by changing its `from trl import ...` line alone
    "DDPOStableDiffusionPipeline": "rlhf.generators.ddpo_pipeline",
    "DefaultDDPOStableDiffusionPipeline": "rlhf.generators.ddpo_pipeline",
    "GeneratorArguments": "trainers.command",
    "DiffusionDPOConfig": "trainers.dpo",
    "DiffusionDPOTrainer": "trainers.dpo",
    "DiffusionTrainerConfig": "trainers.base",
    "GRPOConfig": "trainers.grpo",
    "GRPOTrainer": "trainers.grpo",
    "RewardModelTrainer": "trainers.reward_model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainers' has no attribute {name!r}")
