"""Gated attention pooling (Ilse et al. 2018), the scoring block shared by ABMIL and CLAM.

The gate ``sigmoid(W_b h)`` lets the network switch off dimensions on which ``tanh(W_a h)`` is saturated,
which the original paper found to rank instances better than plain tanh attention.
"""

from __future__ import annotations

import torch
from torch import nn


class GatedAttention(nn.Module):
    """Scores every instance: ``A = W_c(tanh(W_a h) * sigmoid(W_b h))``, one row per attention branch.

    Returns the *raw* scores (K, N); the caller applies the softmax over instances so it can keep both.
    """

    def __init__(self, in_dim: int = 512, hidden: int = 256, n_branches: int = 1, dropout: float = 0.25):
        super().__init__()
        self.a = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.b = nn.Sequential(nn.Linear(in_dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.c = nn.Linear(hidden, n_branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` (N, in_dim) → raw attention (K, N)."""
        return self.c(self.a(h) * self.b(h)).transpose(0, 1)
