"""Skip-connection Cross Attention (SkipCA) and the reward head of one perspective: ours, and the official one.

Ours: the reward token's hidden state attends back to the early visual tokens (the projector's output); padded
visual tokens are masked, so a sample's score never depends on what else is in its batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence


def padded_keys(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image visual tokens [N_i, D] -> keys [B, max N_i, D] (float32, zero-padded) and their mask [B, max N_i]."""
    keys = pad_sequence([f.float() for f in features], batch_first=True)
    mask = pad_sequence([torch.ones(len(f), dtype=torch.bool, device=keys.device) for f in features], batch_first=True)
    return keys, mask


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


class OfficialHead(nn.Module):
    """The head of a released LLaVA-Reward checkpoint, computed as the official code computes it.

    Single-head attention with bias-free `W_q`/`W_k`/`W_v`, no output projection, scale 1/sqrt(hidden); the
    residual goes through `ca_layernorm` (RMSNorm, the family's epsilon); a bias-free `value_head` gives 1 value
    (Bradley-Terry) or `value_head_dim` values (General Preference). Without SkipCA (`skipca=False`, the official
    LLaVA-1.6 forward) the value head reads the hidden state directly. A row with no keys gets no attention term,
    which is what the official softmax over zero (or only masked) keys adds.
    """

    def __init__(self, hidden_size: int, skipca: bool, norm_eps: float, value_head_dim: int = 1):
        super().__init__()
        self.skipca = skipca
        if skipca:
            self.W_q = nn.Linear(hidden_size, hidden_size, bias=False)
            self.W_k = nn.Linear(hidden_size, hidden_size, bias=False)
            self.W_v = nn.Linear(hidden_size, hidden_size, bias=False)
            self.ca_layernorm = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.value_head = nn.Linear(hidden_size, value_head_dim, bias=False)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """query [B, D]; keys [B, N, D] (N may be 0); key_mask [B, N], True where a key is real.
        Returns [B, value_head_dim]."""
        if self.skipca:
            logits = torch.einsum("bd,bnd->bn", self.W_q(query), self.W_k(keys)) / math.sqrt(query.shape[-1])
            mask = key_mask.bool()
            weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
            weights = weights.masked_fill(~mask, 0.0)  # a row with no real key (NaN softmax) attends to nothing
            attended = torch.einsum("bn,bnd->bd", weights, self.W_v(keys))
            query = self.ca_layernorm(query + attended)
        return self.value_head(query)
