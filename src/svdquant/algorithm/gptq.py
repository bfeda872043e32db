"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs
(Frantar et al., 2022). Used on SVDQuant's residual, it lowers the output error further.
"""

from __future__ import annotations

import math

import torch

from svdquant import formats

__all__ = ["gptq_quantize"]


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    fmt: str = "int4",
    *,
    block_size: int = 128,
    damp: float = 0.01,
) -> formats.QuantizedTensor:
    """Quantize ``w`` [N, K] into ``fmt``, minimizing ``‖x wᵀ − x Q(w)ᵀ‖`` over the inputs
    whose ``Σ xᵀx`` is ``hessian`` [K, K].

    Group scales are chosen when the quantization reaches a group's first column, from
    the columns as updated so far. ``damp`` (a fraction of the mean diagonal) keeps the
    Hessian invertible; input channels that never fired are quantized to zero.
    """
    f = formats.get_format(fmt)
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"the Hessian must be [{k}, {k}], got {tuple(hessian.shape)}")
    w = w.float().clone()
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    g = f.group_size
    ts = formats.group_scales(w, f)[1]  # the tensor scale (1 for int4)
    codes = torch.zeros(n, f.padded(k), dtype=torch.int8, device=w.device)
    scales = torch.zeros(n, f.padded(k) // g, dtype=f.scale_dtype, device=w.device)
    block = g * math.ceil(block_size / g)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        step = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                sc = formats.group_scales(w1[:, i : i + g], f, ts)[0][:, 0]
                scales[:, col // g] = sc
                step = sc.float() * ts
            v = torch.where(step > 0, w1[:, i] / step, torch.zeros_like(step))
            c = formats.round_codes(v, f)
            codes[:, col] = c
            err = (w1[:, i] - formats.code_values(c, f) * step) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return formats.QuantizedTensor(formats.pack(codes), scales, ts, f.name, torch.Size((n, k)))
