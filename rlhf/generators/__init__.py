"""Fine-tunable text-to-image generators behind one interface (`GeneratorAdapter`), one module per family.

`load_generator(path)` picks the family from the pipeline class in the model's `model_index.json`, so a trainer
never names one; a new family is one module plus one `GENERATOR_FAMILIES` line. The families are imported on first
use (`rlhf.generators.ddpo_pipeline` and the SD adapter import this package's `base`).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from rlhf.generators.base import BASE_MODEL_FILE, GeneratorAdapter, StepResult

#: diffusers pipeline class (model_index.json's `_class_name`) -> "module:adapter class"
GENERATOR_FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "rlhf.generators.ddpo_pipeline:DDPOStableDiffusionPipeline",
    "StableDiffusionXLPipeline": "rlhf.generators.ddpo_pipeline:DDPOStableDiffusionPipeline",
    "StableDiffusion3Pipeline": "rlhf.generators.sd3:SD3Adapter",
    "FluxPipeline": "rlhf.generators.flux:FluxAdapter",
}

_LAZY_EXPORTS = {"SD3Adapter": "rlhf.generators.sd3", "FluxAdapter": "rlhf.generators.flux",
                 "FlowMatchingAdapter": "rlhf.generators.flow"}

__all__ = [
    "GENERATOR_FAMILIES", "FlowMatchingAdapter", "FluxAdapter", "GeneratorAdapter", "SD3Adapter", "StepResult",
    "generator_class", "load_generator",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'rlhf.generators' has no attribute {name!r}")


def _pipeline_class_name(pretrained_model_name: str | Path, revision: str) -> str:
    """The diffusers pipeline class of a model directory, a Hub name (read from the cache when offline), or a
    directory written by an adapter's `save_pretrained` (its base model's)."""
    from diffusers import DiffusionPipeline

    source = Path(pretrained_model_name)
    if (source / BASE_MODEL_FILE).is_file() and not (source / "model_index.json").is_file():
        record = json.loads((source / BASE_MODEL_FILE).read_text())
        return _pipeline_class_name(record["base_model"], record.get("revision", revision))
    try:
        config = DiffusionPipeline.load_config(str(pretrained_model_name), revision=revision)
    except OSError as error:  # no model_index.json there (or not in the cache when offline)
        raise ValueError(
            f"pretrained_model_name: {pretrained_model_name} is not a diffusers pipeline ({error})"
        ) from error
    if "_class_name" not in config:
        raise ValueError(f"pretrained_model_name: {pretrained_model_name}'s model_index.json names no pipeline class")
    return config["_class_name"]


def generator_class(pretrained_model_name: str | Path, revision: str = "main") -> type[GeneratorAdapter]:
    """The adapter class for a model, from its pipeline class; a `ValueError` naming the supported ones."""
    class_name = _pipeline_class_name(pretrained_model_name, revision)
    if class_name not in GENERATOR_FAMILIES:
        raise ValueError(
            f"pretrained_model_name: {pretrained_model_name} is a {class_name}; supported pipelines are "
            f"{sorted(GENERATOR_FAMILIES)}"
        )
    module_name, adapter_name = GENERATOR_FAMILIES[class_name].split(":")
    return getattr(importlib.import_module(module_name), adapter_name)


def load_generator(pretrained_model_name: str | Path, *, revision: str = "main", **options: Any) -> GeneratorAdapter:
    """The model as a `GeneratorAdapter` of its family: `Adapter.from_pretrained(pretrained_model_name, **options)`
    (`use_lora`, `lora_rank`, `torch_dtype`, ...; flow families also `sde_type`)."""
    adapter = generator_class(pretrained_model_name, revision)
    return adapter.from_pretrained(pretrained_model_name, revision=revision, **options)
