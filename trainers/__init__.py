"""Training loops on accelerate: the reward model, DDPO, Diffusion-DPO, AlignProp/DRaFT."""

from trainers.alignprop import AlignPropConfig, AlignPropTrainer
from trainers.ddpo import DDPOConfig, DDPOTrainer

__all__ = ["AlignPropConfig", "AlignPropTrainer", "DDPOConfig", "DDPOTrainer"]
