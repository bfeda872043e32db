"""The gated up projection: a GEMM whose epilogue writes the down projection's input.

A gated linear unit (diffusers' ``GEGLU``, SDXL's feed-forwards) computes
``v, g = up(x).chunk(2, -1)``, ``h = v · act(g)``, then ``down(h)``. Here a tile of h's
columns reads both halves' weight rows (value rows c, gate rows H + c) into two
accumulators, and its epilogue forms h as the unfused modules write it (the up
projection's output, the activation and the product each rounded to 16 bits) and stores
it as the down projection's quantized input with its low-rank sums
(``gemm.quantize_next``, the fused MLP's epilogue): the [M, 2H] output, the activation and
product pass and the down projection's quantize pass never happen.
Reference: ``reference.fp8_gemm_gated_next_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svdquant.kernels import gemm, gemm_ws
from svdquant.kernels._triton_common import (
    act_code,
    apply_activation,
    block_rank,
    cdiv,
    fp8_to_f32,
    interpreting,
    needs_bf16_rounding,
)
from svdquant.kernels.gemm import as_written, grouped_tile, output_values, quantize_next
from svdquant.kernels.quantize import quantize_act

__all__ = ["fp8_gemm_gated_next"]


def _configs() -> list[triton.Config]:
    """The GEMM's tiles of 128 or 256 columns as ``BLOCK_H`` = 64 or 128 of h's columns
    (their value and gate rows): whole groups of 64 for the quantize."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_H": 64, "BLOCK_K": 64, "GROUP_M": 4})]
    tiles = [
        (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"] // 2, c.kwargs["BLOCK_K"], c.num_warps,
         c.num_stages)
        for c in gemm._configs()
        if c.kwargs["BLOCK_N"] >= 128
    ]  # fmt: skip
    # v42 (H200, probe_gated --configs, probe_gated_configs-h200-2026-11-30-v42-*.json):
    # each 3-5% ahead of the best of the GEMM's own at three of SDXL's four shapes
    # (128 x 128 x 64) and at its 1,024-row level (64 x 64 x 128, 3 stages)
    tiles += [(128, 128, 64, 8, 4), (64, 64, 128, 4, 3)]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_H": bh, "BLOCK_K": bk, "GROUP_M": 8},
            num_warps=warps,
            num_stages=stages,
        )
        for bm, bh, bk, warps, stages in tiles
    ]


