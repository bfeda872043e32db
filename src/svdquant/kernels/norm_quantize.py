"""An adaptive LayerNorm that writes the next layer's quantized input, in one kernel.

Every block of FLUX, PixArt-Σ and SANA feeds a quantized layer (the fused q/k/v, the
feed-forward's up projection) with ``layer_norm(x) · (1 + scale) + shift``. Run apart,
``modulate.layer_norm_modulate`` writes that 16-bit tensor and the layer's quantize
(``quantize.quantize_act``) reads it back: two launches, one [M, C] round trip through
memory, and — where the quantize splits K across programs — a fill kernel zeroing the
low-rank sums its programs add into. Here a program takes 16 or so whole rows: it walks
them once for the mean, once for the centred variance (as ``modulate`` computes them),
and a third time normalizing, modulating (each step rounded to the input's dtype as
PyTorch's ops round it), quantizing (``quantize.quantize_tile``) and accumulating the
low-rank down projection (``folded_lowrank_dot``); the rows are L2-resident after the
first walk. No K split: the low-rank sums are stored, not added, and need no zeroing.

The numbers are ``quantize_act(layer_norm_modulate(x, scale, shift, eps), ...)``'s but
for the mean and variance's order of summation (here step by step along the row), which
can move a normalized value by one unit in its last place where the rounding is close.
Reference: ``reference.norm_modulate_quantize_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svdquant.kernels._triton_common import (
    cdiv,
    folded_lowrank_dot,
    interpreting,
    needs_bf16_rounding,
    round_bf16,
)
from svdquant.kernels.modulate import _check_modulation, _rnd, _rows_evenly_apart
from svdquant.kernels.quantize import quantize_tile, rank_parts, rows_per_program

__all__ = ["norm_modulate_quantize"]

#: (rows per program, columns per step, num_warps): 16 rows, the low-rank MMA's least.
TILE = (16, 128, 4)


@triton.jit
def _norm_quantize_kernel(
    x_ptr, scale_ptr, shift_ptr, smooth_ptr, ld_ptr, act_ptr, xq_ptr, lora_ptr, M, S, C,
    K_OUT, R, eps, stride_xm, stride_sb, stride_hb, stride_qm, stride_ldr, stride_lm,
    INT4: tl.constexpr, HAS_LORA: tl.constexpr, EXACT: tl.constexpr,
    ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    b = rows // S  # the image each token belongs to: its scale and shift
    g = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    dt = x_ptr.dtype.element_ty
    # the row's mean, then its centred variance: two walks (the rows stay in L2)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        cols = k0 + g
        mask = rmask[:, None] & (cols < C)[None, :]
        total += tl.sum(tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32), 1)
    mean = total / C
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        cols = k0 + g
        mask = rmask[:, None] & (cols < C)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, x - mean[:, None], 0.0)
        sq += tl.sum(xc * xc, 1)
    rstd = tl.math.rsqrt(sq / C + eps)
    inv_act = tl.math.div_rn(1.0, tl.load(act_ptr))
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    q_rows = xq_ptr + rows.to(tl.int64)[:, None] * stride_qm
    for k0 in range(0, K_OUT, BLOCK_K):
        cols = k0 + g
        kmask = cols < C
        mask = rmask[:, None] & kmask[None, :]
        x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, x - mean[:, None], 0.0)
        n = _rnd(xc * rstd[:, None], ROUND_BF16, dt)
        sc = tl.load(scale_ptr + b[:, None] * stride_sb + cols[None, :], mask=mask, other=0.0)
        sh = tl.load(shift_ptr + b[:, None] * stride_hb + cols[None, :], mask=mask, other=0.0)
        y = _rnd(n * _rnd(1.0 + sc.to(tl.float32), ROUND_BF16, dt), ROUND_BF16, dt)
        y = y + sh.to(tl.float32)
        if ROUND_BF16:
            y = round_bf16(y)
        y16 = y.to(dt)  # the modulated row as the norm would have written it
        inv_s = tl.math.div_rn(1.0, tl.load(smooth_ptr + cols, mask=kmask, other=1.0))
        q = quantize_tile(y16.to(tl.float32) * inv_s[None, :], inv_act, INT4, EXACT, BLOCK_M,
                          BLOCK_K)  # fmt: skip
        tl.store(q_rows + cols[None, :], q, mask=rmask[:, None] & (cols < K_OUT)[None, :])
        if HAS_LORA:
            ld = tl.load(ld_ptr + rr[:, None] * stride_ldr + cols[None, :],
                         mask=(rr < R)[:, None] & kmask[None, :], other=0.0)  # fmt: skip
            acc = folded_lowrank_dot(y16, tl.trans(ld), inv_s, acc, EXACT)
    if HAS_LORA:
        lptr = lora_ptr + rows[:, None] * stride_lm + rr[None, :]
        tl.store(lptr, acc, mask=rmask[:, None] & (rr < R)[None, :])


def norm_modulate_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    act_scale: torch.Tensor,
    k_out: int,
    act_fmt: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_act(layer_norm_modulate(x, scale, shift, eps), smooth, lowrank_down,
    act_scale, k_out, act_fmt)`` in one kernel: ``x`` [B, S, C] (16-bit, unit last
    stride), ``scale``/``shift`` [B, C] of its dtype, the next layer's ``smooth`` [C],
    ``lowrank_down`` [r, C] (r at most 64), static activation scale and padded K
    (``k_out``), ``act_fmt`` ``"int4"`` or ``"fp8"``. Returns ``(xq fp8 [B · S, k_out],
    lora_act fp32 [B · S, r])``. Reference: ``reference.norm_modulate_quantize_ref``."""
    _check_modulation("norm_modulate_quantize", x, scale, shift)
    if act_fmt not in ("int4", "fp8"):
        raise ValueError(f"the fp8 engine quantizes activations to int4 or fp8, got {act_fmt!r}")
    b, s, c = x.shape
    r = lowrank_down.shape[0]
    if smooth.shape != (c,) or lowrank_down.dim() != 2 or lowrank_down.shape[1] != c:
        raise ValueError(f"norm_modulate_quantize: smooth must be [{c}] and lowrank_down "
                         f"[r, {c}], got {tuple(smooth.shape)} and "
                         f"{tuple(lowrank_down.shape)}")  # fmt: skip
    if k_out < c or k_out > cdiv(c, 64) * 64:
        raise ValueError(f"k_out = {k_out} must be the next layer's padded K for K = {c}")
    block_r, block_r2 = rank_parts(r)
    if block_r2 or block_r > 64:
        raise ValueError(f"norm_modulate_quantize takes a rank of at most 64, got {r}")
    m = b * s
    xq = torch.empty(m, k_out, dtype=torch.float8_e4m3fn, device=x.device)
    lora = torch.empty(m, r, dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, lora
    xr = x if _rows_evenly_apart(x) else x.contiguous()
    lowrank_down = lowrank_down.contiguous()
    block_m, block_k, warps = TILE
    block_m = rows_per_program(block_m, block_r)
    _norm_quantize_kernel[(cdiv(m, block_m),)](
        xr, scale, shift, smooth.float().contiguous(), lowrank_down,
        act_scale.float().reshape(1), xq, lora, m, s, c, k_out, r, float(eps), xr.stride(1),
        scale.stride(0), shift.stride(0), xq.stride(0), lowrank_down.stride(0) if r else 0,
        lora.stride(0) if r else 0,
        INT4=act_fmt == "int4", HAS_LORA=r > 0, EXACT=interpreting(),
        ROUND_BF16=needs_bf16_rounding(x.dtype), BLOCK_M=block_m, BLOCK_R=block_r,
        BLOCK_K=block_k, num_warps=warps, num_stages=1, enable_fp_fusion=False,
    )  # fmt: skip
    return xq, lora
