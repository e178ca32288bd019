"""The committed, pre-trained toy generators, for trainers, benchmarks and examples that need a base model that
draws the toy world (`rlhf.toy`) imperfectly, so RL has room to improve it, without any download.

- the toy generator: Stable Diffusion 1.x layout (`StableDiffusionPipeline`), `rlhf toy pretrain`;
- the toy flow generator: Stable Diffusion 3 layout (`StableDiffusion3Pipeline`, rectified flow), the base model of
  flow-matching RL (GRPO), `rlhf toy pretrain --family sd3`.

Each is a diffusers `save_pretrained` directory with `toy_generator.json` (its measured oracle numbers, the command
that made it) and `samples.png` beside the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

from rlhf.testing import load_toy_generator, toy_generator_path

__all__ = [
    "TOY_FLOW_GENERATOR_DIR",
    "load_toy_flow_generator",
    "load_toy_generator",
    "toy_flow_generator_path",
    "toy_generator_path",
]

TOY_FLOW_GENERATOR_DIR = Path(__file__).resolve().parent / "assets" / "toy_flow_generator"


def toy_flow_generator_path() -> Path:
    """The committed toy flow generator (a `StableDiffusion3Pipeline` directory); pass it wherever a model name or
    path of an SD3 pipeline is expected (`StableDiffusion3Pipeline.from_pretrained`, a trainer's pretrained_model)."""
    if not (TOY_FLOW_GENERATOR_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"toy flow generator not found at {TOY_FLOW_GENERATOR_DIR}; rebuild it with "
            f"`rlhf toy pretrain --family sd3 --output_dir {TOY_FLOW_GENERATOR_DIR}`"
        )
    return TOY_FLOW_GENERATOR_DIR


def load_toy_flow_generator(dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """The committed toy flow generator as a `StableDiffusion3Pipeline`, on the CPU with progress bars off."""
    pipeline = StableDiffusion3Pipeline.from_pretrained(toy_flow_generator_path(), dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