@triton.autotune(
    configs=_configs(),
    do_bench=gemm._bench_config,
    key=["M_BUCKET", "H", "K", "HAS_LORA", "NEXT_INT4"],
    reset_to_zero=["lora2_ptr"],  # the down projection's low-rank sums accumulate
)
@triton.jit
def _gated_kernel(
    a_ptr, b_ptr, c_ptr, sch_ptr, scale_ptr, lora_ptr, lu_ptr, bias_ptr, M, H, K, R,
    M_BUCKET, stride_am, stride_bn, stride_lm, stride_un, inv_s2_ptr, ld2_ptr, scale2_ptr,
    xq2_ptr, lora2_ptr, K2_OUT, R2, stride_q2m, stride_ld2, stride_l2m,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr, ACT: tl.constexpr,
    NEXT_INT4: tl.constexpr, BLOCK_R2: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # a tile: BLOCK_H of h's columns, from as many value rows and as many gate rows
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(H, BLOCK_H)
    pid_m, pid_n = grouped_tile(pid, grid_m, grid_n, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rv = pid_n * BLOCK_H + tl.arange(0, BLOCK_H)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    vmask = rv < H
    acc_v = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :]
    v_ptrs = b_ptr + rv[None, :] * stride_bn + rk[:, None]  # [BLOCK_K, BLOCK_H]
    g_ptrs = v_ptrs + H * stride_bn
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        bmask = kmask[:, None] & vmask[None, :]
        bv = tl.load(v_ptrs, mask=bmask, other=0.0)
        bg = tl.load(g_ptrs, mask=bmask, other=0.0)
        if DOT_FP32:  # the interpreter: fp8 -> fp32 by hand (its own loses NaN)
            a32 = fp8_to_f32(a)
            acc_v = tl.dot(a32, fp8_to_f32(bv), acc_v, input_precision="ieee")
            acc_g = tl.dot(a32, fp8_to_f32(bg), acc_g, input_precision="ieee")
        else:
            acc_v = tl.dot(a, bv, acc_v)
            acc_g = tl.dot(a, bg, acc_g)
        a_ptrs += BLOCK_K
        v_ptrs += BLOCK_K
        g_ptrs += BLOCK_K

    yv = output_values(acc_v, rm, rv, mmask, vmask, 0, sch_ptr, scale_ptr, lora_ptr,
                       lu_ptr, bias_ptr, R, stride_lm, stride_un, 0, 0, 0, 0, 0, 0, 0,
                       0, 0, 0, 0, 0, HAS_LORA, HAS_BIAS, BLOCK_R, DOT_FP32, False,
                       BLOCK_H)  # fmt: skip
    v = as_written(yv, c_ptr.dtype.element_ty, ROUND_BF16)
    yg = output_values(acc_g, rm, rv + H, mmask, vmask, 0, sch_ptr, scale_ptr, lora_ptr,
                       lu_ptr, bias_ptr, R, stride_lm, stride_un, 0, 0, 0, 0, 0, 0, 0,
                       0, 0, 0, 0, 0, HAS_LORA, HAS_BIAS, BLOCK_R, DOT_FP32, False,
                       BLOCK_H)  # fmt: skip
    g = as_written(yg, c_ptr.dtype.element_ty, ROUND_BF16)
    t = as_written(apply_activation(g, ACT), c_ptr.dtype.element_ty, ROUND_BF16)
    h = as_written(v * t, c_ptr.dtype.element_ty, ROUND_BF16).to(c_ptr.dtype.element_ty)
    quantize_next(h, rm, rv, mmask, vmask, inv_s2_ptr, ld2_ptr, scale2_ptr, xq2_ptr,
                  lora2_ptr, K2_OUT, R2, stride_q2m, stride_ld2, stride_l2m, DOT_FP32,
                  NEXT_INT4, BLOCK_R2, BLOCK_M, BLOCK_H)  # fmt: skip


gemm.TUNED_KERNELS.append(_gated_kernel)


#: Run a GEGLU's up projection on the warp-specialized GEMM where ``fp8_gemm`` would
#: (``gemm._ws_wanted``: sm_90, from ``gemm.WS_MIN_M`` rows), its epilogue writing the
#: down projection's quantized input (``gemm_ws.fp8_gemm_ws_next``, gated: one pass), or
#: where that epilogue does not take the next layer (rank > 64), h = v · gelu(g) in 16
#: bits for the down projection's quantize to read (``fp8_gemm_ws_gated``). On: this
#: kernel's K loop is the slow piece (v45: 75.4 µs at M = 4096, SDXL's 640 → 2 x 2560,
#: where cuBLAS BF16's plain up projection takes 46.5). v46, H200: the one pass 64 / 74 µs
#: against this kernel's 75 / 87 at M = 4096 / 4608 (145 / 161 against 175 / 194 at 1280
#: → 2 x 5120; 33 against 32 at M = 1024, 640), ``bench/probe_ws_next.py``; SDXL's step
#: 0.96 → 0.98× BF16 at batch 1, 1.04 → 1.07× at 2 (``bench/models.py --ab
#: gemm_gated.WS_GATED=False``, one run).
WS_GATED = True


def _ws_gated_wanted(xq, wq, lora_act, lowrank_up, out_dtype, activation) -> bool:
    n, k = wq.shape[0], xq.shape[1]
    return (
        WS_GATED
        and activation == "gelu"
        and gemm_ws.supports_gated(n, k, lowrank_up.shape[1], lowrank_up.dtype, out_dtype)
        and gemm._ws_wanted(xq, wq, lora_act, lowrank_up, out_dtype)
    )


def fp8_gemm_gated_next(
    xq: torch.Tensor,
    wq: torch.Tensor,
    s_channel: torch.Tensor,
    act_scale: torch.Tensor,
    lora_act: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str,
    smooth2: torch.Tensor,
    lowrank_down2: torch.Tensor,
    act_scale2: torch.Tensor,
    k_out2: int,
    act_fmt2: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A gated unit's up projection (``wq`` [2H, K]: value rows, then gate rows) whose
    epilogue writes the down projection's quantized input for ``h = v · activation(g)``.

    The arguments are ``fp8_gemm_quantize_next``'s; ``activation`` applies to the gate
    (``"gelu"`` for diffusers' GEGLU). The layer output, the activation and the product
    are each rounded to ``out_dtype`` as the unfused modules write them, and ``h`` goes
    exactly through ``quantize_act(h, smooth2, lowrank_down2, act_scale2, k_out2,
    act_fmt2)``. Returns ``(xq2 fp8 [M, k_out2], lora_act2 fp32 [M, r2])``. Reference:
    ``reference.fp8_gemm_gated_next_ref``.
    """
    m, n = xq.shape[0], wq.shape[0]
    if n % 2:
        raise ValueError(f"a gated unit's up projection has an even number of rows: {n}")
    h = n // 2
    xq2, lora2, nxt = gemm.next_layer_input(
        m, h, xq.device, activation, smooth2, lowrank_down2, act_scale2, k_out2, act_fmt2
    )
    if not (m and h):
        return xq2, lora2
    if WS_GATED and gemm.ws_next_fits(xq, wq, lora_act, lowrank_up, out_dtype, nxt, True):
        return gemm_ws.fp8_gemm_ws_next(xq, wq, s_channel, act_scale, lora_act, lowrank_up,
                                        bias, out_dtype, nxt, gated=True)  # fmt: skip
    if _ws_gated_wanted(xq, wq, lora_act, lowrank_up, out_dtype, activation):
        hv = gemm_ws.fp8_gemm_ws_gated(xq, wq, s_channel, act_scale, lora_act, lowrank_up,
                                       bias, out_dtype)  # fmt: skip
        return quantize_act(hv, smooth2, lowrank_down2, act_scale2, k_out2, act_fmt2,
                            out=(xq2, lora2))  # fmt: skip
    inv_s2, ld2, sc2, _, _, _, _ = nxt
    xq, wq, lora_act, lowrank_up = gemm._contiguous(xq, wq, lora_act, lowrank_up)
    r, r2, k = lowrank_up.shape[1], ld2.shape[0], xq.shape[1]
    out = torch.empty(0, dtype=out_dtype, device=xq.device)  # only its dtype is read
    args = (
        xq, wq, out, s_channel, act_scale.float().reshape(1), lora_act, lowrank_up,
        bias if bias is not None else s_channel, m, h, k, r, gemm._m_bucket(m), xq.stride(0),
        wq.stride(0), lora_act.stride(0) if r else 0, lowrank_up.stride(0) if r else 0,
        inv_s2, ld2, sc2, xq2, lora2, k_out2, r2, xq2.stride(0), ld2.stride(0) if r2 else 0,
        lora2.stride(0) if r2 else 0,
    )  # fmt: skip
    flags = dict(
        HAS_LORA=r > 0,
        HAS_BIAS=bias is not None,
        ROUND_BF16=needs_bf16_rounding(out_dtype),
        BLOCK_R=block_rank(r),
        DOT_FP32=interpreting(),
        ACT=act_code(activation),
        NEXT_INT4=act_fmt2 == "int4",
        BLOCK_R2=block_rank(r2),
    )

    def grid(meta):
        return (cdiv(m, meta["BLOCK_M"]) * cdiv(h, meta["BLOCK_H"]),)

    key = ("gated", gemm._m_bucket(m), h, k, out_dtype, lowrank_up.dtype,
           None if bias is None else bias.dtype, gemm.AUTOTUNE_GRAPH, *flags.values())  # fmt: skip
    gemm.run_tuned(_gated_kernel, grid, args, flags, key, xq.device, (m, n, k), (xq, wq))
    return xq2, lora2
