"""Skip-connection Cross Attention (SkipCA) and the scalar reward head of one perspective.

The reward token's hidden state attends back to the early visual tokens (the projector's output); padded
visual tokens are masked, so a sample's score never depends on what else is in its batch.
"""

from __future__ import annotations

import torch
from torch import nn


class SkipCrossAttention(nn.Module):
    """`RMSNorm(h + MultiHeadAttention(query=h, keys=values=visual tokens))` for one query per row."""

    def __init__(self, hidden_size: int, num_heads: int = 1, eps: float = 1e-6):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"skipca_heads: {num_heads} must divide the hidden size {hidden_size}")
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.norm = nn.RMSNorm(hidden_size, eps=eps)

    def forward(self, query: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
        """query [B, D]; visual [B, N, D]; visual_mask [B, N], True where a token is real. Returns [B, D]."""
        attended, _ = self.attention(
            query.unsqueeze(1), visual, visual, key_padding_mask=~visual_mask.bool(), need_weights=False
        )
        return self.norm(query + attended.squeeze(1))


class RewardHead(nn.Module):
    """SkipCA followed by a linear map to one scalar per row."""

    def __init__(self, hidden_size: int, num_heads: int = 1):
        super().__init__()
        self.skipca = SkipCrossAttention(hidden_size, num_heads)
        self.score = nn.Linear(hidden_size, 1)

    def forward(self, query: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
        return self.score(self.skipca(query, visual, visual_mask)).squeeze(-1)
