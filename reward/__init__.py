"""LLaVA-Reward: a VLM that scores an image against its prompt from its own hidden states, one LoRA perspective each."""

from .model import PerspectiveConfig, RewardModel

__all__ = ["PerspectiveConfig", "RewardModel"]
