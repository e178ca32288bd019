"""The reward backend of RL: reward functions (`reward_fn`), multi-perspective weighting and the statistics
that turn rewards into advantages, the reward server, batch scoring and the official-checkpoint converter."""
