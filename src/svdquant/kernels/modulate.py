"""Adaptive LayerNorm's modulation in one pass: ``layer_norm(x) · (1 + scale) + shift``.

Every FLUX block (and the final norm) normalizes its input without affine weights and
modulates it with a per-image scale and shift from the timestep embedding
(``AdaLayerNormZero``, ``AdaLayerNormZeroSingle``): three passes over [tokens, 3072] in
PyTorch (the norm, the product, the sum — ~115 of each per FLUX step). Here one program
normalizes whole rows and writes the modulated row once.

The numbers are diffusers' in bf16/fp16: the norm rounded to the input's dtype, then
``1 + scale``, the product and the sum each rounded as PyTorch's elementwise ops round
them. The mean and variance are summed in another order than PyTorch's, so a value may
differ by one unit in the last place where the rounding is close.
Reference: ``reference.layer_norm_modulate_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svdquant.kernels._triton_common import cdiv, needs_bf16_rounding, next_pow2, round_bf16

__all__ = ["layer_norm_modulate", "supports"]

#: Rows per program and num_warps. Not yet tuned on the GPU.
TILE = (2, 8)
#: The fused FLUX runtime (``svdquant.fuse_projections``) runs its blocks' adaptive norms
#: through this kernel when True. Off until measured on the GPU (``bench/e2e.py --set
#: modulate.ENABLED=True`` against the default, one host).
ENABLED = False
#: Widest row the kernel holds in registers.
MAX_C = 8192


def supports(c: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes rows of ``c`` values of ``dtype`` (16-bit, ``c`` up to
    ``MAX_C``)."""
    return 0 < c <= MAX_C and dtype in (torch.bfloat16, torch.float16)


@triton.jit
def _rnd(v, ROUND_BF16: tl.constexpr, DTYPE: tl.constexpr):
    """fp32 ``v`` rounded to the output dtype, back in fp32 (PyTorch's per-op rounding)."""
    if ROUND_BF16:
        v = round_bf16(v)
    return v.to(DTYPE).to(tl.float32)


@triton.jit
def _layer_norm_modulate_kernel(
    x_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    M,
    S,
    C,
    eps,
    stride_xm,
    stride_sb,
    stride_hb,
    ROUND_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    b = rows // S  # the image each token belongs to: its scale and shift
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)  # fmt: skip
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)
    dt = out_ptr.dtype.element_ty
    n = _rnd(xc * rstd[:, None], ROUND_BF16, dt)
    sc = tl.load(scale_ptr + b[:, None] * stride_sb + cols[None, :], mask=mask, other=0.0)
    sh = tl.load(shift_ptr + b[:, None] * stride_hb + cols[None, :], mask=mask, other=0.0)
    a = _rnd(1.0 + sc.to(tl.float32), ROUND_BF16, dt)
    y = _rnd(n * a, ROUND_BF16, dt)
    y = y + sh.to(tl.float32)
    if ROUND_BF16:
        y = round_bf16(y)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], y.to(dt), mask=mask)


def layer_norm_modulate(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
) -> torch.Tensor:
    """``layer_norm(x) · (1 + scale[:, None]) + shift[:, None]`` for ``x`` [B, S, C]
    (16-bit, rows with unit stride) and ``scale``/``shift`` [B, C] of ``x``'s dtype (views
    of the embedding's chunks are fine): the norm without affine weights, as FLUX's
    adaptive norms. Returns a new contiguous [B, S, C] tensor."""
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"layer_norm_modulate: x must be [B, S, C] with unit last stride, "
                         f"got shape {tuple(x.shape)}, strides {x.stride()}")  # fmt: skip
    b, s, c = x.shape
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape != (b, c) or t.stride(-1) != 1 or t.dtype != x.dtype:
            raise ValueError(f"layer_norm_modulate: {name} must be [{b}, {c}] {x.dtype} with "
                             f"unit last stride, got {tuple(t.shape)} {t.dtype}")  # fmt: skip
    if not supports(c, x.dtype):
        raise ValueError(f"layer_norm_modulate takes 16-bit rows of at most {MAX_C}, got "
                         f"{c} {x.dtype}")  # fmt: skip
    xr = x if x.stride(0) == s * x.stride(1) else x.contiguous()  # rows one stride apart
    out = torch.empty(b, s, c, dtype=x.dtype, device=x.device)
    m = b * s
    if m == 0:
        return out
    rows, warps = TILE
    _layer_norm_modulate_kernel[(cdiv(m, rows),)](
        xr, scale, shift, out, m, s, c, float(eps), xr.stride(1), scale.stride(0),
        shift.stride(0), ROUND_BF16=needs_bf16_rounding(x.dtype), BLOCK_C=next_pow2(c),
        ROWS=rows, num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return out
