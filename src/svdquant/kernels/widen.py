"""Widen kernel: the stored 4-bit weight -> fp8 GEMM operand + per-channel scale.

Reads ``qweight`` (packed codes, two per byte, low nibble first) and its group scales
(``int4``: fp16 per 64; ``nvfp4``: fp8 E4M3 per 16 times an fp32 tensor scale) and writes

* ``wq = fp8(code_value · s_group · (1 / c))`` [N, K_pad], with ``c = qmax · max_g(s_group) / 448``
  per output channel, so each row's largest possible value lands at 448,
* ``s_channel = c · s_tensor`` [N] (fp32), applied in the GEMM's epilogue.

``dequantize_weight`` runs the same kernel with ``DEQUANT``: the plain 16-bit weight
``code_value · s_group · s_tensor`` for the W4A16 path at many tokens (a cuBLAS GEMM on it).

Memory-bound: one program per [BLOCK_N, BLOCK_K] tile (a 2-D grid); each reads its rows'
scales (a few hundred bytes, from L2) for ``c`` and then its tile of codes.
Reference: ``reference.widen_weight_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from svdquant import formats
from svdquant.kernels._triton_common import (
    cdiv,
    e2m1_value,
    int4_value,
    interpreting,
    next_pow2,
    pdl_supported,
    round_bf16,
    to_e4m3,
)
from svdquant.kernels.launch import launch

__all__ = ["dequantize_weight", "widen_weight"]

#: (BLOCK_N, BLOCK_K, num_warps) of the fp8 widen: 8 rows, 512 columns, 2 warps. H200, 27
#: tiles at seven (N, K) runs in a CUDA graph (``bench/probe_widen_tiles.py``, v29): the
#: only tile at least as fast as v21's (32, 512, 4) everywhere — 1.01-1.05x where K = 3072,
#: 1.09-1.12x at K = 12288 and 15360, where each program re-reads its rows' K / 64 group
#: scales for the row scale (fewer rows a program: fewer scale bytes per code byte).
#: (8, 2048, 4) reached 1.15x at K = 12288 but 0.84-0.89x at K = 3072.
TILE = (8, 512, 2)
#: The widen overlapped with the quantize (``ops.quantize_and_widen``: FLUX's every layer
#: but the fused MLP's fc2 and the single blocks' ``proj_out``) takes ``TILE`` for weights
#: no taller than wide (N <= K) and v21's tile for taller ones: there its programs share
#: the SMs with the quantize's. H200, whole layer in a CUDA graph, (8, 512, 2) against
#: (32, 512, 4), alternated twice (``bench/probe_layer.py``, v30): 1.01-1.02x at 3072 x
#: 3072, 1.03-1.05x at 3072 x 12288 and 3072 x 15360 (M = 512, 1024, 4608), but 0.98x at
#: 12288 x 3072 and within +-0.6% at 9216 and 21504 x 3072. The 16-bit dequantize (the
#: W4A16 path at many tokens) keeps v21's tile, not re-measured.
OVERLAP_TILE = (32, 512, 4)
DEQUANT_TILE = (32, 512, 4)

#: Launch the column tiles of a row tile next to each other (grid (column tiles, row
#: tiles)) rather than the row tiles of a column tile: 1.5-2.6% faster on all six of the
#: issue's shapes (H200, ``bench/probe_order.py``, v26; the quantize's order: within ±2%,
#: unchanged).
K_FAST = True


@triton.jit
def _widen_kernel(
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
    NVFP4: tl.constexpr,
    EXACT: tl.constexpr,
    DEQUANT: tl.constexpr,
    GROUP: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False,
    K_FAST: tl.constexpr = False,
    TRIGGER: tl.constexpr = False,
):
    """With ``PDL`` (launched as the quantize kernel's programmatic dependent) everything
    up to the stores overlaps that kernel; the stores wait for it (the outputs are fresh
    buffers whose memory an earlier kernel may still read), so this kernel also ends
    after it. With ``TRIGGER`` the next kernel, launched as this one's programmatic
    dependent (the quantize, ``quantize_act(pdl=True)``), may start at once."""
    if TRIGGER:
        gdc_launch_dependents()
    if K_FAST:  # grid (column tiles, row tiles): programs launched together share rows
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(0)
    else:
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    # This program's codes first: their latency overlaps the row-scale reduction (same 32
    # registers; a version that also loaded the group scales early as a [rows, groups,
    # 64] tile took 48 and ran slower, v19)
    HALF: tl.constexpr = BLOCK_K // 2
    bcols = pid_k * HALF + tl.arange(0, HALF)
    b = tl.load(
        q_ptr + rows[:, None] * stride_qn + bcols[None, :],
        mask=rmask[:, None] & (bcols < KP // 2)[None, :],
        other=0,
    )
    # c = qmax * max_g(s_group) / 448 per row, from all of the row's (few) scales.
    mx = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G * (1 - DEQUANT), BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        s = tl.load(
            sc_ptr + rows[:, None] * stride_sn + gs[None, :],
            mask=rmask[:, None] & (gs < G)[None, :],
            other=0.0,
        ).to(tl.float32)
        mx = tl.maximum(mx, tl.max(s, axis=1))
    c = tl.math.div_rn(QMAX * mx, 448.0)
    c = tl.where(c > 0.0, c, 1.0)
    if pid_k == 0 and not DEQUANT and not PDL:
        tl.store(sch_ptr + rows, c * tl.load(ts_ptr), mask=rmask)
    inv_c = tl.math.div_rn(1.0, c)
    # This program's [BLOCK_N, BLOCK_K] tile: decode, scale by s_group / c, round to fp8.
    b = b.to(tl.int32)
    if NVFP4:
        v = e2m1_value(tl.join(b & 0xF, (b >> 4) & 0xF))
    else:
        v = tl.join(int4_value(b & 0xF), int4_value((b >> 4) & 0xF))
    v = v.reshape([BLOCK_N, BLOCK_K])  # column 2j: the low nibble of byte j
    NG: tl.constexpr = BLOCK_K // GROUP
    gcols = pid_k * NG + tl.arange(0, NG)
    sg = tl.load(
        sc_ptr + rows[:, None] * stride_sn + gcols[None, :],
        mask=rmask[:, None] & (gcols < G)[None, :],
        other=0.0,
    ).to(tl.float32)
    v = tl.reshape(tl.reshape(v, [BLOCK_N, NG, GROUP]) * sg[:, :, None], [BLOCK_N, BLOCK_K])
    if DEQUANT:  # 16-bit: code · s_group · s_tensor
        w = v * tl.load(ts_ptr)
        if EXACT and w_ptr.dtype.element_ty == tl.bfloat16:
            w = round_bf16(w)
        w = w.to(w_ptr.dtype.element_ty)
    else:
        w = to_e4m3(v * inv_c[:, None], EXACT)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    if PDL:
        ts = tl.load(ts_ptr)
        gdc_wait()
        if pid_k == 0 and not DEQUANT:
            tl.store(sch_ptr + rows, c * ts, mask=rmask)
    tl.store(
        w_ptr + rows[:, None] * stride_wn + cols[None, :],
        w,
        mask=rmask[:, None] & (cols < KP)[None, :],
    )


def widen_weight(
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    fmt: str,
    out: torch.Tensor | None = None,
    pdl: bool = False,
    trigger: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen a stored 4-bit weight into ``(wq fp8 [N, K_pad], s_channel fp32 [N])``.

    ``out`` (fp8 [N, K_pad]) may be a reused scratch buffer. See ``widen_weight_ref``.
    ``pdl``: launched as the previous kernel's programmatic dependent (where the GPU has
    it) — only right after ``quantize_act(trigger=True)``, with the weights contiguous and
    ``wtensor_scale`` fp32, so that no copy kernel comes between (``quantize_and_widen``).
    ``trigger``: let a programmatic dependent launched next (``quantize_act(pdl=True)``)
    start at once, where the GPU has it.
    """
    f = formats.get_format(fmt)
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    qweight, wscales = qweight.contiguous(), wscales.contiguous()
    wq = out if out is not None else qweight.new_empty(n, kp, dtype=torch.float8_e4m3fn)
    s_channel = torch.empty(n, dtype=torch.float32, device=qweight.device)
    if n == 0:
        return wq, s_channel
    _launch(
        qweight, wscales, wtensor_scale, wq, s_channel, f, dequant=False, pdl=pdl, trigger=trigger
    )
    return wq, s_channel


def dequantize_weight(
    qweight: torch.Tensor, wscales: torch.Tensor, wtensor_scale: torch.Tensor, fmt: str, dtype
) -> torch.Tensor:
    """The stored 4-bit weight as a 16-bit ``dtype`` matrix [N, K_pad]: ``code_value ·
    s_group · s_tensor``, rounded once. See ``reference.dequantize_weight_ref``."""
    f = formats.get_format(fmt)
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    qweight, wscales = qweight.contiguous(), wscales.contiguous()
    w = torch.empty(n, kp, dtype=dtype, device=qweight.device)
    if n:
        _launch(qweight, wscales, wtensor_scale, w, w, f, dequant=True)
    return w


def tile(n: int, kp: int, dequant: bool, overlapped: bool) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) of a widen of an [n, kp] weight: ``DEQUANT_TILE`` for
    the 16-bit dequantize; beside the quantize (``overlapped``) ``OVERLAP_TILE`` for
    weights taller than wide; else ``TILE``."""
    if dequant:
        return DEQUANT_TILE
    return OVERLAP_TILE if overlapped and n > kp else TILE


def _launch(
    qweight, wscales, wtensor_scale, out, s_channel, f, dequant: bool, pdl=False, trigger=False
):
    n, kp, g = qweight.shape[0], qweight.shape[1] * 2, wscales.shape[1]
    pdl = pdl and pdl_supported(qweight.device)
    block_n, block_k, warps = tile(n, kp, dequant, overlapped=pdl or trigger)
    grid = (cdiv(n, block_n), cdiv(kp, block_k))
    launch(
        _widen_kernel,
        grid[::-1] if K_FAST else grid,
        qweight,
        wscales,
        wtensor_scale.float().reshape(1),
        out,
        s_channel,
        n,
        kp,
        g,
        qweight.stride(0),
        wscales.stride(0),
        out.stride(0),
        NVFP4=f.name == "nvfp4",
        EXACT=interpreting(),
        DEQUANT=dequant,
        GROUP=f.group_size,
        QMAX=f.qmax,
        BLOCK_N=block_n,
        BLOCK_G=min(next_pow2(g), 256),
        BLOCK_K=block_k,
        PDL=pdl,
        K_FAST=K_FAST,
        TRIGGER=trigger and pdl_supported(qweight.device),
        num_warps=warps,
        **({"launch_pdl": True} if pdl else {}),
    )
