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
from svdquant.kernels.launch import launch

__all__ = ["rms_norm_rope", "supports"]

#: The split kernel's (head rows per program, num_warps): 64 rows of a 128-wide head = 16
#: KB of bf16 read and written per program. v36, H200 (``probe_rope.py --set
#: rope.PACKED=False --tiles``): 64x8 took 55.8 / 47.9 / 25.1 µs at a double block, a
#: single block and a 512² double block against this tile's 103.1 / 57.1 / 45.2 — kept
#: until its outputs are tested on the GPU at 64x8 (the packed kernel runs by default).
TILE = (64, 4)
#: Pairs packed in words (``_rms_norm_rope_packed_kernel``): the 16-bit rows read and
#: written as int32, cos / sin as int64, so every tile is [rows, D / 2] in one layout.
#: sm_90 SASS (``bench/sass_report.py --kernels rope,rope_packed``): no barrier, no
#: shared memory, every access 16 bytes, 77 registers at ``PACKED_TILE`` — against the
#: split kernel's 196 registers, 15 barriers and shared-memory round trips between the
#: bf16 and fp32 tiles' layouts (v35: ~1.1 TB/s). v36, H200 (``bench/probe_rope.py``): a
#: double block's q/k 103.1 → 47.3 µs, a single block's 57.4 → 51.9, the FLUX step
#: 104.4 → 101.9 ms (``bench/e2e.py --ab``). False: the split kernel.
#: Tensors whose strides or offsets are not whole words take the split kernel.
PACKED = True
#: Timed on the H200 (v36, ``probe_rope.py --tiles``) against 16x2, 32x2, 32x4, 32x8, 64x4
#: and 64x8: (16, 4) fastest at every case (a single block's q/k 52.0 → 41.0 µs).
PACKED_TILE = (16, 4)
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
):
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
def _half_to_f32(bits, DTYPE: tl.constexpr):
    """The 16-bit value (bf16 or fp16, in ``DTYPE``) held in the low half of int32
    ``bits``, as fp32."""
    return (bits & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)


