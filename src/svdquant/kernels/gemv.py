"""W4A16 GEMV: 4-bit weights, 16-bit activations, for a few tokens (M = 1..16).

For the linears whose activations stay 16-bit (``act_fmt="none"``; FLUX's AdaLayerNorm
modulation linears run at M = batch size). Memory-bound: each program streams a block of
weight rows once (0.5 byte per weight plus the group scales) and the tensor cores do the
sums, ``yᵀ = W · x̂ᵀ`` with x̂ padded to 16 columns:

* the codes go into the MMA as they are (small integers, exact in bf16), low nibbles and
  high nibbles as two operands against x̂'s even and odd columns, so nothing is
  interleaved in registers; an int4 group (64 wide, one per step) is scaled after its
  MMA, an nvfp4 value is scaled before it (E2M1 × E4M3 is exact in bf16);
* x̂ = x · (1/s) enters as two bf16 parts, ``hi + lo`` (16 significant bits, fp32-like
  accuracy), so the 16-bit MMA adds no visible rounding;
* the next step's bytes are loaded before this step's decode, and K is split into short
  chunks (a few steps, ``TILES``) so that many programs are in flight: a program's steps
  form a dependent chain, and with few steps each the GPU hides its latency by running
  others. The partial sums meet in an fp32 buffer through atomics.

``y = (x̂ · (code · s_group)ᵀ) · s_tensor + lora_act · L_upᵀ + b``; ``lora_act = x̂ · L_downᵀ``
(fp32, [M, r]) comes from a small kernel before it, the rest is this kernel's epilogue.
Reference: ``reference.w4a16_linear_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svdquant import formats
from svdquant.kernels._triton_common import (
    dot_precision,
    e2m1_value,
    int4_value,
    interpreting,
    needs_bf16_rounding,
    round_bf16,
)

__all__ = ["MAX_GEMV_M", "w4a16_linear"]

#: Largest M the GEMV kernel takes (the padded width of its ``tl.dot``).
MAX_GEMV_M = 16

#: (BLOCK_N, num_warps, 64-column steps per program) of the FMA path (M = 1) and of the
#: tensor-core path (M = 2..16), from ``bench/gemm.py --sweep`` on the H100 (run v5).
TILES = {"fma": (32, 4, 8), "mma": (128, 2, 4)}
#: Up to this many rows the FMA path runs (else the tensor-core path).
MAX_FMA_M = 1
#: Columns per program of the low-rank down kernel (its K split).
LORA_CHUNK = 512


@triton.jit
def _bf16(x, INTERPRET: tl.constexpr):
    """fp32 ``x`` rounded to bf16 (nearest even; the interpreter's own cast truncates)."""
    if INTERPRET:
        x = round_bf16(x)
    return x.to(tl.bfloat16)


@triton.jit
def _lora_down_kernel(
    x_ptr,
    smooth_ptr,
    ld_ptr,
    out_ptr,
    M,
    K,
    R,
    k_per_split,
    stride_xm,
    stride_ldr,
    stride_om,
    FP32_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``out += x̂[:, chunk] · L_down[:, chunk]ᵀ`` (fp32, ~fp32-accurate dot) for this
    program's K chunk and block of ranks; M ≤ 16."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, 16)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros([16, BLOCK_R], dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        cmask = c < K
        inv_s = tl.math.div_rn(1.0, tl.load(smooth_ptr + c, mask=cmask, other=1.0))
        xv = tl.load(
            x_ptr + rm[:, None] * stride_xm + c[None, :],
            mask=(rm < M)[:, None] & cmask[None, :],
            other=0.0,
        )
        ld = tl.load(
            ld_ptr + rr[:, None] * stride_ldr + c[None, :],
            mask=(rr < R)[:, None] & cmask[None, :],
            other=0.0,
        )
        xh = xv.to(tl.float32) * inv_s[None, :]
        acc = tl.dot(xh, tl.trans(ld.to(tl.float32)), acc, input_precision=FP32_PREC)
    tl.atomic_add(
        out_ptr + rm[:, None] * stride_om + rr[None, :],
        acc,
        mask=(rm < M)[:, None] & (rr < R)[None, :],
        sem="relaxed",
    )


@triton.jit
def _mma(w, x, acc, DOT_FP32: tl.constexpr):
    """``acc + w · x`` for bf16-exact fp32 ``w`` and bf16 ``x`` (fp32 under the interpreter,
    whose bf16 ``tl.dot`` is wrong; the values are the same)."""
    if DOT_FP32:
        return tl.dot(w, x.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w.to(tl.bfloat16), x, acc)


@triton.jit
def _w4a16_kernel(
    x_ptr,
    smooth_ptr,
    q_ptr,
    sc_ptr,
    ts_ptr,
    lora_ptr,
    lu_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    KP,
    R,
    k_per_split,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_om,
    stride_lm,
    stride_un,
    NVFP4: tl.constexpr,
    GROUP: tl.constexpr,
    ATOMIC: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FMA_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # FMA_M > 0 (M ≤ FMA_M, a power of two): scaled weights times x̂ on the FMA units,
    # [BLOCK_N, FMA_M, 32] partial sums reduced once at the end; else the tensor-core
    # path, x̂ padded to 16 rows.
    BLOCK_M: tl.constexpr = FMA_M if FMA_M > 0 else 16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rows < N
    rm = tl.arange(0, BLOCK_M)
    mmask = rm < M
    j = tl.arange(0, 32)  # byte j of a 64-column step holds columns 2j and 2j + 1
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # yᵀ
    acc3 = tl.zeros([BLOCK_N, BLOCK_M, 32], dtype=tl.float32)  # FMA path: yᵀ per column
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, KP)
    q_rows = q_ptr + rows[:, None] * stride_qn
    s_rows = sc_ptr + rows * stride_sn
    if NVFP4:  # the scale of byte j's two columns, for each of the step's 32 bytes
        s_cols = s_rows[:, None] + (j // (GROUP // 2))[None, :]
    x_cols = x_ptr + rm[None, :] * stride_xm + 2 * j[:, None]  # [32, 16]: xᵀ at columns 2j
    wmask = nmask[:, None] & (j < 32)[None, :]  # [BLOCK_N, 32]
    # Register double buffering: the next step's codes (and scales) are loaded before
    # this step's decode, so the memory latency overlaps the arithmetic.
    more = wmask & (k_start + 2 * j < k_end)[None, :]  # (KP may end inside a step)
    b_next = tl.load(q_rows + (k_start // 2 + j)[None, :], mask=more, other=0)
    if NVFP4:
        s_next = tl.load(s_cols + k_start // GROUP, mask=more, other=0.0)
    else:
        s_next = tl.load(s_rows + k_start // GROUP, mask=nmask, other=0.0)
    for k0 in range(k_start, k_end, 64):
        b = b_next.to(tl.int32)
        sg = s_next.to(tl.float32)
        kn = k0 + 64  # the next step; past k_end it is masked off
        more = wmask & (kn + 2 * j < k_end)[None, :]
        b_next = tl.load(q_rows + (kn // 2 + j)[None, :], mask=more, other=0)
        if NVFP4:
            s_next = tl.load(s_cols + kn // GROUP, mask=more, other=0.0)
            lo = e2m1_value(b & 0xF) * sg
            hi = e2m1_value((b >> 4) & 0xF) * sg
        else:
            smask = nmask & ((kn + 0 * rows) < k_end)  # (a vector: the interpreter needs one)
            s_next = tl.load(s_rows + kn // GROUP, mask=smask, other=0.0)
            if FMA_M > 0:  # scaled weights (exact in fp32: a 4-bit code times an fp16 scale)
                lo = int4_value(b & 0xF) * sg[:, None]
                hi = int4_value((b >> 4) & 0xF) * sg[:, None]
            else:  # raw codes for the MMA (exact in bf16), scaled after it
                lo = int4_value(b & 0xF)
                hi = int4_value((b >> 4) & 0xF)
        part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for odd in tl.static_range(2):
            c = k0 + 2 * j + odd  # [32]
            cmask = c < K
            inv_s = tl.math.div_rn(1.0, tl.load(smooth_ptr + c, mask=cmask, other=1.0))
            xv = tl.load(x_cols + k0 + odd, mask=mmask[None, :] & cmask[:, None], other=0.0)
            xh = xv.to(tl.float32) * inv_s[:, None]  # x̂ᵀ [32, BLOCK_M], the reference's
            if FMA_M > 0:
                xt = tl.expand_dims(tl.trans(xh), 0)  # [1, BLOCK_M, 32]
                if odd == 1:
                    acc3 += tl.expand_dims(hi, 1) * xt
                else:
                    acc3 += tl.expand_dims(lo, 1) * xt
            else:
                x_hi = _bf16(xh, DOT_FP32)
                x_lo = _bf16(xh - x_hi.to(tl.float32), DOT_FP32)
                if odd == 1:
                    part = _mma(hi, x_hi, part, DOT_FP32)
                    part = _mma(hi, x_lo, part, DOT_FP32)
                else:
                    part = _mma(lo, x_hi, part, DOT_FP32)
                    part = _mma(lo, x_lo, part, DOT_FP32)
        if FMA_M == 0:
            if NVFP4:
                acc += part
            else:
                acc += part * sg[:, None]
    if FMA_M > 0:
        acc = tl.sum(acc3, axis=2)
    # Epilogue. Every term is a sum, so with a K split each program adds its share into
    # an fp32 buffer: its partial product, and (the first split only) low-rank and bias.
    y = acc * tl.load(ts_ptr)
    first = (pid_k == 0).to(tl.float32)  # 1 for the first K split, else 0
    if HAS_LORA:
        for r in range(0, R):
            lu = tl.load(lu_ptr + rows * stride_un + r, mask=nmask, other=0.0)
            la = tl.load(lora_ptr + rm * stride_lm + r, mask=mmask, other=0.0) * first
            y += lu.to(tl.float32)[:, None] * la[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=nmask, other=0.0).to(tl.float32) * first
        y += bias[:, None]
    optr = out_ptr + rm[None, :] * stride_om + rows[:, None]
    omask = nmask[:, None] & mmask[None, :]
    if ATOMIC:
        tl.atomic_add(optr, y, mask=omask, sem="relaxed")
    else:
        if ROUND_BF16:
            y = round_bf16(y)
        tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=omask)


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    """The layer with 16-bit activations on ``x`` [M, K], M ≤ ``MAX_GEMV_M``: [M, N].

    Same arguments as ``reference.w4a16_linear_ref``; the result is in ``x.dtype``.
    """
    f = formats.get_format(fmt)
    m, k = x.shape
    if m > MAX_GEMV_M:
        raise ValueError(f"the W4A16 GEMV takes at most {MAX_GEMV_M} rows, got {m}")
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    qweight, wscales = qweight.contiguous(), wscales.contiguous()
    smooth = smooth.float().contiguous()
    r = lowrank_down.shape[0]
    if m == 0 or n == 0:
        return x.new_empty(m, n)
    fma_m = triton.next_power_of_2(m) if m <= MAX_FMA_M else 0
    block_n, warps, steps_per_program = TILES["fma" if fma_m else "mma"]
    n_blocks = triton.cdiv(n, block_n)
    steps = triton.cdiv(kp, 64)
    # Few steps per program, many programs: latency is hidden by programs in flight.
    kps = min(steps, steps_per_program) * 64
    split = triton.cdiv(kp, kps)
    lora = x.new_zeros(m, r, dtype=torch.float32)
    if r:  # the low-rank down projection x̂ · L_downᵀ, fp32 sums
        lowrank_down = lowrank_down.contiguous()
        block_r = min(64, max(16, triton.next_power_of_2(r)))
        _lora_down_kernel[(triton.cdiv(r, block_r), triton.cdiv(k, LORA_CHUNK))](
            x,
            smooth,
            lowrank_down,
            lora,
            m,
            k,
            r,
            LORA_CHUNK,
            x.stride(0),
            lowrank_down.stride(0),
            lora.stride(0),
            FP32_PREC=dot_precision(),
            BLOCK_R=block_r,
            BLOCK_K=64,
        )
    lowrank_up = lowrank_up.contiguous()
    if split > 1:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _w4a16_kernel[(n_blocks, split)](
        x,
        smooth,
        qweight,
        wscales,
        wtensor_scale.float().reshape(1),
        lora,
        lowrank_up,
        bias if bias is not None else smooth,
        out,
        m,
        n,
        k,
        kp,
        r,
        kps,
        x.stride(0),
        qweight.stride(0),
        wscales.stride(0),
        out.stride(0),
        lora.stride(0) if r else 0,
        lowrank_up.stride(0) if r else 0,
        NVFP4=f.name == "nvfp4",
        GROUP=f.group_size,
        ATOMIC=split > 1,
        HAS_LORA=r > 0,
        HAS_BIAS=bias is not None,
        ROUND_BF16=needs_bf16_rounding(x.dtype),
        DOT_FP32=interpreting(),
        FMA_M=fma_m,
        BLOCK_N=block_n,
        num_warps=warps,
    )
    return out if split == 1 else out.to(x.dtype)
