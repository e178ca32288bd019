"""Training loops on accelerate: the reward model, DDPO, GRPO, Diffusion-DPO, AlignProp/DRaFT."""

from trainers.alignprop import AlignPropConfig, AlignPropTrainer
from trainers.ddpo import DDPOConfig, DDPOTrainer
from trainers.grpo import GRPOConfig, GRPOTrainer

__all__ = ["AlignPropConfig", "AlignPropTrainer", "DDPOConfig", "DDPOTrainer", "GRPOConfig", "GRPOTrainer"]
