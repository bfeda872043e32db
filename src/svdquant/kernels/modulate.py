"""Adaptive LayerNorm's modulation and gated residuals, one pass each.

Every FLUX block normalizes its input without affine weights and modulates it with a
per-image scale and shift from the timestep embedding (``AdaLayerNormZero``,
``AdaLayerNormZeroSingle``, the double blocks' ``norm2``): three passes over
[tokens, 3072] in PyTorch (the norm, the product, the sum — ~150 of each per FLUX step).
``layer_norm_modulate`` normalizes whole rows and writes the modulated row once. Each
branch's output joins the residual stream through a per-image gate,
``residual + gate · x`` (two passes in PyTorch, ~115 a step): ``gate_residual`` is one.
Where a sum feeds the next adaptive norm (a double block's attention output, then its
feed-forward's norm), ``gate_residual_modulate`` does both in one pass.

The numbers are diffusers' in bf16/fp16: the norm rounded to the input's dtype, then
``1 + scale``, the product and the sum each rounded as PyTorch's elementwise ops round
them. The mean and variance are summed in another order than PyTorch's, so a value may
differ by one unit in the last place where the rounding is close.
References: ``reference.layer_norm_modulate_ref``, ``reference.gate_residual_ref``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from svdquant.kernels._triton_common import cdiv, needs_bf16_rounding, next_pow2, round_bf16
from svdquant.kernels.launch import launch

__all__ = ["gate_residual", "gate_residual_modulate", "layer_norm_modulate", "supports"]

#: Rows per program and num_warps. H200 (v36, ``probe_modulate.py --tiles``): (1, 4) the
#: fastest of 1x4, 1x8, 2x4, 2x8, 4x8, 4x16 at the norms (~1 µs under 2x8), all equal at
#: the gates.
TILE = (1, 4)
#: The fused FLUX runtime (``svdquant.fuse_projections``) runs its blocks' adaptive norms
#: and gated residuals through these kernels when True (False: diffusers' ops in
#: diffusers' order). v36, H200, one process (``bench/e2e.py --ab``): the FLUX step
#: through ``cuda_graphed`` 104.1 → 96.5 ms (1.075×).
ENABLED = True
#: ``FusedFluxTransformerBlock`` adds each attention output to its stream and applies the
#: feed-forward's adaptive norm to the result in one kernel (``gate_residual_modulate``)
#: when True, with ``ENABLED``: one read of the stream (28 MB at 1024²) and one launch
#: fewer, twice a double block (38 a FLUX step). v37, H200: 30.7 µs against the two
#: kernels' 39.0 at 4096 tokens (``bench/probe_modulate.py``); the FLUX step through
#: ``cuda_graphed`` 93.8 → 93.5 ms (1.004×, ``bench/e2e.py --ab
#: modulate.FUSE_GATE_NORM=True``).
FUSE_GATE_NORM = True
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
def _modulated(x, mask, b, cols, C, eps, scale_ptr, shift_ptr, stride_sb, stride_hb,
               ROUND_BF16: tl.constexpr, DTYPE: tl.constexpr):  # fmt: skip
    """Rows ``x`` (fp32, whole rows) normalized and modulated by image ``b``'s scale and
    shift, each step rounded to ``DTYPE`` as PyTorch's ops round it (fp32 values)."""
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)
    n = _rnd(xc * rstd[:, None], ROUND_BF16, DTYPE)
    sc = tl.load(scale_ptr + b[:, None] * stride_sb + cols[None, :], mask=mask, other=0.0)
    sh = tl.load(shift_ptr + b[:, None] * stride_hb + cols[None, :], mask=mask, other=0.0)
    a = _rnd(1.0 + sc.to(tl.float32), ROUND_BF16, DTYPE)
    y = _rnd(n * a, ROUND_BF16, DTYPE)
    y = y + sh.to(tl.float32)
    if ROUND_BF16:
        y = round_bf16(y)
    return y


@triton.jit
def _gated(r, g, x, CLIP_FP16: tl.constexpr, ROUND_BF16: tl.constexpr, DTYPE: tl.constexpr):
    """``r + g · x`` (fp32 values of ``DTYPE`` tensors), the product rounded before the sum
    as PyTorch's two ops round; clipped to ±65504 where ``CLIP_FP16``."""
    y = r + _rnd(g.to(tl.float32) * x, ROUND_BF16, DTYPE)
    if ROUND_BF16:
        y = round_bf16(y)
    if CLIP_FP16:  # diffusers' clip of an fp16 residual stream to fp16's finite range
        y = tl.minimum(tl.maximum(y, -65504.0), 65504.0)
    return y


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
    dt = out_ptr.dtype.element_ty
    y = _modulated(x, mask, b, cols, C, eps, scale_ptr, shift_ptr, stride_sb, stride_hb,
                   ROUND_BF16, dt)  # fmt: skip
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], y.to(dt), mask=mask)


