"""Synthetic layers with planted outliers, as in real diffusion models (tests, examples).

Random weights have no outliers, so they cannot show what smoothing and the low-rank
branch are for. These helpers plant both kinds the paper describes: a few activation
channels 20-100x larger than the rest, and a few weight entries 30x larger.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["planted_outlier_inputs", "planted_outlier_layer"]


def planted_outlier_inputs(m: int, k: int = 512, *, generator: torch.Generator) -> torch.Tensor:
    """``m`` activations [m, k] whose first 8 channels are 20-100x larger than the rest."""
    x = torch.randn(m, k, generator=generator)
    x[:, :8] *= torch.linspace(20, 100, 8)
    return x


def planted_outlier_layer(k: int = 512, n: int = 384, seed: int = 0) -> nn.Linear:
    """``nn.Linear(k, n)``, weights N(0, 0.02) with 40 entries 30x larger, a small bias."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
        idx = torch.randperm(n * k, generator=g)[:40]
        lin.weight.view(-1)[idx] *= 30
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return lin
