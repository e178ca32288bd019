"""An exponential moving average of a policy's trainable parameters (Flow-GRPO's EMA of the LoRA): updated after
each optimizer step, swapped in to evaluate and export, and saved with the checkpoints so a resumed run keeps it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class ParameterEMA:
    """An exponential moving average of parameters (float32 shadows), swapped in for evaluation and export."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float) -> None:
        self.parameters, self.decay = parameters, decay
        self.shadow = [p.detach().float().clone() for p in parameters]

    @torch.no_grad()
    def update(self) -> None:
        for shadow, parameter in zip(self.shadow, self.parameters):
            shadow.mul_(self.decay).add_(parameter.detach().float(), alpha=1 - self.decay)

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        saved = [p.detach().clone() for p in self.parameters]
        for shadow, parameter in zip(self.shadow, self.parameters):
            parameter.copy_(shadow)
        try:
            yield
        finally:
            for value, parameter in zip(saved, self.parameters):
                parameter.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): shadow.contiguous() for i, shadow in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA state: expected {len(self.shadow)} tensors, got {len(state)}")
        self.shadow = [state[str(i)].float().to(p.device) for i, p in enumerate(self.parameters)]
