"""The 16-bit low-rank branch that absorbs the weight's outliers."""

from __future__ import annotations

import torch

__all__ = ["low_rank"]


def low_rank(w: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``w`` [N, K]: ``(down [r, K], up [N, r])``.

    ``up @ down`` is the truncated SVD ``U_r Σ_r V_rᵀ`` (``up = U_r Σ_r``,
    ``down = V_rᵀ``), rounded to ``dtype``: callers take the residual against the rounded
    factors, so the 4-bit residual also absorbs their rounding.
    """
    n, k = w.shape
    if rank > min(n, k):
        raise ValueError(f"rank {rank} is larger than min(N, K) = {min(n, k)} of this layer")
    if rank == 0:
        return w.new_zeros(0, k, dtype=dtype), w.new_zeros(n, 0, dtype=dtype)
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    return vh[:rank].to(dtype), (u[:, :rank] * s[:rank]).to(dtype)
