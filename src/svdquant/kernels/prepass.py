"""Fused pre-pass: a layer's activation quantize and its weight widen in one launch.

Both passes before the fp8 GEMM are memory-bound, and neither keeps the memory busy on
its own: their programs mostly wait — the quantize on its loads and its arithmetic
(Nsight Compute, H200, M = 4608, K = 3072: DRAM 30%, issue slots 43%), the widen on its
loads (DRAM 12% at N = K = 3072, a grid of less than half a wave). Launched one after the
other (or the widen as the quantize's programmatic dependent, which only fills the
quantize's last wave) each leaves the other's share of the bandwidth idle. Here the two
kinds of program are interleaved through one grid — program ``pid`` is a widen program
when ``⌊(pid + 1) · W / P⌋ > ⌊pid · W / P⌋`` (W widen programs of P), so both are spread
evenly over the launch — and every SM runs both at once.

Each program is exactly one program of the separate kernels (``quantize_program``,
``widen_program``): the same numbers, bit for bit (``quantize_act_ref``,
``widen_weight_ref``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from svdquant import formats
from svdquant.kernels._triton_common import interpreting
from svdquant.kernels.quantize import checked_vectors, plan, quantize_program
from svdquant.kernels.widen import TILE as WIDEN_TILE
from svdquant.kernels.widen import launch_args, widen_program

__all__ = ["quantize_and_widen"]


@triton.jit
def _prepass_kernel(
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
    k_per_split,
    stride_xm,
    stride_qm,
    stride_ldr,
    stride_lm,
    q_ptr,
    sc_ptr,
    ts_ptr,
    w_ptr,
    sch_ptr,
    N,
    KP,
    G,
    stride_qn,
    stride_sn,
    stride_wn,
    Q_ROWS,
    W_ROWS,
    Q_PROGRAMS,
    W_PROGRAMS,
    INT4: tl.constexpr,
    HAS_LORA: tl.constexpr,
    ATOMIC: tl.constexpr,
    EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NVFP4: tl.constexpr,
    DEQUANT: tl.constexpr,
    GROUP: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_KW: tl.constexpr,
):
    pid = tl.program_id(0)
    total = Q_PROGRAMS + W_PROGRAMS
    wi = (pid * W_PROGRAMS) // total  # widen programs before this one
    if ((pid + 1) * W_PROGRAMS) // total > wi:
        widen_program(
            wi % W_ROWS, wi // W_ROWS, q_ptr, sc_ptr, ts_ptr, w_ptr, sch_ptr, N, KP, G,
            stride_qn, stride_sn, stride_wn, NVFP4, EXACT, DEQUANT, GROUP, QMAX, BLOCK_N,
            BLOCK_G, BLOCK_KW, False,
        )  # fmt: skip
    else:
        qi = pid - wi
        quantize_program(
            qi % Q_ROWS, qi // Q_ROWS, x_ptr, x_ptr, smooth_ptr, ld_ptr, scale_ptr, xq_ptr,
            lora_ptr, M, K, K, K_OUT, R, k_per_split, stride_xm, stride_xm, stride_qm,
            stride_ldr, stride_lm, INT4, HAS_LORA, ATOMIC, EXACT, -1, False, False,
            BLOCK_M, BLOCK_R, BLOCK_K, False,
        )  # fmt: skip


def quantize_and_widen(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    act_scale: torch.Tensor,
    k_out: int,
    act_fmt: str,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    fmt: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_act(x, ...)`` and ``widen_weight(qweight, ...)`` in one launch:
    ``(xq, lora_act, wq, s_channel)``, the numbers of the two separate kernels."""
    from svdquant.kernels.quantize import quantize_act
    from svdquant.kernels.widen import widen_weight

    m, k = x.shape
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    smooth, lowrank_down = checked_vectors(smooth, lowrank_down, k, act_fmt)
    f = formats.get_format(fmt)
    r = lowrank_down.shape[0]
    p = plan(m, max(k, k_out), r, x.device) if m else None
    if p is None or n == 0 or p.warps != WIDEN_TILE[2]:  # nothing to interleave
        xq, lora = quantize_act(x, smooth, lowrank_down, act_scale, k_out, act_fmt)
        return (xq, lora, *widen_weight(qweight, wscales, wtensor_scale, fmt))
    x = x if x.stride(-1) == 1 else x.contiguous()
    qweight, wscales = qweight.contiguous(), wscales.contiguous()
    xq = torch.empty(m, k_out, dtype=torch.float8_e4m3fn, device=x.device)
    lora = (torch.zeros if p.split > 1 else torch.empty)(m, r, dtype=torch.float32, device=x.device)
    wq = torch.empty(n, kp, dtype=torch.float8_e4m3fn, device=x.device)
    s_channel = torch.empty(n, dtype=torch.float32, device=x.device)
    wgrid, wargs, wc = launch_args(qweight, wscales, wtensor_scale, wq, s_channel, f,
                                   dequant=False, pdl=False)  # fmt: skip
    q_programs, w_programs = p.m_blocks * p.split, wgrid[0] * wgrid[1]
    _prepass_kernel[(q_programs + w_programs,)](
        x, smooth, lowrank_down, act_scale.float().reshape(1), xq, lora, m, k, k_out, r,
        p.k_per_split, x.stride(0), xq.stride(0), lowrank_down.stride(0) if r else 0,
        lora.stride(0) if r else 0, *wargs, p.m_blocks, wgrid[0], q_programs, w_programs,
        INT4=act_fmt == "int4", HAS_LORA=r > 0, ATOMIC=p.split > 1, EXACT=interpreting(),
        BLOCK_M=p.block_m, BLOCK_R=p.block_r, BLOCK_K=p.block_k, NVFP4=wc["NVFP4"],
        DEQUANT=False, GROUP=wc["GROUP"], QMAX=wc["QMAX"], BLOCK_N=wc["BLOCK_N"],
        BLOCK_G=wc["BLOCK_G"], BLOCK_KW=wc["BLOCK_K"], num_warps=p.warps, num_stages=1,
    )  # fmt: skip
    return xq, lora, wq, s_channel
