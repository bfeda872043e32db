"""Activation quantize kernel: ``x`` -> fp8 GEMM operand + low-rank down projection.

One pass over ``x`` [M, K] (16-bit or fp32):

* ``x̂ = x · (1 / s)`` (the smoothing vector's reciprocal, exact per column),
* ``act_fmt="int4"``: the paper's int4 codes with fp16 scales per group of 64, written as
  ``fp8(code · s_group · (1 / S))`` against the static per-layer scale S, so the GEMM needs
  no per-group rescale of its accumulator; ``act_fmt="fp8"``: ``fp8(x̂ · (1 / S))`` (W4A8),
* ``lora_act = x̂ · L_downᵀ`` (fp32 sums of 16-bit products: x̂ is rounded to L_down's
  dtype, the 16-bit low-rank branch; ``lora_fp32=True``: fp32 x̂, for the W4A16 path
  whose output has no 4-bit error to hide this rounding), from the same registers.

Per element only multiplications: every division (``1/s``, ``1/s_group``, ``1/S``) is one
IEEE division per column, group or program. No row-wide reduction: each program owns one
[BLOCK_M, BLOCK_K] tile (a 2-D grid); the low-rank partial sums of the K tiles meet through
fp32 atomics. Reference: ``reference.quantize_act_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svdquant.kernels._triton_common import (
    dot16,
    dot_precision,
    interpreting,
    rint_even,
    round_e4m3,
)

__all__ = ["quantize_act", "quantize_tile"]

_GROUP = 64  # the int4 activation group (formats.FORMATS["int4"].group_size)

#: Tile shapes (BLOCK_K a multiple of 64) for few rows (M ≤ 64) and for many; tuned on the
#: H100 with ``bench/gemm.py --sweep``.
TILES = {"small": (16, 256, 4), "large": (64, 128, 4)}  # (BLOCK_M, BLOCK_K, num_warps)


@triton.jit
def quantize_tile(xh, inv_act, INT4: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The fp8 values (as fp32) of a [BLOCK_M, BLOCK_K] tile of x̂, BLOCK_K a multiple of 64.

    ``INT4``: the paper's codes, ``fp8(code · s_group · inv_act)``; else ``fp8(x̂ · inv_act)``.
    Shared with the GEMM epilogue that quantizes the next layer's input.
    """
    if INT4:
        NG: tl.constexpr = BLOCK_K // 64
        xg = tl.reshape(xh, [BLOCK_M, NG, 64])
        amax = tl.max(tl.abs(xg), axis=2)
        sg = tl.minimum(tl.math.div_rn(amax, 7.0), 65504.0).to(tl.float16).to(tl.float32)
        inv_sg = tl.where(sg > 0.0, tl.math.div_rn(1.0, tl.where(sg > 0.0, sg, 1.0)), 0.0)
        code = tl.minimum(tl.maximum(rint_even(xg * inv_sg[:, :, None]), -7.0), 7.0)
        code = tl.where(code == 0.0, 0.0, code)  # integer codes: no -0
        val = tl.reshape(code * sg[:, :, None], [BLOCK_M, BLOCK_K])
    else:
        val = xh
    return round_e4m3(val * inv_act)


@triton.jit
def _quantize_act_kernel(
    x_ptr,
    smooth_ptr,
    ld_ptr,
    scale_ptr,
    xq_ptr,
    lora_ptr,
    M,
    K,
    K_OUT,
    R,
    stride_xm,
    stride_qm,
    stride_ldr,
    stride_lm,
    INT4: tl.constexpr,
    HAS_LORA: tl.constexpr,
    ATOMIC: tl.constexpr,
    DOT_FP32: tl.constexpr,
    LORA_FP32: tl.constexpr,
    FP32_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < M
    kmask = cols < K
    x = tl.load(
        x_ptr + rows[:, None] * stride_xm + cols[None, :],
        mask=rmask[:, None] & kmask[None, :],
        other=0.0,
    ).to(tl.float32)
    inv_s = tl.math.div_rn(1.0, tl.load(smooth_ptr + cols, mask=kmask, other=1.0))
    xh = x * inv_s[None, :]
    q = quantize_tile(xh, tl.math.div_rn(1.0, tl.load(scale_ptr)), INT4, BLOCK_M, BLOCK_K)
    tl.store(
        xq_ptr + rows[:, None] * stride_qm + cols[None, :],
        q.to(tl.float8e4nv),
        mask=rmask[:, None] & (cols < K_OUT)[None, :],
    )
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        ld = tl.trans(  # loaded [BLOCK_R, BLOCK_K], contiguous along K: coalesced
            tl.load(
                ld_ptr + rr[:, None] * stride_ldr + cols[None, :],
                mask=(rr < R)[:, None] & kmask[None, :],
                other=0.0,
            )
        )
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        if LORA_FP32:
            acc = tl.dot(xh, ld.to(tl.float32), acc, input_precision=FP32_PREC)
        else:
            acc = dot16(xh, ld, acc, DOT_FP32)
        lptr = lora_ptr + rows[:, None] * stride_lm + rr[None, :]
        lmask = rmask[:, None] & (rr < R)[None, :]
        if ATOMIC:
            tl.atomic_add(lptr, acc, mask=lmask, sem="relaxed")
        else:
            tl.store(lptr, acc, mask=lmask)


def quantize_act(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    act_scale: torch.Tensor,
    k_out: int,
    act_fmt: str,
    lora_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations ``x`` [M, K] for the fp8 GEMM; see ``quantize_act_ref``.

    Returns ``(xq, lora_act)``: fp8 E4M3 [M, k_out] (``k_out`` ≥ K, the weight's padded K;
    extra columns are zero) and fp32 [M, r].
    """
    if act_fmt not in ("int4", "fp8"):
        raise ValueError(f"the fp8 engine quantizes activations to int4 or fp8, got {act_fmt!r}")
    m, k = x.shape
    r = lowrank_down.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    lowrank_down = lowrank_down.contiguous()
    smooth = smooth.float().contiguous()
    block_m, block_k, warps = TILES["small" if m <= 64 else "large"]
    k_tiles = triton.cdiv(max(k, k_out), block_k)
    xq = torch.empty(m, k_out, dtype=torch.float8_e4m3fn, device=x.device)
    lora = (torch.zeros if k_tiles > 1 else torch.empty)(m, r, dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, lora
    _quantize_act_kernel[(triton.cdiv(m, block_m), k_tiles)](
        x,
        smooth,
        lowrank_down,
        act_scale.float().reshape(1),
        xq,
        lora,
        m,
        k,
        k_out,
        r,
        x.stride(0),
        xq.stride(0),
        lowrank_down.stride(0) if r else 0,
        lora.stride(0) if r else 0,
        INT4=act_fmt == "int4",
        HAS_LORA=r > 0,
        ATOMIC=k_tiles > 1,
        DOT_FP32=interpreting(),
        LORA_FP32=lora_fp32,
        FP32_PREC=dot_precision(),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(max(r, 1))),
        num_warps=warps,
    )
    return xq, lora
