"""fp8 GEMM with the layer's epilogue: scales, low-rank up projection, bias.

``y = (xq · wqᵀ) · (S · s_channel) + lora_act · L_upᵀ + b``, written once in the output
dtype. ``xq`` [M, K] and ``wq`` [N, K] are fp8 E4M3 (from ``quantize_act`` and
``widen_weight``); the K loop is a plain fp8 ``tl.dot`` with fp32 accumulation and no
per-group work, and every scale is applied once, after it. The low-rank term is a rank-r
``tl.dot`` in the epilogue on 16-bit operands (``lora_act`` rounded to L_up's dtype) with
fp32 sums.

Reference: ``reference.fp8_gemm_ref``.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from svdquant.kernels import gemm_ws, tile_cache
from svdquant.kernels import launch as launch_mod
from svdquant.kernels._triton_common import (
    act_code,
    apply_activation,
    block_rank,
    cdiv,
    check_activation,
    dot16,
    folded_lowrank_dot,
    fp8_to_f32,
    hopper_or_later,
    inner_bounds,
    interpreting,
    needs_bf16_rounding,
    next_pow2,
    num_sms,
    part_args,
    round_bf16,
    three_bounds,
)
from svdquant.kernels.launch import launch
from svdquant.kernels.quantize import quantize_tile

__all__ = ["fp8_gemm", "fp8_gemm_quantize_next", "fp8_gemm_split", "split_supported"]

logger = logging.getLogger(__name__)


def _block_shapes(nargs: dict) -> None:
    """A config's pre-hook: the tensor descriptors' boxes are the config's tiles."""
    a, b = nargs["a_ptr"], nargs["b_ptr"]
    if isinstance(a, TensorDescriptor):
        a.block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        b.block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _configs() -> list[triton.Config]:
    if interpreting():
        return [
            triton.Config(
                {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4},
                pre_hook=_block_shapes,
            )
        ]
    out = []
    for bm, bn, bk, warps, stages in (
        (128, 128, 128, 8, 3),
        (128, 256, 128, 8, 3),
        (128, 128, 128, 4, 4),
        (64, 128, 128, 4, 4),
        (64, 64, 128, 4, 4),
        # v26 (H200, probe_gemm): the best of 9 of the 18 shapes, by 1-4%; 128x256x64 with 5
        # stages and 256x128x128 won none
        (128, 256, 128, 8, 4),
    ):
        out.append(
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                num_warps=warps,
                num_stages=stages,
                pre_hook=_block_shapes,
            )
        )
    return out


def _m_bucket(m: int) -> int:
    """Autotune key for M: powers of two, so a new sequence length rarely re-tunes."""
    return next_pow2(max(m, 1))


#: Time each candidate tile replayed from a CUDA graph with the operands left in L2
#: (``triton.testing.do_bench_cudagraph``) — the conditions of a layer whose quantize and
#: widen have just written them, and of a graph-captured model — instead of Triton's
#: default, launches timed one by one after an L2 flush. H200, each way autotuned twice
#: at the issue's 24 shapes (``probe_gemm_autotune-h200-2026-11-29.json``): the default
#: picked different tiles on the two runs at 14 shapes, up to 1.39x apart in time (M =
#: 512, 3072²), the graph timing at 3, by at most 2.4%; geometric mean of the times
#: +3.8% at M = 512, ±0 at 1024, -1.5% at 4096, +0.4% at 4608.
AUTOTUNE_GRAPH = True


