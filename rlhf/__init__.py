"""What RL needs from a reward and a sampler: reward functions, weighting, statistics, sampling with log-probs, search, serving, the toy world."""

import logging


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' notice that, without torchvision, an image processor falls back to its PIL version.

    diffusers' Stable Diffusion pipelines import `CLIPImageProcessor` (and transformers `SiglipImageProcessor`) at
    import time, so the notice printed twice on every `rlhf` command; the PIL processors are the ones this project
    runs on (torchvision is not a dependency), so the notice tells a user nothing. Only that message is dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
