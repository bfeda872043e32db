"""W4A16 GEMV: 4-bit weights, 16-bit activations, for a few tokens (M = 1..16).

For the linears whose activations stay 16-bit (``act_fmt="none"``; FLUX's AdaLayerNorm
modulation linears run at M = batch size). Memory-bound: each program streams a block of
weight rows once (0.5 byte per weight plus the group scales), decodes and scales them in
registers into fp32 and uses them as the *left* operand of a tf32 ``tl.dot``,
``yᵀ = W · x̂ᵀ`` with x̂ padded to 16 columns, so the tensor cores do the sums and no
per-element reduction runs in the loop; the next tile's bytes are loaded before the
current tile is decoded. A K split gives the GPU enough programs in flight; the partial
sums then meet in an fp32 buffer through atomics (one cast to the output dtype after).

``y = (x̂ · (code · s_group)ᵀ) · s_tensor + lora_act · L_upᵀ + b`` with ``x̂ = x · (1/s)``;
``lora_act = x̂ · L_downᵀ`` comes from the quantize kernel (its fp32 low-rank dot), the
rest is this kernel's epilogue. Reference:
``reference.w4a16_linear_ref`` (exact fp32; the kernel's tf32 products differ by ~1e-4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svdquant import formats
from svdquant.kernels._triton_common import (
    interpreting,
    needs_bf16_rounding,
    nibble_value,
    round_bf16,
)
from svdquant.kernels.quantize import quantize_act

__all__ = ["MAX_GEMV_M", "w4a16_linear"]

#: Largest M the GEMV kernel takes (the padded width of its ``tl.dot``).
MAX_GEMV_M = 16

#: (BLOCK_N, BLOCK_K, num_warps), tuned on the H100 with ``bench/gemm.py --sweep``.
TILE = (128, 64, 4)
#: A K split is used until there are this many programs per multiprocessor.
SPLIT_TARGET = 4


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
    DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    BLOCK_M: tl.constexpr = 16
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rows < N
    rm = tl.arange(0, BLOCK_M)
    mmask = rm < M
    HALF: tl.constexpr = BLOCK_K // 2
    NG: tl.constexpr = BLOCK_K // GROUP
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # yᵀ
    k_start = pid_k * k_per_split
    k_end = k_start + k_per_split
    hb = tl.arange(0, HALF)
    gg = tl.arange(0, NG)
    q_rows = q_ptr + rows[:, None] * stride_qn
    s_rows = sc_ptr + rows[:, None] * stride_sn
    # Register double buffering: the next tile's codes and scales are loaded before this
    # tile's decode, so the memory latency overlaps the arithmetic.
    b_next = tl.load(
        q_rows + (k_start // 2 + hb)[None, :],
        mask=nmask[:, None] & ((k_start // 2 + hb) < KP // 2)[None, :],
        other=0,
    )
    s_next = tl.load(
        s_rows + (k_start // GROUP + gg)[None, :],
        mask=nmask[:, None] & ((k_start // GROUP + gg) < KP // GROUP)[None, :],
        other=0.0,
    )
    for k0 in range(k_start, k_end, BLOCK_K):
        b = b_next.to(tl.int32)
        sg = s_next.to(tl.float32)
        kn = k0 + BLOCK_K  # the next tile; past k_end it is masked off
        nb = kn // 2 + hb
        ng = kn // GROUP + gg
        b_next = tl.load(
            q_rows + nb[None, :],
            mask=nmask[:, None] & ((nb < KP // 2) & (nb < k_end // 2))[None, :],
            other=0,
        )
        s_next = tl.load(
            s_rows + ng[None, :],
            mask=nmask[:, None] & ((ng < KP // GROUP) & (ng < k_end // GROUP))[None, :],
            other=0.0,
        )
        v = nibble_value(tl.join(b & 0xF, (b >> 4) & 0xF).reshape([BLOCK_N, BLOCK_K]), NVFP4)
        w = tl.reshape(tl.reshape(v, [BLOCK_N, NG, GROUP]) * sg[:, :, None], [BLOCK_N, BLOCK_K])
        cols = k0 + tl.arange(0, BLOCK_K)
        kmask = cols < K
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + cols[None, :],
            mask=mmask[:, None] & kmask[None, :],
            other=0.0,
        ).to(tl.float32)  # [16, BLOCK_K], contiguous along K
        inv_s = tl.math.div_rn(1.0, tl.load(smooth_ptr + cols, mask=kmask, other=1.0))
        acc = tl.dot(w, tl.trans(x * inv_s[None, :]), acc, input_precision=DOT_PREC)
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
    block_n, block_k, warps = TILE
    n_blocks = triton.cdiv(n, block_n)
    split = 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    while n_blocks * split < SPLIT_TARGET * sms and kp // (block_k * split * 2) >= 4:
        split *= 2
    kps = triton.cdiv(triton.cdiv(kp, split), block_k) * block_k
    split = triton.cdiv(kp, kps)
    lora = x.new_empty(m, 0, dtype=torch.float32)
    if r:  # the 16-bit low-rank down projection, as in the W4A4 path (its xq is unused)
        one = torch.ones((), device=x.device)
        lora = quantize_act(x, smooth, lowrank_down, one, 16, "fp8", lora_fp32=True)[1]
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
        DOT_PREC="ieee" if interpreting() else "tf32",
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
    )
    return out if split == 1 else out.to(x.dtype)
