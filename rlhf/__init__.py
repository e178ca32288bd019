"""What RL needs from a reward and a sampler: reward functions, weighting, statistics, sampling with log-probs, search, serving, the toy world."""
