"""Attention's q/k preparation in one pass: per-head RMSNorm, then rotary embedding.

FLUX normalizes each head of q and k (``torch.nn.RMSNorm`` over the head dimension), puts
the text stream's heads before the image stream's (``torch.cat`` along the sequence) and
rotates them (diffusers' ``apply_rotary_emb``, pairs ``(2i, 2i+1)`` interleaved). Done as
diffusers does it, that is ~10 elementwise passes per tensor, several of them in fp32
(``float()``, ``neg``, ``stack``, two products, a sum, the cast back): on an H200 about a
fifth of a CUDA-graphed FLUX step at 1024² (``bench/e2e.py`` v35 profile), more than the
4-bit linears save. Here each head row is read once from where the projection wrote it
(the text part from its own tensor) and written once, rotated, into the concatenated
``[B, S_text + S, H, D]`` tensor attention reads.

The numbers are diffusers': the norm computed in fp32 and rounded to the input's dtype,
the rotation in fp32 products and one fp32 sum, rounded once (no fused multiply-add).
The norm's sum of squares is reduced in another order than PyTorch's, so a normalized
value can differ from diffusers' by one unit in the last place where the rounding is
close (and the rotation carries it into its pair).
Reference: ``reference.rms_norm_rope_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svdquant.kernels._triton_common import cdiv, needs_bf16_rounding, round_bf16

__all__ = ["rms_norm_rope", "supports"]

#: (head rows per program, num_warps): 64 rows of a 128-wide head = 16 KB of bf16 read and
#: written per program. Not yet tuned on the GPU.
TILE = (64, 4)
#: Rows as [pairs, 2] (``_norm_rope_pairs``) instead of ``tl.split``/``tl.join`` of 2-D
#: rows (v35's measured kernel: sm_90 SASS 196 registers, 15 barriers, shared-memory
#: round trips between the bf16 and fp32 tiles' layouts — ~1.1 TB/s). Not yet run on the
#: GPU: off until ``bench/probe_rope.py --set rope.PAIRS_3D=True`` says it is faster.
PAIRS_3D = False
#: The fused FLUX attention processor (``svdquant.fuse_projections``) runs this kernel;
#: False keeps diffusers' own norm, concatenation and rotation (``bench/e2e.py --set
#: rope.ENABLED=False``: what it saves).
ENABLED = True


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes heads of ``head_dim`` in ``dtype``: a power of two from 2
    to 512 (whole rows in registers, no column mask), 16-bit."""
    sixteen = (torch.bfloat16, torch.float16)
    return 2 <= head_dim <= 512 and head_dim & (head_dim - 1) == 0 and dtype in sixteen