def _rowwise(kernel, inputs: tuple, like: torch.Tensor, scalars: tuple, outs: int = 1,
             **consts) -> Any:  # fmt: skip
    """``outs`` new [B, S, C] tensors shaped like ``like`` (one: the tensor; more: a tuple),
    written by ``kernel`` over their rows (``TILE`` rows a program):
    ``kernel(*inputs, *outs, B · S, S, C, *scalars, ...)``."""
    b, s, c = like.shape
    out = tuple(torch.empty(b, s, c, dtype=like.dtype, device=like.device) for _ in range(outs))
    if b * s:
        rows, warps = TILE
        launch(kernel, (cdiv(b * s, rows),),
            *inputs, *out, b * s, s, c, *scalars, **consts,
            ROUND_BF16=needs_bf16_rounding(like.dtype), BLOCK_C=next_pow2(c), ROWS=rows,
            num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
    return out[0] if outs == 1 else out


def _rows_evenly_apart(t: torch.Tensor) -> bool:
    """Whether the rows of [B, S, C] ``t`` are ``t.stride(1)`` apart throughout (the kernels
    index row ``b · S + s``): always for one image (a slice along S of a wider tensor
    too), else where the batch stride is S rows."""
    return t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1)


def _check_modulation(op: str, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``x`` [B, S, C] and ``scale``/``shift`` [B, C] of one 16-bit dtype, unit last
    strides, C at most ``MAX_C``: else a ``ValueError`` naming ``op``."""
    if x.dim() != 3 or x.stride(-1) != 1:
        raise ValueError(f"{op}: x must be [B, S, C] with unit last stride, "
                         f"got shape {tuple(x.shape)}, strides {x.stride()}")  # fmt: skip
    b, _, c = x.shape
    for name, t in (("scale", scale), ("shift", shift)):
        if t.shape != (b, c) or t.stride(-1) != 1 or t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} must be [{b}, {c}] {x.dtype} with "
                             f"unit last stride, got {tuple(t.shape)} {t.dtype}")  # fmt: skip
    if not supports(c, x.dtype):
        raise ValueError(f"{op} takes 16-bit rows of at most {MAX_C}, got {c} {x.dtype}")


def _check_gate(op: str, residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor) -> None:
    """``residual``, ``x`` [B, S, C] and ``gate`` [B, C] of one 16-bit dtype, unit last
    strides, C at most ``MAX_C``: else a ``ValueError`` naming ``op``."""
    for name, t in (("residual", residual), ("x", x)):
        if t.dim() != 3 or t.stride(-1) != 1 or t.shape != residual.shape:
            raise ValueError(f"{op}: {name} must be [B, S, C] like residual "
                             f"{tuple(residual.shape)} with unit last stride, got "
                             f"{tuple(t.shape)}, strides {t.stride()}")  # fmt: skip
    b, _, c = residual.shape
    if gate.shape != (b, c) or gate.stride(-1) != 1:
        raise ValueError(f"{op}: gate must be [{b}, {c}] with unit last stride, "
                         f"got {tuple(gate.shape)}")  # fmt: skip
    if not supports(c, residual.dtype) or not residual.dtype == gate.dtype == x.dtype:
        raise ValueError(f"{op} takes one 16-bit dtype and rows of at most {MAX_C}, "
                         f"got {residual.dtype}, {gate.dtype}, {x.dtype} and C = {c}")  # fmt: skip


def layer_norm_modulate(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
) -> torch.Tensor:
    """``layer_norm(x) · (1 + scale[:, None]) + shift[:, None]`` for ``x`` [B, S, C]
    (16-bit, rows with unit stride) and ``scale``/``shift`` [B, C] of ``x``'s dtype (views
    of the embedding's chunks are fine): the norm without affine weights, as FLUX's
    adaptive norms. Returns a new contiguous [B, S, C] tensor."""
    _check_modulation("layer_norm_modulate", x, scale, shift)
    xr = x if _rows_evenly_apart(x) else x.contiguous()
    scalars = (float(eps), xr.stride(1), scale.stride(0), shift.stride(0))
    return _rowwise(_layer_norm_modulate_kernel, (xr, scale, shift), x, scalars)


@triton.jit
def _gate_inputs(r_ptr, g_ptr, x_ptr, M, S, C, stride_rm, stride_gb, stride_xm,
                 BLOCK_C: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """This program's rows of the residual and the branch (fp32), their images' gates,
    and the tile's mask, images, 64-bit row indices and columns."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    b = rows // S
    r64 = rows.to(tl.int64)[:, None]
    r = tl.load(r_ptr + r64 * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + r64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b[:, None] * stride_gb + cols[None, :], mask=mask, other=0.0)
    return r, g, x, mask, b, r64, cols


@triton.jit
def _gate_residual_kernel(
    r_ptr,
    g_ptr,
    x_ptr,
    out_ptr,
    M,
    S,
    C,
    stride_rm,
    stride_gb,
    stride_xm,
    CLIP_FP16: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
):
    r, g, x, mask, _, r64, cols = _gate_inputs(r_ptr, g_ptr, x_ptr, M, S, C, stride_rm,
                                               stride_gb, stride_xm, BLOCK_C, ROWS)  # fmt: skip
    dt = out_ptr.dtype.element_ty
    y = _gated(r, g, x, CLIP_FP16, ROUND_BF16, dt)
    tl.store(out_ptr + r64 * C + cols[None, :], y.to(dt), mask=mask)


def gate_residual(
    residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, clip_fp16: bool = False
) -> torch.Tensor:
    """``residual + gate[:, None] · x`` for ``residual``, ``x`` [B, S, C] and ``gate``
    [B, C] of one 16-bit dtype (rows with unit stride; the gate may be a view of the
    embedding's chunk), the product rounded before the sum as PyTorch's two ops round;
    ``clip_fp16``: then clipped to ±65504 (diffusers' fp16 guard). Returns a new
    contiguous [B, S, C] tensor."""
    _check_gate("gate_residual", residual, gate, x)
    rr = residual if _rows_evenly_apart(residual) else residual.contiguous()
    xr = x if _rows_evenly_apart(x) else x.contiguous()
    scalars = (rr.stride(1), gate.stride(0), xr.stride(1))
    clip = clip_fp16 and x.dtype == torch.float16
    return _rowwise(_gate_residual_kernel, (rr, gate, xr), x, scalars, CLIP_FP16=clip)


@triton.jit
def _gate_residual_modulate_kernel(
    r_ptr,
    g_ptr,
    x_ptr,
    scale_ptr,
    shift_ptr,
    h_ptr,
    out_ptr,
    M,
    S,
    C,
    eps,
    stride_rm,
    stride_gb,
    stride_xm,
    stride_sb,
    stride_hb,
    CLIP_FP16: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
):
    r, g, x, mask, b, r64, cols = _gate_inputs(r_ptr, g_ptr, x_ptr, M, S, C, stride_rm,
                                               stride_gb, stride_xm, BLOCK_C, ROWS)  # fmt: skip
    dt = out_ptr.dtype.element_ty
    h = _gated(r, g, x, CLIP_FP16, ROUND_BF16, dt).to(dt)
    tl.store(h_ptr + r64 * C + cols[None, :], h, mask=mask)
    y = _modulated(h.to(tl.float32), mask, b, cols, C, eps, scale_ptr, shift_ptr, stride_sb,
                   stride_hb, ROUND_BF16, dt)  # fmt: skip
    tl.store(out_ptr + r64 * C + cols[None, :], y.to(dt), mask=mask)


def gate_residual_modulate(
    residual: torch.Tensor,
    gate: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    clip_fp16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = gate_residual(residual, gate, x, clip_fp16)`` and
    ``layer_norm_modulate(h, scale, shift, eps)`` in one pass: a FLUX double block's
    attention output joining the stream and the feed-forward's adaptive norm of the
    result, without writing ``h`` and reading it back in between. The same numbers as
    the two kernels. Returns the new contiguous (h, normed) [B, S, C] tensors."""
    _check_gate("gate_residual_modulate", residual, gate, x)
    _check_modulation("gate_residual_modulate", residual, scale, shift)
    rr = residual if _rows_evenly_apart(residual) else residual.contiguous()
    xr = x if _rows_evenly_apart(x) else x.contiguous()
    scalars = (float(eps), rr.stride(1), gate.stride(0), xr.stride(1), scale.stride(0),
               shift.stride(0))  # fmt: skip
    clip = clip_fp16 and x.dtype == torch.float16
    return _rowwise(_gate_residual_modulate_kernel, (rr, gate, xr, scale, shift), x, scalars,
                    outs=2, CLIP_FP16=clip)  # fmt: skip