def _bench_config(kernel_call, quantiles):
    """The autotuner's timing of one candidate config (see ``AUTOTUNE_GRAPH``)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "svdquant's fp8 GEMM picks its tiles by timing them on its first call for each "
            "shape, which cannot happen while a CUDA graph is being captured: run the "
            "model once (a warm-up call with the same shapes) before capturing it"
        )
    if AUTOTUNE_GRAPH:
        # Triton times the graph on a stream of its own, which does not wait for the work
        # queued on ours: its candidates would write the output's memory while kernels
        # queued before still read what the allocator had there (v41: a model's first
        # call on a new machine came out different, at times NaN). Wait for them first.
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)
    return triton.testing.do_bench(kernel_call, quantiles=quantiles)


@triton.autotune(
    configs=_configs(),
    do_bench=_bench_config,
    key=["M_BUCKET", "N", "K", "HAS_LORA", "NEXT", "TAIL", "TMA"],
    # the fused next-layer epilogue and the split-K tail accumulate into these
    reset_to_zero=["lora2_ptr", "ws_ptr", "cnt_ptr"],
)
@triton.jit
def _fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    sch_ptr,
    scale_ptr,
    lora_ptr,
    lu_ptr,
    bias_ptr,
    M,
    N,
    K,
    R,
    M_BUCKET,
    stride_am,
    stride_bn,
    stride_cm,
    stride_lm,
    stride_un,
    inv_s2_ptr,
    ld2_ptr,
    scale2_ptr,
    xq2_ptr,
    lora2_ptr,
    K2_OUT,
    R2,
    stride_q2m,
    stride_ld2,
    stride_l2m,
    B1,
    B2,
    B3,
    ws_ptr,
    cnt_ptr,
    NUM_SMS,
    LP,
    O0,
    O1,
    O2,
    O3,
    W0,
    W1,
    W2,
    W3,
    ACT_FROM,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr,
    NEXT: tl.constexpr,
    SPLIT: tl.constexpr,
    ACT: tl.constexpr,
    NEXT_INT4: tl.constexpr,
    BLOCK_R2: tl.constexpr,
    TAIL: tl.constexpr,
    TMA: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    if TAIL:  # the tiles past the last whole wave run as K slices (``_tail_plan``)
        tiles = grid_m * grid_n
        full = (tiles // NUM_SMS) * NUM_SMS
        k_steps = tl.cdiv(K, BLOCK_K)
        slices = tl.minimum(tl.maximum(NUM_SMS // tl.maximum(tiles - full, 1), 1), k_steps)
        in_tail = pid >= full
        q = tl.maximum(pid - full, 0)
        tile = tl.where(in_tail, full + q // slices, pid)
        nslices = tl.where(in_tail, slices, 1)
        per = tl.cdiv(k_steps, nslices) * BLOCK_K
        k_lo = tl.where(in_tail, q % slices, 0) * per
        k_hi = tl.minimum(K, k_lo + per)
    else:
        tile = pid
        k_lo = 0
        k_hi = K
    pid_m, pid_n = grouped_tile(tile, grid_m, grid_n, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if TMA:  # a_ptr, b_ptr: tensor descriptors; the copy engine fills rows past M, N, K with 0
        for k0 in range(k_lo, k_hi, BLOCK_K):
            a = a_ptr.load([pid_m * BLOCK_M, k0])
            b = b_ptr.load([pid_n * BLOCK_N, k0])
            if DOT_FP32:
                acc = tl.dot(fp8_to_f32(a), tl.trans(fp8_to_f32(b)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
    else:
        a_ptrs = a_ptr + rm[:, None] * stride_am + (k_lo + rk)[None, :]
        b_ptrs = b_ptr + rn[None, :] * stride_bn + (k_lo + rk)[:, None]  # [BLOCK_K, BLOCK_N]
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kmask = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            if DOT_FP32:  # the interpreter: fp8 -> fp32 by hand (its own loses NaN)
                acc = tl.dot(fp8_to_f32(a), fp8_to_f32(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K

    run = True
    if TAIL:
        run = nslices == 1
        if nslices > 1:  # add this slice's partial sums; the slice that comes last goes on
            t = tile - full
            wm = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            ws = ws_ptr + t.to(tl.int64) * (BLOCK_M * BLOCK_N) + wm
            tl.atomic_add(ws, acc, sem="relaxed")
            tl.debug_barrier()  # every thread's partial sums are issued before the count
            run = tl.atomic_add(cnt_ptr + t, 1, sem="acq_rel") == nslices - 1
            if run:
                acc = tl.load(ws, cache_modifier=".cg")  # the sum, from L2
    if run:
        _epilogue(
            acc, rm, rn, mmask, nmask, pid_n, c_ptr, sch_ptr, scale_ptr, lora_ptr, lu_ptr,
            bias_ptr, M, N, R, stride_cm, stride_lm, stride_un, inv_s2_ptr, ld2_ptr,
            scale2_ptr, xq2_ptr, lora2_ptr, K2_OUT, R2, stride_q2m, stride_ld2, stride_l2m,
            B1, B2, B3, LP, O0, O1, O2, O3, W0, W1, W2, W3, ACT_FROM, HAS_LORA, HAS_BIAS,
            ROUND_BF16, BLOCK_R, DOT_FP32, NEXT, SPLIT, ACT, NEXT_INT4, BLOCK_R2, PARTS,
            BLOCK_M, BLOCK_N,
        )  # fmt: skip


@triton.jit
def grouped_tile(pid, grid_m, grid_n, GROUP_M: tl.constexpr):
    """Program ``pid``'s tile (row, column) in grouped order: GROUP_M row-tiles in turn
    take each column tile, so that they share the columns they read from L2."""
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % group_m, (pid % width) // group_m


@triton.jit
def _segment_value(col0, B1, B2, B3, V0, V1, V2, V3):
    """The value of the output segment holding column ``col0`` (bounds B1 < B2 < B3)."""
    return tl.where(col0 >= B3, V3, tl.where(col0 >= B2, V2, tl.where(col0 >= B1, V1, V0)))


@triton.jit
def _lowrank_operands(lora_ptr, lu_ptr, rm, rn, mmask, nmask, R, stride_lm, stride_un,
                      col0, B1, B2, B3, LP, O0, O1, O2, O3, W0, W1, W2, W3,
                      PARTS: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """The tile's low-rank activations [BLOCK_M, BLOCK_R] and L_up rows [BLOCK_N, BLOCK_R]
    (contiguous along r: coalesced). ``PARTS``: L_up is compact and the tile's segment
    (the one holding column ``col0``) takes ``lora_act``'s first ``LP`` columns, then
    its own ``W`` from ``LP + O`` on (``fp8_gemm_split``'s ``parts``)."""
    rr = tl.arange(0, BLOCK_R)
    if PARTS:
        off = _segment_value(col0, B1, B2, B3, O0, O1, O2, O3)
        width = LP + _segment_value(col0, B1, B2, B3, W0, W1, W2, W3)
        la_cols = tl.where(rr < LP, rr, rr + off)
        la_ok = rr < width
    else:
        la_cols = rr
        la_ok = rr < R
    la = tl.load(
        lora_ptr + rm[:, None] * stride_lm + la_cols[None, :],
        mask=mmask[:, None] & la_ok[None, :],
        other=0.0,
    )
    lu = tl.load(
        lu_ptr + rn[:, None] * stride_un + rr[None, :],
        mask=nmask[:, None] & (rr < R)[None, :],
        other=0.0,
    )
    return la, lu


@triton.jit
def output_values(
    acc, rm, rn, mmask, nmask, pid_n, sch_ptr, scale_ptr, lora_ptr, lu_ptr, bias_ptr, R,
    stride_lm, stride_un, B1, B2, B3, LP, O0, O1, O2, O3, W0, W1, W2, W3,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr, PARTS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The layer's output at the tile's fp32 sums ``acc`` (columns ``rn``), in fp32:
    scales, the low-rank up projection and the bias."""
    # Every operand's load first: two L2 round trips for the tile instead of three (the
    # compiler keeps each load below the barriers of the layout conversions before it).
    # Loading the low-rank operands before the K loop instead (one round trip, 246
    # registers) measured 0.98-1.03x (probe_gemm_early_lowrank-h200-2026-11-29.json).
    scale = tl.load(scale_ptr) * tl.load(sch_ptr + rn, mask=nmask, other=0.0)
    if HAS_LORA:
        la, lu = _lowrank_operands(lora_ptr, lu_ptr, rm, rn, mmask, nmask, R, stride_lm,
                                   stride_un, pid_n * BLOCK_N, B1, B2, B3, LP, O0, O1, O2, O3,
                                   W0, W1, W2, W3, PARTS, BLOCK_R)  # fmt: skip
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    y = acc * scale[None, :]
    if HAS_LORA:
        y = dot16(la, tl.trans(lu), y, DOT_FP32)  # the 16-bit low-rank branch: one MMA
    if HAS_BIAS:
        y += bias[None, :]
    return y


@triton.jit
def as_written(y, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """fp32 ``y`` as a 16-bit tensor of ``dtype`` holds it once written (read back in
    fp32), rounded to nearest even also where the interpreter's own cast truncates."""
    if ROUND_BF16:
        y = round_bf16(y)
    return y.to(dtype).to(tl.float32)


@triton.jit
def quantize_next(
    y16, rm, rn, mmask, nmask, inv_s2_ptr, ld2_ptr, scale2_ptr, xq2_ptr, lora2_ptr, K2_OUT,
    R2, stride_q2m, stride_ld2, stride_l2m, DOT_FP32: tl.constexpr, NEXT_INT4: tl.constexpr,
    BLOCK_R2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Store the 16-bit tile ``y16`` [BLOCK_M, BLOCK_N] (columns ``rn``) as the next
    layer's quantized input (its groups of 64 lie inside the tile) and add its share of
    that layer's low-rank down projection; the 16-bit values themselves are never written."""
    # The low-rank share first: the 16-bit tile is then dead once x̂ is formed (with
    # both alive through the quantize, the 128x256 tile spilled).
    inv_s2 = tl.load(inv_s2_ptr + rn, mask=nmask, other=1.0)  # 1/s, taken on the host
    r2 = tl.arange(0, BLOCK_R2)
    ld2 = tl.trans(
        tl.load(
            ld2_ptr + r2[:, None] * stride_ld2 + rn[None, :],
            mask=(r2 < R2)[:, None] & nmask[None, :],
            other=0.0,
        )
    )
    part = tl.zeros([BLOCK_M, BLOCK_R2], dtype=tl.float32)
    part = folded_lowrank_dot(y16, ld2, inv_s2, part, DOT_FP32)
    xh = y16.to(tl.float32) * inv_s2[None, :]
    xh = tl.where(nmask[None, :], xh, 0.0)
    inv2 = tl.math.div_rn(1.0, tl.load(scale2_ptr))
    q = quantize_tile(xh, inv2, NEXT_INT4, DOT_FP32, BLOCK_M, BLOCK_N)
    tl.store(
        xq2_ptr + rm[:, None] * stride_q2m + rn[None, :],
        q,
        mask=mmask[:, None] & (rn < K2_OUT)[None, :],
    )
    tl.atomic_add(
        lora2_ptr + rm[:, None] * stride_l2m + r2[None, :],
        part,
        mask=mmask[:, None] & (r2 < R2)[None, :],
        sem="relaxed",
    )


@triton.jit
def _epilogue(
    acc, rm, rn, mmask, nmask, pid_n, c_ptr, sch_ptr, scale_ptr, lora_ptr, lu_ptr, bias_ptr,
    M, N, R, stride_cm, stride_lm, stride_un, inv_s2_ptr, ld2_ptr, scale2_ptr, xq2_ptr,
    lora2_ptr, K2_OUT, R2, stride_q2m, stride_ld2, stride_l2m, B1, B2, B3,
    LP, O0, O1, O2, O3, W0, W1, W2, W3, ACT_FROM,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr, NEXT: tl.constexpr, SPLIT: tl.constexpr,
    ACT: tl.constexpr, NEXT_INT4: tl.constexpr, BLOCK_R2: tl.constexpr, PARTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The tile's fp32 sums ``acc`` -> the layer's output (scales, low-rank up, bias,
    activation), stored whole, split into segments, or quantized as the next layer's
    input. Stored, the activation applies to the columns from ``ACT_FROM`` on (a split
    output's last segments; 0: all)."""
    y = output_values(acc, rm, rn, mmask, nmask, pid_n, sch_ptr, scale_ptr, lora_ptr,
                      lu_ptr, bias_ptr, R, stride_lm, stride_un, B1, B2, B3, LP, O0, O1, O2,
                      O3, W0, W1, W2, W3, HAS_LORA, HAS_BIAS, BLOCK_R, DOT_FP32, PARTS,
                      BLOCK_N)  # fmt: skip
    if ACT != 0:  # the activation reads the layer output as written: in 16 bits
        y = as_written(y, c_ptr.dtype.element_ty, ROUND_BF16)
        if NEXT:  # noqa: SIM114 (a compile-time branch beside a runtime one)
            y = apply_activation(y, ACT)
        elif pid_n * BLOCK_N >= ACT_FROM:  # (a tile lies in one segment)
            y = apply_activation(y, ACT)
    if ROUND_BF16:
        y = round_bf16(y)
    y16 = y.to(c_ptr.dtype.element_ty)
    if NEXT:
        quantize_next(y16, rm, rn, mmask, nmask, inv_s2_ptr, ld2_ptr, scale2_ptr, xq2_ptr,
                      lora2_ptr, K2_OUT, R2, stride_q2m, stride_ld2, stride_l2m, DOT_FP32,
                      NEXT_INT4, BLOCK_R2, BLOCK_M, BLOCK_N)  # fmt: skip
    elif SPLIT:
        # Column segments [0, B1), [B1, B2), [B2, B3), [B3, N) go to separate contiguous
        # [M, width] tensors laid end to end in ``c`` (the segment at column ``start``
        # begins at element M · start). The bounds are multiples of every BLOCK_N, so a
        # tile lies in one segment and its rows stay contiguous.
        col0 = pid_n * BLOCK_N
        start = _segment_value(col0, B1, B2, B3, 0, B1, B2, B3)
        end = _segment_value(col0, B1, B2, B3, B1, B2, B3, N)
        width = tl.multiple_of(end - start, 16)
        seg = c_ptr + start.to(tl.int64) * M
        tl.store(
            seg + rm[:, None] * width + (rn - start)[None, :],
            y16,
            mask=mmask[:, None] & nmask[None, :],
        )
    else:
        tl.store(
            c_ptr + rm[:, None] * stride_cm + rn[None, :],
            y16,
            mask=mmask[:, None] & nmask[None, :],
        )


#: Segment bounds of a split output must be multiples of this (every config's BLOCK_N,
#: and ``gemm_ws``'s: a tile lies in one segment).
SPLIT_ALIGN = 256

#: Run the tiles past the last whole wave as K slices (a split-K tail: at M = 4608,
#: N = 3072 the 432 tiles of 128x256 are 3.27 waves on 132 SMs). ``None`` decides per
#: shape (``_tail_wanted``), ``True``/``False`` force it (the tests and ``bench/gemm.py``).
TAIL_SPLIT: bool | None = None

#: The tail pays (v17, H200: GEMM + low-rank +5% at M = 4608, N = 3072, K = 12288 and
#: 15360; equal at M = 4096) only when a K slice is still long and at least one whole wave
#: runs; at K = 3072 the workspace and the partial sums cost more than the idle SMs (-7%).
TAIL_MIN_K = 8192
#: ... and only when the last wave is mostly idle: at M = 4608 (3.27 waves) it fills 27%
#: of the SMs, at M = 4096 (2.91 waves) 91% — there the Triton kernel's tail gained
#: nothing (v17) and gemm_ws's whole tiles are faster than it (v34's table: 2.00 / 2.04
#: against 1.89 / 1.89x BF16 at K = 12288 / 15360).
TAIL_MAX_LAST_WAVE = 0.5
#: ... and only up to this low-rank rank where gemm_ws could run the shape instead: past
#: it (a rank-128 LoRA on a rank-32 layer: 160) the Triton kernel's epilogue pads the rank
#: to 256 and gemm_ws's chunks are faster. H200, the layer at M = 4608, N = 3072, replayed,
#: the tail against gemm_ws (v59, ``bench/probe_layer.py --rank R --set
#: gemm.TAIL_SPLIT=False``): rank 160 1.033x / 1.057x faster on gemm_ws at K = 15360 /
#: 12288 (FLUX's single blocks' ``proj_out`` and its MLP's fc2), rank 96 0.976x / 0.973x,
#: rank 32 0.960x / 0.953x (the tail stays). 128 pads to 128 like 96 in both kernels.
TAIL_MAX_RANK = 128


def _tail_wanted(m: int, n: int, k: int, sms: int) -> bool:
    """Whether the split-K tail pays at this shape (``TAIL_MIN_K``, ``TAIL_MAX_LAST_WAVE``)."""
    if TAIL_SPLIT is not None:
        return TAIL_SPLIT
    tiles = cdiv(m, 128) * cdiv(n, 256)
    return k >= TAIL_MIN_K and tiles >= sms and tiles % sms <= TAIL_MAX_LAST_WAVE * sms


def _tail_keeps(m: int, n: int, k: int, r: int, sms: int) -> bool:
    """Whether this kernel's split-K tail keeps a shape gemm_ws could run: where the tail
    pays (``_tail_wanted``), up to rank ``TAIL_MAX_RANK``."""
    return _tail_wanted(m, n, k, sms) and r <= TAIL_MAX_RANK


def _tail_plan(m: int, n: int, k: int, bm: int, bn: int, bk: int, sms: int):
    """(whole-wave tiles, tail tiles, K slices per tail tile) — what the kernel derives
    from its block sizes; the grid has ``full + tail · slices`` programs."""
    tiles = cdiv(m, bm) * cdiv(n, bn)
    full = tiles // sms * sms
    tail = tiles - full
    slices = min(max(sms // max(tail, 1), 1), cdiv(k, bk))
    return full, tail, slices


_DUMMIES: dict[torch.device, torch.Tensor] = {}


def _dummy(device: torch.device) -> torch.Tensor:
    """An empty buffer on ``device`` for the pointer arguments a launch never reads, kept
    from call to call (an allocation is host time on every eager call). Empty, it owns no
    memory: one made inside a CUDA graph's pool (torch.compile's ``reduce-overhead``
    warm-up allocates there) would stay alive untracked, and the compiled model refuses
    to run."""
    t = _DUMMIES.get(device)
    if t is None:
        t = _DUMMIES[device] = torch.empty(0, device=device)
    return t


def _launch(
    xq, wq, lora_act, lowrank_up, s_channel, act_scale, bias, out, nxt, bounds=None, parts=None,
    act="none", act_from=0,
) -> None:  # fmt: skip
    """Launch the GEMM; ``nxt`` = (1/smooth2, ld2, scale2, xq2, lora2, act, act_fmt2) or None;
    ``bounds``: the inner column bounds of a split output, ``parts`` its segments'
    low-rank columns (see ``fp8_gemm_split``); without ``nxt``, ``act`` applied to the
    stored columns from ``act_from`` on."""
    m, k = xq.shape
    n = wq.shape[0]
    r = lowrank_up.shape[1]
    if nxt is None:
        s2 = ld2 = sc2 = xq2 = s_channel  # never read
        lora2 = _dummy(xq.device)  # autotune zeroes it between trials
        k2_out = r2 = 0
        int4 = False
        strides2 = (0, 0, 0)
    else:
        s2, ld2, sc2, xq2, lora2, act, act_fmt2 = nxt
        k2_out, r2 = xq2.shape[1], ld2.shape[0]
        int4 = act_fmt2 == "int4"
        strides2 = (xq2.stride(0), ld2.stride(0) if r2 else 0, lora2.stride(0) if r2 else 0)
    sms = num_sms(xq.device, cpu=3)  # interpreter: 3 "SMs", so small shapes have tails
    tail_on = _tail_wanted(m, n, k, sms)
    sms = sms if tail_on else 1  # one "SM": every tile is whole-wave (the kernel's plain path)

    def plan(meta):
        return _tail_plan(m, n, k, meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], sms)

    def grid(meta):
        full, tail, slices = plan(meta)
        return (full + tail * slices,)

    if tail_on:  # partial sums and arrival counts, sized for the largest tail of any config
        tails = [(plan(c.kwargs)[1], c.kwargs) for c in _fp8_gemm_kernel.configs]
        ws_len = max(t * kw["BLOCK_M"] * kw["BLOCK_N"] for t, kw in tails)
        ws = torch.zeros(max(ws_len, 1), dtype=torch.float32, device=xq.device)
        cnt = torch.zeros(max(max(t for t, _ in tails), 1), dtype=torch.int32, device=xq.device)
    else:
        ws = cnt = lora2  # never read
    tma = _tma_ok(xq, wq)
    a, b = (_descriptor(xq), _descriptor(wq)) if tma else (xq, wq)
    args = (
        a,
        b,
        out,
        s_channel,
        act_scale.float().reshape(1),
        lora_act,
        lowrank_up,
        bias if bias is not None else s_channel,
        m,
        n,
        k,
        r,
        _m_bucket(m),
        xq.stride(0),
        wq.stride(0),
        out.stride(0),
        lora_act.stride(0) if r else 0,
        lowrank_up.stride(0) if r else 0,
        s2,
        ld2,
        sc2,
        xq2,
        lora2,
        k2_out,
        r2,
        *strides2,
        *three_bounds(bounds, n),
        ws,
        cnt,
        sms,
        *part_args(parts),
        act_from,
    )
    flags = dict(
        HAS_LORA=r > 0,
        HAS_BIAS=bias is not None,
        ROUND_BF16=needs_bf16_rounding(out.dtype),
        BLOCK_R=block_rank(r),
        DOT_FP32=interpreting(),
        NEXT=nxt is not None,
        SPLIT=bounds is not None,
        ACT=act_code(act),
        NEXT_INT4=int4,
        BLOCK_R2=block_rank(r2),
        TAIL=tail_on,
        TMA=tma,
        PARTS=parts is not None,
    )
    # the autotuner's key (its ``key`` names and every tensor's dtype) and the flags
    key = (_m_bucket(m), n, k, tail_on, tma, out.dtype, lowrank_up.dtype,
           None if bias is None else bias.dtype, AUTOTUNE_GRAPH, *flags.values())  # fmt: skip
    run_tuned(_fp8_gemm_kernel, grid, args, flags, key, xq.device, (m, n, k), (a, b))


def run_tuned(kernel, grid, args, flags, key: tuple, device, shape, operands) -> None:
    """Launch the autotuned ``kernel`` with the tile picked for ``key``: in this process
    (``_PICKED``), by an earlier one (``tile_cache``) or now, timed on this first call.
    ``operands``: the (a, b) a config's pre-hook sizes the descriptors of."""
    config = _PICKED.get((device, key))
    if config is None:  # tuned by an earlier process?
        config = tile_cache.lookup(device, key, kernel.configs)
        if config is not None:
            _PICKED[(device, key)] = config
    if config is None:
        if len(kernel.configs) > 1:
            logger.info("tuning the fp8 GEMM's tile for M ~ %d, N = %d, K = %d", *shape)
        launch_mod.untracked()  # (not through ``launch``: no replay records it)
        kernel[grid](*args, **flags)  # tunes on the key's first call
        _PICKED[(device, key)] = kernel.best_config
        tile_cache.record(device, key, kernel.best_config)
    else:
        kernel.best_config = config  # (what the probes read)
        if config.pre_hook is not None:
            config.pre_hook({"a_ptr": operands[0], "b_ptr": operands[1], **config.kwargs})
        options = config.all_kwargs()
        launch(kernel.fn, grid(options) if callable(grid) else grid, *args, **flags, **options)


#: The tile the autotuner picked, per device and launch key: a call after the first for
#: a key launches the kernel with it directly — the autotuner's own work on every call
#: (its key from ~40 arguments, the dtype of each tensor, the pre-hook's argument dict) is
#: host time an eager layer call pays (``bench/probe_launch.py``). Each pick is also kept
#: on disk (``tile_cache``), so that the next process does not tune again.
_PICKED: dict[tuple, triton.Config] = {}
#: every autotuned GEMM kernel (``gemm_gated`` adds its own), for ``clear_tuning``
TUNED_KERNELS = [_fp8_gemm_kernel]


def clear_tuning() -> None:
    """Forget the GEMM's tuned tiles (the autotuner's, ``_PICKED`` and the tile cache on
    disk): the next call of each shape tunes again."""
    for kernel in TUNED_KERNELS:
        kernel.cache.clear()
    _PICKED.clear()
    tile_cache.forget()


#: Read the GEMM's operands through tensor descriptors (TMA: the copy engine moves whole
#: tiles into shared memory, bounds handled in hardware; the sm_90 main loop 88 SASS
#: instructions per step instead of 146) where the GPU has them (sm_90+), the operands
#: are 16-byte aligned and M ≥ ``TMA_MIN_M``; else pointer loads with masks. H200, GEMM +
#: low-rank + bias in one run (``bench/probe_gemm.py``, v25): 0-4.4% faster at M ≥ 1024
#: (1.45 -> 1.47x BF16 at M = 4608, N = K = 3072), at M = 512 faster on four shapes and
#: 33% / 17% slower on two (3072 x 3072, 9216 x 3072).
TMA_LOADS = True
TMA_MIN_M = 1024


def _tma_ok(xq: torch.Tensor, wq: torch.Tensor) -> bool:
    if not TMA_LOADS or xq.shape[0] < TMA_MIN_M:
        return False
    if not (interpreting() or hopper_or_later(xq.device)):  # the interpreter runs them too
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in (xq, wq))


def _descriptor(t: torch.Tensor) -> TensorDescriptor:
    """A descriptor of the 2-D ``t``; its box is set per config (``_block_shapes``)."""
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [16, 16])


def fp8_gemm(
    xq: torch.Tensor,
    wq: torch.Tensor,
    s_channel: torch.Tensor,
    act_scale: torch.Tensor,
    lora_act: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str = "none",
) -> torch.Tensor:
    """``(xq · wqᵀ) · (S · s_channel) + lora_act · L_upᵀ + b`` -> [M, N] in ``out_dtype``.

    ``xq`` fp8 [M, K], ``wq`` fp8 [N, K], ``s_channel`` fp32 [N], ``act_scale`` fp32 [],
    ``lora_act`` fp32 [M, r], ``lowrank_up`` [N, r]. ``activation`` (``"gelu_tanh"``,
    ``"silu"``, ...) of that output, each rounded to ``out_dtype`` as written: an MLP's
    fc1 whose activation needs no pass of its own. See ``fp8_gemm_ref``.
    """
    m, n = xq.shape[0], wq.shape[0]
    check_activation(activation)
    if lowrank_up.shape[1] > MAX_EPILOGUE_RANK:
        return _wide_lowrank_apart(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias,
                                   out_dtype, activation)  # fmt: skip
    if _ws_wanted(xq, wq, lora_act, lowrank_up, out_dtype):
        return gemm_ws.fp8_gemm_ws(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias,
                                   out_dtype, activation)  # fmt: skip
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m and n:
        _launch(*_contiguous(xq, wq, lora_act, lowrank_up), s_channel, act_scale, bias, y, None,
                act=activation)  # fmt: skip
    return y


#: The widest low-rank branch the GEMMs' epilogues take (``lora.MAX_RANK``, the widest
#: tested): its operands live in registers and shared memory, and at rank 544 every tile
#: of the Triton kernel ran out of shared memory (v57, H200). A wider branch (a layer
#: quantized with a larger rank; a fused group's whole stacked one, outside its parts)
#: adds its up projection after the GEMM instead (``_wide_lowrank_apart``).
MAX_EPILOGUE_RANK = 256


def _wide_lowrank_apart(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out_dtype,
                        activation="none"):  # fmt: skip
    """``fp8_gemm`` of a branch wider than ``MAX_EPILOGUE_RANK``: the GEMM in fp32, then
    the up projection (fp32 sums of the same 16-bit products) and the bias, rounded once
    (then the activation, rounded again)."""
    from svdquant.kernels.quantize import lowrank_mm
    from svdquant.kernels.reference import activation_like

    empty = lora_act[:, :0], lowrank_up[:, :0]
    y = fp8_gemm(xq, wq, s_channel, act_scale, *empty, None, torch.float32)
    lowrank_mm(lora_act.to(lowrank_up.dtype), lowrank_up, y, accumulate=True)
    if bias is not None:
        y += bias.float()
    y = y.to(out_dtype)
    return y if activation == "none" else activation_like(y, activation)


#: Hand ``fp8_gemm`` to the warp-specialized Gluon kernel (``gemm_ws``: a TMA load warp,
#: persistent, the epilogue's operands fetched during the K loop, TMA stores) where it
#: can run (sm_90, a tested triton) and takes the shape, from ``WS_MIN_M`` rows, except
#: where this kernel's split-K tail pays (``_tail_wanted``). H200, GEMM + low-rank + bias
#: in one run (``bench/probe_gemm_ws.py``, v33): 81.2 against 85.8 µs at M = 4608,
#: N = K = 3072 (1.48x BF16 instead of 1.40x), 3-7% faster at N >= 9216, K = 3072 and
#: at M = 4096 (K >= 12288 too, where the tail ran until v34); 2% slower at M = 4608,
#: K >= 12288, where the tail runs instead. At
#: M = 1024 the layer 1.01-1.06x faster on five shapes, 0.975x at 3072² (``probe_layer``);
#: at M = 512 the kernel was up to 1.37x slower with its 128 x 256 tiles (too few for 132
#: SMs) until it chose smaller ones where they pay (``gemm_ws.pick_tile``, v44): then
#: faster than this kernel at all six of the issue's shapes at M = 512 (17.2 against 20.9
#: µs at 3072², 46.2 against 49.7 at 3072 x 12288; ``probe_ws_tiles-…-v44.json``).
WS_GEMM = True
WS_MIN_M = 512
#: A fused group whose layers carry their own LoRAs (``svdquant.fuse``) runs its split
#: GEMM on a compact L_up when True: each part reads the base columns and its own LoRA's
#: (``fp8_gemm_split``'s ``parts``), rank 48 instead of 80/96 for rank-16 LoRAs, a rank
#: gemm_ws takes (with ``gemm_ws.TAKES_PARTS``). On the H200 (v37) a rank-16 LoRA on
#: every linear took the fused FLUX step from 93.6 to 103.1 ms, +5.5 ms of it the GEMMs
#: (the stacked ranks leaving gemm_ws). Measured (v38, ``bench/e2e.py --rows
#: svdq-int4-fused-lora --ab gemm.LORA_PARTS=True --ab gemm_ws.TAKES_PARTS=True``): the
#: step 104.4 -> 100.9 ms through ``cuda_graphed`` (1.035x), 98.96 with
#: ``quantize.SPLIT_RANK`` too (1.060x). Costs the compact L_up beside the full one.
LORA_PARTS = True
#: With ``LORA_PARTS``, how many columns a fused group's stacked low-rank input (the base
#: rows, then every layer's own LoRA rows: the quantize's ``lora_act``) may have while each
#: part's compact rank stays within ``lora.MAX_RANK`` (``svdquant.fuse``).
#: At 256 (the rule before v56) a rank-64 LoRA on every linear left FLUX's single blocks
#: unfused (32 + 4 x 64 = 288), a rank-128 one every block (v55: the LoRA'd step 1.84x the
#: plain one's time, rank 64 1.20x). At 1024 (v56, H200, ``bench/e2e.py --set``) rank 64
#: took 1.11x; 1024 holds FLUX's widest group (4 parts) at the largest part rank allowed.
MAX_STACKED_RANK = 1024
#: ``fp8_gemm_split`` (fused projections) hands over the same way (gemm_ws's split output:
#: one TMA store descriptor per segment).
WS_SPLIT = True


def _ws_wanted(xq: torch.Tensor, wq: torch.Tensor, lora_act: torch.Tensor,
               lowrank_up: torch.Tensor, out_dtype: torch.dtype) -> bool:  # fmt: skip
    m, k = xq.shape
    n = wq.shape[0]
    return (
        WS_GEMM
        and m >= WS_MIN_M
        and gemm_ws.available(xq.device)
        and gemm_ws.supports(n, k, lowrank_up.shape[1], lowrank_up.dtype, out_dtype)
        # its TMA and 16-byte cp.async copies start at aligned addresses
        and all(t.data_ptr() % 16 == 0 for t in (xq, wq, lora_act, lowrank_up))
        and not _tail_keeps(m, n, k, lowrank_up.shape[1], num_sms(xq.device))
    )


def split_supported(sizes: list[int]) -> bool:
    """Whether ``fp8_gemm_split`` takes these segment widths (2 to 4 segments, inner
    bounds multiples of ``SPLIT_ALIGN``)."""
    return 2 <= len(sizes) <= 4 and all(b % SPLIT_ALIGN == 0 for b in inner_bounds(sizes))


def fp8_gemm_split(
    xq: torch.Tensor,
    wq: torch.Tensor,
    s_channel: torch.Tensor,
    act_scale: torch.Tensor,
    lora_act: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    sizes: list[int],
    parts: list[int] | None = None,
    last_act: str = "none",
) -> torch.Tensor:
    """``fp8_gemm`` whose output columns go to ``len(sizes)`` separate contiguous tensors,
    returned end to end in one flat buffer of M · N elements: segment i (``sizes[i]``
    columns starting at column c_i) is ``flat[M·c_i : M·(c_i + sizes[i])].view(M, sizes[i])``.

    For fused projections (q/k/v in one GEMM) whose consumers want each part contiguous:
    splitting the [M, N] output afterwards would cost a copy of it. Needs
    ``split_supported(sizes)``.

    ``parts`` = ``[P, w_0, w_1, ...]`` (one width per segment): ``lora_act`` is [M, P +
    Σ w_i] — a shared prefix of P columns (the base branch), then each segment's own
    block of w_i columns (its layer's LoRA rows) — and ``lowrank_up`` is compact, [N, ≥ P
    + max w_i]: segment i's rows multiply the prefix and its own block only, instead of
    zeros for every other segment's block (``reference.expand_lowrank_parts`` gives the
    full L_up of the same product).

    ``last_act``: the last segment written as ``activation(output)``, rounded as written
    (FLUX's single blocks: the MLP's up projection beside q/k/v, its GELU for ``proj_out``).
    """
    m, n = xq.shape[0], wq.shape[0]
    check_activation(last_act)
    if sum(sizes) != n or not split_supported(sizes):
        raise ValueError(
            f"fp8_gemm_split takes 2-4 segments summing to N = {n} whose inner bounds are "
            f"multiples of {SPLIT_ALIGN}, got {sizes}"
        )
    if parts is not None:
        check_parts(parts, sizes, lora_act.shape[1], lowrank_up.shape[1])
    ws_parts = parts is None or (  # its 16-byte copies of lora_act's rows stay aligned
        gemm_ws.TAKES_PARTS and gemm_ws.parts_supported(parts) and lora_act.shape[1] % 4 == 0
    )
    if WS_SPLIT and ws_parts and _ws_wanted(xq, wq, lora_act, lowrank_up, out_dtype):
        return gemm_ws.fp8_gemm_ws_split(xq, wq, s_channel, act_scale, lora_act, lowrank_up,
                                         bias, out_dtype, sizes, parts, last_act)  # fmt: skip
    flat = torch.empty(m * n, dtype=out_dtype, device=xq.device)
    if m and n:
        _launch(
            *_contiguous(xq, wq, lora_act, lowrank_up), s_channel, act_scale, bias, flat, None,
            inner_bounds(sizes), parts, last_act, n - sizes[-1],
        )  # fmt: skip
    return flat


def check_parts(parts: list[int], sizes: list[int], act_rank: int, up_rank: int) -> None:
    """Refuse ``parts`` that do not describe ``lora_act``'s and the compact L_up's columns."""
    if (
        len(parts) != len(sizes) + 1
        or min(parts) < 0
        or parts[0] + sum(parts[1:]) != act_rank
        or parts[0] + max(parts[1:]) > up_rank
    ):
        raise ValueError(
            f"parts {list(parts)} must be [P, one width per segment] with P + their sum = "
            f"lora_act's {act_rank} columns and P + the largest <= L_up's {up_rank} "
            f"(segments {list(sizes)})"
        )


def fp8_gemm_quantize_next(
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
    """This layer's GEMM whose epilogue writes the *next* layer's quantized input.

    The layer output and ``h = activation(output)`` are each rounded to ``out_dtype`` as
    if written and read back (the unfused pair's numbers); ``h`` then goes exactly through
    ``quantize_act(h, smooth2, lowrank_down2, act_scale2, k_out2, act_fmt2)``. Returns
    ``(xq2 fp8 [M, k_out2], lora_act2 fp32 [M, r2])``; ``activation``: ``"none"``,
    ``"gelu_tanh"`` or ``"silu"``. An MLP (fc1 -> GELU -> fc2) so runs with no standalone
    quantize pass and without writing fc1's output. Reference:
    ``reference.fp8_gemm_quantize_next_ref``.
    """
    m, n = xq.shape[0], wq.shape[0]
    xq2, lora2, nxt = next_layer_input(
        m, n, xq.device, activation, smooth2, lowrank_down2, act_scale2, k_out2, act_fmt2
    )
    if m and n and WS_NEXT and ws_next_fits(xq, wq, lora_act, lowrank_up, out_dtype, nxt):
        return gemm_ws.fp8_gemm_ws_next(xq, wq, s_channel, act_scale, lora_act, lowrank_up,
                                        bias, out_dtype, nxt)  # fmt: skip
    if m and n:
        out = torch.empty(0, dtype=out_dtype, device=xq.device)  # not written
        _launch(*_contiguous(xq, wq, lora_act, lowrank_up), s_channel, act_scale, bias, out, nxt)
    return xq2, lora2


#: Run the epilogue that writes the next layer's quantized input of a GELU MLP's fc1
#: (``fp8_gemm_quantize_next``: FLUX's double blocks, PixArt-Σ) on the warp-specialized
#: GEMM where ``fp8_gemm`` would (``gemm_ws.fp8_gemm_ws_next``: ``quantize_next``'s
#: operations in Gluon, the same codes). Off: no faster than this kernel's epilogue
#: (v46, H200, ``bench/probe_ws_next.py``: FLUX fc1 341 / 399 µs against 351 / 403 at
#: M = 4096 / 4608, PixArt-Σ 98 / 99 against 99 / 100, but 47 against 37 at M = 1024;
#: PixArt-Σ's step 0.99× with it, ``bench/models.py --ab gemm.WS_NEXT=True``) — the
#: epilogue, ~37 instructions an element in the MMA warps, takes about as long as the K
#: loop and cannot overlap it (Nsight Compute: half of those warps' stall samples). A
#: GEGLU's (``gemm_gated.WS_GATED``), with a K loop twice as long for the same output,
#: pays.
WS_NEXT = False


def ws_next_fits(xq, wq, lora_act, lowrank_up, out_dtype, nxt, gated=False) -> bool:
    """Whether gemm_ws would take an epilogue writing the next layer's input (``nxt``):
    where ``fp8_gemm`` hands over its GEMM (``_ws_wanted``) and the epilogue takes the
    next layer (``gemm_ws.supports_next``)."""
    return (
        gemm_ws.supports_next(wq.shape[0], xq.shape[1], lowrank_up.shape[1], nxt[1].shape[0],
                              nxt[3].shape[1], lowrank_up.dtype, out_dtype, gated)
        and _ws_wanted(xq, wq, lora_act, lowrank_up, out_dtype)
    )  # fmt: skip


def next_layer_input(m, k2, device, activation, smooth2, lowrank_down2, act_scale2, k_out2,
                     act_fmt2):  # fmt: skip
    """Check an epilogue's next layer (``k2`` input features) and allocate its quantized
    input ``xq2`` and low-rank sums ``lora2``: ``(xq2, lora2, nxt)``, ``nxt`` the launch's
    tuple (1/smooth2, ld2, scale2, xq2, lora2, activation, act_fmt2)."""
    if act_fmt2 not in ("int4", "fp8"):
        raise ValueError(f"the next layer's activations must be int4 or fp8, got {act_fmt2!r}")
    check_activation(activation)
    if k_out2 < k2 or k_out2 > cdiv(k2, 64) * 64:
        raise ValueError(f"k_out2 = {k_out2} must be the next layer's padded K for K = {k2}")
    # every column < k_out2 lies in some tile (its width a multiple of 64): empty is safe
    xq2 = torch.empty(m, k_out2, dtype=torch.float8_e4m3fn, device=device)
    lora2 = torch.zeros(m, lowrank_down2.shape[0], dtype=torch.float32, device=device)
    nxt = (
        # IEEE reciprocals taken here: a division per column in the epilogue would
        # compile to slow-path calls whose register saves spill the accumulator
        1.0 / smooth2.float().contiguous(),
        lowrank_down2.contiguous(),
        act_scale2.float().reshape(1),
        xq2,
        lora2,
        activation,
        act_fmt2,
    )
    return xq2, lora2, nxt


def _contiguous(xq, wq, lora_act, lowrank_up):
    return xq.contiguous(), wq.contiguous(), lora_act.contiguous(), lowrank_up.contiguous()