@triton.jit
def _rms_norm_rope_kernel(
    x_ptr,
    head_ptr,
    w_ptr,
    wh_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    rows_total,
    S_HEAD,
    S_ALL,
    H,
    eps,
    sxb,
    sxs,
    sxh,
    shb,
    shs,
    shh,
    scs,
    sss,
    HAS_HEAD: tl.constexpr,
    HAS_W: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PAIRS_3D: tl.constexpr = False,
):
    if PAIRS_3D:
        _norm_rope_pairs(x_ptr, head_ptr, w_ptr, wh_ptr, cos_ptr, sin_ptr, out_ptr,
                         rows_total, S_HEAD, S_ALL, H, eps, sxb, sxs, sxh, shb, shs, shh, scs,
                         sss, HAS_HEAD, HAS_W, ROUND_BF16, D, BLOCK_R)  # fmt: skip
        return
    # One program: BLOCK_R output rows (b, s, h) of D values. A row's sequence position s
    # picks its source (the head tensor before S_HEAD, x after) and its norm weight.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < rows_total
    h = rows % H
    t = rows // H
    s = t % S_ALL
    b = (t // S_ALL).to(tl.int64)
    cols = tl.arange(0, D)
    if HAS_HEAD:
        in_head = s < S_HEAD
        from_head = head_ptr + (b * shb + s * shs + h * shh)[:, None] + cols[None, :]
        from_x = x_ptr + (b * sxb + (s - S_HEAD) * sxs + h * sxh)[:, None] + cols[None, :]
        src = tl.where(in_head[:, None], from_head, from_x)
    else:
        src = x_ptr + (b * sxb + s * sxs + h * sxh)[:, None] + cols[None, :]
    x = tl.load(src, mask=rmask[:, None], other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)  # as PyTorch's rsqrtf
    y = x * rstd[:, None]
    if HAS_W:
        w = tl.load(w_ptr + cols).to(tl.float32)
        if HAS_HEAD:
            wh = tl.load(wh_ptr + cols).to(tl.float32)
            w = tl.where(in_head[:, None], wh[None, :], w[None, :])
        y = y * w
    # the norm's output in the input's dtype, as diffusers hands it to the rotation
    if ROUND_BF16:
        y = round_bf16(y)
    y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
    trig = s[:, None] * scs + cols[None, :]
    c = tl.load(cos_ptr + trig, mask=rmask[:, None], other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + s[:, None] * sss + cols[None, :], mask=rmask[:, None], other=0.0)
    ye, yo = tl.split(tl.reshape(y, [BLOCK_R, D // 2, 2]))
    ce, co = tl.split(tl.reshape(c, [BLOCK_R, D // 2, 2]))
    se, so = tl.split(tl.reshape(sn.to(tl.float32), [BLOCK_R, D // 2, 2]))
    # out[2i] = y[2i]·cos[2i] − y[2i+1]·sin[2i]; out[2i+1] = y[2i+1]·cos[2i+1] + y[2i]·sin[2i+1]
    # (each product and the sum rounded in fp32: the fp-fusion flag is off at launch)
    oe = ye * ce - yo * se
    oo = yo * co + ye * so
    out = tl.reshape(tl.join(oe, oo), [BLOCK_R, D])
    if ROUND_BF16:
        out = round_bf16(out)
    dst = out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _norm_rope_pairs(
    x_ptr, head_ptr, w_ptr, wh_ptr, cos_ptr, sin_ptr, out_ptr, rows_total, S_HEAD, S_ALL, H,
    eps, sxb, sxs, sxh, shb, shs, shh, scs, sss, HAS_HEAD: tl.constexpr, HAS_W: tl.constexpr,
    ROUND_BF16: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """``PAIRS_3D``: the kernel's rows viewed as D / 2 pairs (2i, 2i + 1), loaded, rotated
    and stored in that [rows, pairs, 2] shape, so a pair stays in one thread's registers
    with no ``split``/``join`` of a 2-D row (sm_90 SASS: 96 registers and 6 barriers
    against 196 and 15 — but 4-byte accesses, threads along rows)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = (rows < rows_total)[:, None, None]
    h = rows % H
    t = rows // H
    s = t % S_ALL
    b = (t // S_ALL).to(tl.int64)
    col = (2 * tl.arange(0, D // 2))[None, :, None] + tl.arange(0, 2)[None, None, :]
    if HAS_HEAD:
        in_head = (s < S_HEAD)[:, None, None]
        from_head = head_ptr + (b * shb + s * shs + h * shh)[:, None, None] + col
        from_x = x_ptr + (b * sxb + (s - S_HEAD) * sxs + h * sxh)[:, None, None] + col
        src = tl.where(in_head, from_head, from_x)
    else:
        src = x_ptr + (b * sxb + s * sxs + h * sxh)[:, None, None] + col
    x = tl.load(src, mask=rmask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(tl.sum(x * x, axis=2), axis=1) / D + eps)
    y = x * rstd[:, None, None]
    if HAS_W:
        w = tl.load(w_ptr + col).to(tl.float32)
        if HAS_HEAD:
            w = tl.where(in_head, tl.load(wh_ptr + col).to(tl.float32), w)
        y = y * w
    if ROUND_BF16:
        y = round_bf16(y)
    y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
    c = tl.load(cos_ptr + s[:, None, None] * scs + col, mask=rmask, other=0.0).to(tl.float32)
    sn = tl.load(sin_ptr + s[:, None, None] * sss + col, mask=rmask, other=0.0).to(tl.float32)
    ye, yo = tl.split(y)
    ce, co = tl.split(c)
    se, so = tl.split(sn)
    out = tl.join(ye * ce - yo * se, yo * co + ye * so)
    if ROUND_BF16:
        out = round_bf16(out)
    dst = out_ptr + rows.to(tl.int64)[:, None, None] * D + col
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=rmask)


def _check(x: torch.Tensor, name: str) -> None:
    if x.dim() != 4 or x.stride(-1) != 1:
        raise ValueError(f"rms_norm_rope: {name} must be [B, S, H, D] with unit last stride, "
                         f"got shape {tuple(x.shape)}, strides {x.stride()}")  # fmt: skip


def rms_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rope(cat([rms_norm(head, head_weight), rms_norm(x, weight)], 1), cos, sin)``.

    ``x`` [B, S, H, D] and ``head`` [B, S_head, H, D] (optional: the text stream's heads,
    put first) are 16-bit with unit last stride (views of a projection's output are
    fine); ``weight`` / ``head_weight`` [D] or None (no affine); ``cos``, ``sin``
    [S_head + S, D] (fp32 in FLUX). Returns a new contiguous [B, S_head + S, H, D] tensor
    of ``x``'s dtype. Reference: ``reference.rms_norm_rope_ref``.
    """
    _check(x, "x")
    b, s, h, d = x.shape
    s_head = 0
    if head is not None:
        _check(head, "head")
        if (head.shape[0], head.shape[2], head.shape[3]) != (b, h, d) or head.dtype != x.dtype:
            raise ValueError(f"rms_norm_rope: head {tuple(head.shape)} {head.dtype} does not "
                             f"match x {tuple(x.shape)} {x.dtype}")  # fmt: skip
        s_head = head.shape[1]
        if (weight is None) != (head_weight is None):
            raise ValueError("rms_norm_rope: give weight and head_weight both or neither")
    if not supports(d, x.dtype):
        raise ValueError(f"rms_norm_rope takes a 16-bit x with a power-of-two head dim "
                         f"<= 512, got D = {d}, {x.dtype}")  # fmt: skip
    s_all = s_head + s
    if cos.shape != (s_all, d) or sin.shape != (s_all, d):
        raise ValueError(f"rms_norm_rope: cos/sin must be [{s_all}, {d}], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")  # fmt: skip
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    out = torch.empty(b, s_all, h, d, dtype=x.dtype, device=x.device)
    rows = b * s_all * h
    if rows == 0:
        return out
    block_r, warps = TILE
    hd = head if head is not None else x
    w = weight if weight is not None else cos  # unread without HAS_W
    wh = head_weight if head_weight is not None else w
    _rms_norm_rope_kernel[(cdiv(rows, block_r),)](
        x, hd, w.contiguous(), wh.contiguous(), cos, sin, out,
        rows, s_head, s_all, h, float(eps),
        x.stride(0), x.stride(1), x.stride(2), hd.stride(0), hd.stride(1), hd.stride(2),
        cos.stride(0), sin.stride(0),
        HAS_HEAD=head is not None, HAS_W=weight is not None,
        ROUND_BF16=needs_bf16_rounding(x.dtype), D=d, BLOCK_R=block_r, PAIRS_3D=PAIRS_3D,
        num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return out
