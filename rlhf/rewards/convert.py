"""`rlhf convert official`: a released LLaVA-Reward checkpoint into a RewardModel directory `from_pretrained` loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from reward import RewardModel
from rlhf.config import ConfigError, parse_config


@dataclass
class ConvertOfficialConfig:
    """Arguments of `rlhf convert official`: a released perspective directory onto its base, saved as ours."""

    checkpoint: str = field(default="", metadata={"help": "The released perspective's directory, holding "
                                                           "reward_config.yaml, lora/ and pytorch_model.bin (required)."})
    base: str = field(default="", metadata={"help": "Its base VLM, a path or a Hugging Face id in the local cache: "
                                                     "Phi-3.5-vision-instruct, Qwen2.5-VL-7B-Instruct or LLaVA-1.6, as "
                                                     "the checkpoint was trained on (required)."})
    perspective: str = field(default="overall", metadata={"help": "The name the perspective gets."})
    output_dir: str = field(default="", metadata={"help": "The RewardModel directory to write; converting into an "
                                                           "existing one adds the perspective beside those already "
                                                           "there, on the same base (required)."})
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16 for the base while "
                                                             "converting (the saved weights are float32)."})


def main(argv: list[str] | None = None) -> int:
    (config,) = parse_config(ConvertOfficialConfig, argv)
    for name in ("checkpoint", "base", "output_dir"):
        if not getattr(config, name):
            raise ConfigError(f"--{name} is required")
    output = Path(config.output_dir)
    if (output / "reward_model.json").is_file():
        model = RewardModel.from_pretrained(output, dtype=config.dtype)
        if Path(model.base).resolve() != Path(config.base).resolve():
            raise ConfigError(f"--output_dir {output} holds perspectives on base {model.base}, not {config.base}")
        if config.perspective in model.perspectives:
            raise ConfigError(f"--perspective {config.perspective!r} already exists in {output}; choose another name")
        model.load_official(config.checkpoint, config.perspective)
    else:
        model = RewardModel.from_official(config.checkpoint, config.base, config.perspective, dtype=config.dtype)
    model.save_pretrained(output, perspectives=[config.perspective])
    print(f"converted {config.checkpoint} -> {output} (perspective {config.perspective!r}, "
          f"perspectives there: {sorted(model.perspectives)})")
    return 0