@triton.jit
def _f32_to_half_bits(v, ROUND_BF16: tl.constexpr, DTYPE: tl.constexpr):
    """fp32 ``v`` rounded to ``DTYPE``, its 16 bits in the low half of an int32."""
    if ROUND_BF16:
        v = round_bf16(v)
    return v.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _rms_norm_rope_packed_kernel(
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
    DTYPE: tl.constexpr,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # ``PACKED``: every tensor read as one element per pair (2i, 2i + 1) — the 16-bit
    # rows as int32 words, cos / sin as int64 words — so that all tiles are [rows, D / 2]
    # with the same layout: no shuffle of a pair between threads, no layout change.
    # Pointers and strides are in those words (the launcher views the tensors so). A
    # kernel of its own: folded into ``_rms_norm_rope_kernel`` as a branch it changed the
    # measured split form's code (sm_90: 164 registers and 23 barriers instead of 196 and
    # 15); one of the two goes once the GPU has compared them.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = (rows < rows_total)[:, None]
    h = rows % H
    t = rows // H
    s = t % S_ALL
    b = (t // S_ALL).to(tl.int64)
    j = tl.arange(0, D // 2)[None, :]
    if HAS_HEAD:
        in_head = (s < S_HEAD)[:, None]
        from_head = head_ptr + (b * shb + s * shs + h * shh)[:, None] + j
        from_x = x_ptr + (b * sxb + (s - S_HEAD) * sxs + h * sxh)[:, None] + j
        src = tl.where(in_head, from_head, from_x)
    else:
        src = x_ptr + (b * sxb + s * sxs + h * sxh)[:, None] + j
    xp = tl.load(src, mask=rmask, other=0)
    xe = _half_to_f32(xp, DTYPE)
    xo = _half_to_f32(xp >> 16, DTYPE)
    rstd = tl.math.rsqrt(tl.sum(xe * xe + xo * xo, axis=1) / D + eps)[:, None]
    ye = xe * rstd
    yo = xo * rstd
    if HAS_W:
        wp = tl.load(w_ptr + j)
        if HAS_HEAD:
            wp = tl.where(in_head, tl.load(wh_ptr + j), wp)
        ye = ye * _half_to_f32(wp, DTYPE)
        yo = yo * _half_to_f32(wp >> 16, DTYPE)
    # the norm's output in the input's dtype, as diffusers hands it to the rotation
    ye = _half_to_f32(_f32_to_half_bits(ye, ROUND_BF16, DTYPE), DTYPE)
    yo = _half_to_f32(_f32_to_half_bits(yo, ROUND_BF16, DTYPE), DTYPE)
    cp = tl.load(cos_ptr + s[:, None] * scs + j, mask=rmask, other=0)
    sp = tl.load(sin_ptr + s[:, None] * sss + j, mask=rmask, other=0)
    ce = cp.to(tl.int32).to(tl.float32, bitcast=True)
    co = (cp >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    se = sp.to(tl.int32).to(tl.float32, bitcast=True)
    so = (sp >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    # out[2i] = y[2i]·cos[2i] − y[2i+1]·sin[2i]; out[2i+1] = y[2i+1]·cos[2i+1] + y[2i]·sin[2i+1]
    oe = _f32_to_half_bits(ye * ce - yo * se, ROUND_BF16, DTYPE)
    oo = _f32_to_half_bits(yo * co + ye * so, ROUND_BF16, DTYPE)
    dst = out_ptr + rows.to(tl.int64)[:, None] * (D // 2) + j
    tl.store(dst, oe | (oo << 16), mask=rmask)


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
    if PACKED and _launch_packed(x, weight, eps, cos, sin, head, head_weight, out):
        return out
    block_r, warps = TILE
    hd = head if head is not None else x
    w = weight if weight is not None else cos  # unread without HAS_W
    wh = head_weight if head_weight is not None else w
    launch(_rms_norm_rope_kernel, (cdiv(rows, block_r),),
        x, hd, w.contiguous(), wh.contiguous(), cos, sin, out,
        rows, s_head, s_all, h, float(eps),
        x.stride(0), x.stride(1), x.stride(2), hd.stride(0), hd.stride(1), hd.stride(2),
        cos.stride(0), sin.stride(0),
        HAS_HEAD=head is not None, HAS_W=weight is not None,
        ROUND_BF16=needs_bf16_rounding(x.dtype), D=d, BLOCK_R=block_r,
        num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def _words(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` viewed as words of ``dtype`` (pairs of its elements), or None if its strides
    or offset are not whole words."""
    if t is None:
        return None
    try:
        return t.view(dtype)
    except RuntimeError:
        return None


def _launch_packed(x, weight, eps, cos, sin, head, head_weight, out) -> bool:
    """``rms_norm_rope`` on the packed kernel; False (nothing launched) where a tensor
    cannot be viewed as words."""
    import triton.language as tl

    b, s, h, d = x.shape
    xw, ow = _words(x, torch.int32), _words(out, torch.int32)
    cw, sw = _words(cos.float(), torch.int64), _words(sin.float(), torch.int64)
    hw = _words(head, torch.int32) if head is not None else xw
    w = None if weight is None else _words(weight.contiguous(), torch.int32)
    wh = None if head_weight is None else _words(head_weight.contiguous(), torch.int32)
    if any(t is None for t in (xw, ow, cw, sw, hw)) or (weight is not None and w is None):
        return False
    if head_weight is not None and wh is None:
        return False
    w = w if w is not None else xw  # unread without HAS_W
    block_r, warps = PACKED_TILE
    rows = b * out.shape[1] * h
    launch(_rms_norm_rope_packed_kernel, (cdiv(rows, block_r),),
        xw, hw, w, wh if wh is not None else w, cw, sw, ow,
        rows, out.shape[1] - s, out.shape[1], h, float(eps),
        xw.stride(0), xw.stride(1), xw.stride(2), hw.stride(0), hw.stride(1), hw.stride(2),
        cw.stride(0), sw.stride(0),
        HAS_HEAD=head is not None, HAS_W=weight is not None,
        ROUND_BF16=needs_bf16_rounding(x.dtype),
        DTYPE=tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16, D=d,
        BLOCK_R=block_r, num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip
    return True
