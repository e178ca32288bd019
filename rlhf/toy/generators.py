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
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

__all__ = ["load_toy_flow_generator", "load_toy_generator", "toy_flow_generator_path", "toy_generator_path"]

ASSETS = Path(__file__).resolve().parent / "assets"


def _committed(name: str, pretrain_options: str) -> Path:
    """The committed generator directory `assets/<name>`, or an error saying how to rebuild it."""
    directory = ASSETS / name
    if not (directory / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{name.replace('_', ' ')} not found at {directory}; rebuild it with "
            f"`rlhf toy pretrain {pretrain_options}--output_dir {directory}`"
        )
    return directory


def _load(pipeline_class: type[DiffusionPipeline], path: Path, dtype: torch.dtype) -> DiffusionPipeline:
    pipeline = pipeline_class.from_pretrained(path, dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def toy_generator_path() -> Path:
    """The committed toy generator (a `StableDiffusionPipeline` directory; see `rlhf toy pretrain`)."""
    return _committed("toy_generator", "")


def load_toy_generator(dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The committed toy generator as a `StableDiffusionPipeline`, on the CPU with progress bars off."""
    return _load(StableDiffusionPipeline, toy_generator_path(), dtype)


def toy_flow_generator_path() -> Path:
    """The committed toy flow generator (a `StableDiffusion3Pipeline` directory); pass it wherever a model name or
    path of an SD3 pipeline is expected (`StableDiffusion3Pipeline.from_pretrained`, a trainer's pretrained_model)."""
    return _committed("toy_flow_generator", "--family sd3 ")


def load_toy_flow_generator(dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """The committed toy flow generator as a `StableDiffusion3Pipeline`, on the CPU with progress bars off."""
    return _load(StableDiffusion3Pipeline, toy_flow_generator_path(), dtype)
