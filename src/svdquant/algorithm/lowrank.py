"""The 16-bit low-rank branch that absorbs the weight's outliers."""

from __future__ import annotations

import torch

__all__ = ["low_rank"]

#: Above this min(N, K) the truncated SVD is computed by a randomized range finder
#: (Halko et al. 2011) instead of a full SVD: FLUX's 3072 x 12288 layers need the top 32
#: directions only, for every α of the search.
EXACT_SVD_MAX = 1024


def _top_svd(w: torch.Tensor, rank: int, oversample: int = 16, iters: int = 4):
    n, k = w.shape
    if min(n, k) <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    g = torch.Generator(device=w.device).manual_seed(0)
    y = w @ torch.randn(k, rank + oversample, generator=g, device=w.device)
    for _ in range(iters):  # power iterations sharpen the top of the spectrum
        y = w @ (w.t() @ torch.linalg.qr(y).Q)
    q = torch.linalg.qr(y).Q
    ub, s, vh = torch.linalg.svd(q.t() @ w, full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank]


def low_rank(w: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``w`` [N, K]: ``(down [r, K], up [N, r])``.

    ``up @ down`` is the truncated SVD ``U_r Σ_r V_rᵀ`` (``up = U_r Σ_r``,
    ``down = V_rᵀ``), rounded to ``dtype``: callers take the residual against the rounded
    factors, so the 4-bit residual also absorbs their rounding. Large layers use a
    seeded randomized SVD (deterministic; see ``EXACT_SVD_MAX``).
    """
    n, k = w.shape
    if rank > min(n, k):
        raise ValueError(f"rank {rank} is larger than min(N, K) = {min(n, k)} of this layer")
    if rank == 0:
        return w.new_zeros(0, k, dtype=dtype), w.new_zeros(n, 0, dtype=dtype)
    u, s, vh = _top_svd(w.float(), rank)
    return vh.to(dtype), (u * s).to(dtype)
