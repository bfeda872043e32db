"""Smoothing: migrate activation outliers into the weight, per input channel."""

from __future__ import annotations

import torch

__all__ = ["smooth_scales"]


def smooth_scales(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """The smoothing vector ``s = (max|x_j| / max|W_:,j|) ** alpha`` [K], fp32.

    The layer computes ``(x / s) (W s)ᵀ``: the same product, with activation outliers
    moved into the weight. At ``alpha = 0.5`` this is SmoothQuant's
    ``max|x|^α / max|W|^(1-α)``; unlike that formula it is the identity at ``alpha = 0``,
    so an α search over [0, 1] always contains "no smoothing" and can never do worse on
    its calibration data than leaving the layer alone. Channels that are all zero in
    ``x`` or ``W`` keep ``s = 1``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    ax, aw = act_amax.float(), weight_amax.float()
    live = (ax > 0) & (aw > 0)
    ratio = torch.where(live, ax / torch.where(live, aw, 1.0), 1.0)
    return ratio.pow(alpha)
