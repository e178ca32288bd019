"""Training loops on accelerate: the reward model, DDPO, Diffusion-DPO, AlignProp/DRaFT."""

from trainers.ddpo import DDPOConfig, DDPOTrainer

__all__ = ["DDPOConfig", "DDPOTrainer"]
