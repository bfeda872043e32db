"""Warp-specialized persistent fp8 GEMM for Hopper (Gluon): the layer's GEMM where M is large.

Same contract as ``gemm.fp8_gemm`` (``(xq · wqᵀ) · (S · s_channel) + lora_act · L_upᵀ + b``,
reference ``reference.fp8_gemm_ref``) and, with ``fp8_gemm_ws_split``, as
``gemm.fp8_gemm_split`` (fused projections: each column segment its own contiguous
tensor), written in Gluon — Triton's lower-level dialect, where the kernel names its own
warps, shared-memory ring and barriers — because what the Triton kernel cannot do on
sm_90 is what cuBLAS's fp8 GEMM does (v26 in
``bench/NOTES.md``: the Triton kernel 87.6 µs against cuBLAS's 73.9 at M = 4608,
N = K = 3072):

* one **load warp** streams A and B tiles through a ring of shared-memory stages with TMA,
  running ahead across tiles — the next tile's first stages arrive while the MMA warps
  are still in the previous tile's epilogue;
* the grid is **persistent** (one program per multiprocessor walking the tiles), so no
  program launch and no pipeline prologue between tiles;
* the epilogue's operands are requested **before the K loop** (the low-rank rows by
  cp.async into shared memory, the column scales and bias into registers), and the tile
  leaves through shared memory in two **TMA stores**.

The two MMA warpgroups compute a 128 × 256 tile with asynchronous ``wgmma``, one step in
flight, and release a stage to the load warp once both have finished reading it (where
such tiles are too few for the GPU, one warpgroup computes 128 × 128 or 64 × 128 tiles
over a deeper ring instead: ``pick_tile``, v44 — or two such warpgroups take a program's
tiles in turn, one's epilogue beside the other's K loop: "ping-pong", v45); the
epilogue applies the per-column scale, the 16-bit low-rank up projection as one more
MMA and the bias. Measured on the H200 (v33, ``bench/probe_gemm_ws.py``), M = 4608,
N = K = 3072: the K loop alone 72 µs (cuBLAS's time); stores straight from the MMA
layout (4 bytes a thread) cost 23 µs more, TMA stores 10, with the operands early 9.

``fp8_gemm_ws_gated`` is a GEGLU's up projection on the same kernel (v45): each ring
stage holds a tile's value rows and its gate rows, and the epilogue writes h =
v · gelu(g) instead of the two halves. ``fp8_gemm_ws_next`` writes the next layer's
quantized input and low-rank sums instead of the output (plain or gated; v46: SDXL's
GEGLU by default, ``gemm_gated.WS_GATED``; a GELU MLP's fc1 only with ``gemm.WS_NEXT``).

GPU only (sm_90, triton with Gluon: 3.6 is what the device runs): there is no interpreter
for Gluon, so ``gemm.fp8_gemm`` stays the portable kernel and the reference for the tests
that run everywhere; ``available`` says whether this one can run.
"""

from __future__ import annotations

import functools

import torch
import triton

from svdquant.kernels._triton_common import (
    ACTIVATIONS,
    act_code,
    block_rank,
    capability_major,
    cdiv,
    inner_bounds,
    interpreting,
    num_sms,
    part_args,
    three_bounds,
)
from svdquant.kernels.launch import launch

try:  # Gluon's API is young: any triton without these names simply lacks this kernel
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    HAVE_GLUON = True
    _GL_DTYPES = {
        torch.bfloat16: gl.bfloat16,
        torch.float16: gl.float16,
        torch.float8_e4m3fn: gl.float8e4nv,
    }
except ImportError:  # pragma: no cover - depends on the installed triton
    HAVE_GLUON = False

__all__ = [
    "available",
    "fp8_gemm_ws",
    "fp8_gemm_ws_gated",
    "fp8_gemm_ws_next",
    "fp8_gemm_ws_split",
    "supports",
    "supports_gated",
    "supports_next",
]

#: Tile and ring: 128 × 256 × 128 fp8 tiles (48 KB a stage), ``STAGES`` stages, two MMA
#: warpgroups (the 128 × 256 fp32 accumulator is 128 registers a thread over 256 threads).
#: Shared memory: 3 stages (144 KB) + the half-tile store buffer (32 KB) + the
#: low-rank operands (40 KB) fit the 227 KB of an sm_90 block; 4 stages do not (v33: 3
#: and 4 stages timed alike before the epilogue needed its buffers).
BLOCK_M, BLOCK_N, BLOCK_K = 128, 256, 128
STAGES = 3
GROUP_M = 8
#: A launch's tile: (BLOCK_M, BLOCK_N, stages, warps of an MMA partition, MMA
#: partitions). ``BLOCK_M`` 64 takes one MMA warpgroup (4 warps), 128 one (two m64 halves)
#: or two. Two partitions (one warpgroup each, "ping-pong") take the program's tiles in
#: turn over the shared ring, each with epilogue buffers of its own, so that one's
#: epilogue (scale, low-rank MMA, bias, stores) runs beside the other's K loop.
Tile = tuple[int, int, int, int, int]
DEFAULT_TILE: Tile = (BLOCK_M, BLOCK_N, STAGES, 8, 1)
#: The tiles ``bench/probe_ws_tiles.py`` times. Measured on the H200 (v44, 38 shapes of
#: the four models at M = 512-4608, GEMM + rank-32 low-rank + bias, replayed): one of the
#: first three was the fastest at every shape; (128, 128, 4, 8) and (64, 256, 4, 4) came
#: within 1-3% of (128, 128, 4, 4) and won nowhere; two programs a multiprocessor (64 x 128
#: and 128 x 128 tiles, registers capped at 200) were 1.1-2.2x slower everywhere (dropped).
#: v45 (44 shapes, ``probe_ws_tiles-…-v45-pingpong.json``): the two one-warpgroup tiles
#: ping-ponged 1.03-1.15x faster than every single-partition tile at 18 of them — where a
#: program walks several tiles of small K (M = 4096 at PixArt-Σ's 3456 x 1152: 40.6 ->
#: 35.2 µs, BF16 52.0); 64 x 256 ping-ponged needs 248 KB of shared memory.
CANDIDATE_TILES: tuple[Tile, ...] = (
    DEFAULT_TILE,
    (128, 128, 4, 4, 1),
    (64, 128, 6, 4, 1),
    (128, 128, 4, 8, 1),
    (64, 256, 4, 4, 1),
    (128, 128, 4, 4, 2),
    (64, 128, 6, 4, 2),
)
#: Each chosen tile's time, modelled as ``c + waves · (a + b · K)`` µs (``waves`` =
#: ⌈tiles / multiprocessors⌉: every program of the persistent grid walks that many tiles),
#: fitted by ``bench/fit_tile_costs.py`` to v45's 44 shapes
#: (``probe_ws_tiles-h200-2026-12-01-v45-pingpong.json``): the model's cheapest tile was
#: the fastest measured at 39 of them, within 3% at 43, 4.6% slower at one (M = 4096,
#: 11200 x 2240); out of sample, v44's 32 other shapes (no ping-pong timed there): the
#: fastest at 29, within 3% at 30, 7% slower at one (M = 2048, 2240²). A ping-ponged tile
#: halves the fixed cost per tile (``a``: 0.84 against 1.77 µs at 128 x 128) — the
#: epilogue hidden — for a larger ``c`` (a partition idles where a program has one tile).
TILE_COSTS: dict[Tile, tuple[float, float, float]] = {
    DEFAULT_TILE: (4.944, 4.275, 0.004999),
    (128, 128, 4, 4, 1): (6.009, 1.77, 0.002975),
    (64, 128, 6, 4, 1): (6.415, 1.094, 0.001712),
    (128, 128, 4, 4, 2): (7.037, 0.835, 0.003015),
    (64, 128, 6, 4, 2): (6.93, 0.41, 0.00176),
}
#: The triton versions this kernel was compiled and measured with (Gluon changes between
#: releases; others fall back to the Triton kernel).
TESTED_TRITON = ("3.6",)


#: The low-rank ranks it takes. Its shared memory holds the ring (144 KB), the store
#: buffer (32 KB) and the low-rank operands (L_up's rows and the activations' 16-bit
#: rows, 0.75 KB per unit of rank, with their fp32 rows staged: 0.5 KB more — in the
#: store buffer above rank 32). Rank 64: 224 KB of the 227 KB of an sm_90 block; rank 128
#: does not fit (v34: with the fp32 rows apart, rank 64 and 128 failed to launch, "out of
#: resource: shared memory"): ranks over 64 go in chunks (``CHUNK_RANKS``); a LoRA on top
#: of the base rank that is no multiple of 16 runs on the Triton kernel. The layer at
#: rank 64, M = 4096, against the Triton kernel (v34, two runs each way): 94.9 / 94.7
#: against 98.7 / 98.8 µs at 3072², 313.1 / 319.6 against 328.8 / 330.1 at N = 12288;
#: next to a two-stage ring instead (bd2bf9c) it had been 1.15-1.19x slower. Ranks must
#: be multiples of 16 (the low-rank rows' copies are 16 bytes, masked by column where the
#: rank is not its power of two). Rank 48 (a rank-16 LoRA on a rank-32 model) against the
#: Triton kernel (v35, ``bench/probe_layer.py --rank 48``, alternated twice): 1.04-1.06x
#: faster at M = 1024 / 4096 where N = 12288 and at M = 4096, 3072², equal at M = 1024,
#: 3072².
RANKS = (0, 16, 32, 48, 64)
#: Ranks over 64 (a LoRA of rank 64 or more stacked on the base rank: 96, 128, 160, up to
#: ``lora.MAX_RANK``, multiples of 16) in chunks of ``RANK_CHUNK`` through rank 64's
#: buffers: the first chunk requested before the K loop as now, each next one after the
#: last one's MMA, its copy's latency in the epilogue — instead of the Triton kernel.
#: Measured (v54, H200, ``bench/probe_layer.py --what layer --rank R --set
#: gemm_ws.CHUNK_RANKS=True``, M = 1024 / 4096 / 4608, N x K = 3072², 12288 x 3072,
#: 3072 x 12288, replayed): the layer 1.00-1.22x as fast at rank 160, 1.00-1.20x at 256,
#: 0.99-1.07x at 128, 0.99-1.08x at 96 (the two 0.99s within a run's spread; most
#: gained where N = 12288: its tiles' epilogues overlap the other partition's K loop).
CHUNK_RANKS = True
RANK_CHUNK = 64
MAX_CHUNKED_RANK = 256
#: Not with the next-layer epilogue (``fp8_gemm_ws_next``): that took chunked ranks too
#: (v54's ``CHUNK_NEXT``), but measured equal there (v55: the fused MLP at fc1 rank 96 /
#: 160, fc2 rank 32, M = 1024 / 4608: 0.99-1.00x, ``probe_layer-h200-2026-12-02-v55-
#: chunk-next-*.json``) and was removed: those ranks keep the Triton kernel's epilogue.


def rank_chunks(r: int) -> tuple[int, int]:
    """(the low-rank buffers' width BR, chunks) for rank ``r``: one chunk of its padded
    width for ``RANKS``, else (``CHUNK_RANKS``) chunks of ``RANK_CHUNK``."""
    if r in RANKS or not CHUNK_RANKS:
        return block_rank(r), 1
    return RANK_CHUNK, cdiv(r, RANK_CHUNK)


def _rank_taken(r: int) -> bool:
    """Whether the low-rank operands of rank ``r`` fit (``RANKS``, ``CHUNK_RANKS``)."""
    chunked = CHUNK_RANKS and RANK_CHUNK < r <= MAX_CHUNKED_RANK and r % 16 == 0
    return r in RANKS or chunked


#: ``gemm.fp8_gemm_split``'s ``parts`` (each segment reading only its own low-rank
#: columns: a fused group's LoRAs at the compact rank, e.g. 48 instead of 80) handed to
#: this kernel (``bench/sass_report.py --kernels gemm_ws_parts``: 168 registers, no
#: spill); with ``gemm.LORA_PARTS`` the LoRA'd fused FLUX step 1.035x (v38, H200).
TAKES_PARTS = True


def parts_supported(parts: list[int]) -> bool:
    """Whether this kernel takes a split's ``parts``: every prefix and width a multiple of
    4 columns, so that each 16-byte copy of the fp32 rows lies in one piece."""
    return all(p % 4 == 0 for p in parts)


def supports(n: int, k: int, r: int, lr_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether ``fp8_gemm_ws`` takes this shape: rows of the output and of the operands
    16-byte aligned (TMA), the low-rank rows copied whole (cp.async, 16 bytes at a time),
    the low-rank operands within shared memory (``RANKS``, ``CHUNK_RANKS``)."""
    sixteen = (torch.bfloat16, torch.float16)
    return (
        n % 8 == 0
        and k % 16 == 0
        and _rank_taken(r)
        and lr_dtype in sixteen
        and out_dtype in sixteen
    )


def supports_gated(n: int, k: int, r: int, lr_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether ``fp8_gemm_ws_gated`` takes an up projection of ``n`` = 2H rows: ``supports``
    for the h output's H columns (its rows and the gate half's weight rows 16-byte
    aligned)."""
    return n % 2 == 0 and supports(n // 2, k, r, lr_dtype, out_dtype)


def available(device: torch.device) -> bool:
    """Whether this kernel can run on ``device``: a Hopper GPU (sm_90: ``wgmma`` exists on
    no other architecture — Blackwell has its own MMA), a Gluon-capable triton of a
    tested version, not under the interpreter."""
    return (
        HAVE_GLUON
        and triton.__version__.rsplit(".", 1)[0] in TESTED_TRITON
        and not interpreting()
        and capability_major(device) == 9
    )


if HAVE_GLUON:

    @gluon.jit
    def _tile_coords(tile, grid_m, grid_n, GROUP: gl.constexpr):
        """Grouped order: ``GROUP`` row tiles share the weight columns they read from L2."""
        width = GROUP * grid_n
        first_m = (tile // width) * GROUP
        group_m = gl.minimum(grid_m - first_m, GROUP)
        return first_m + (tile % width) % group_m, (tile % width) // group_m

    @gluon.jit
    def _load_warp(
        a_desc,
        b_desc,
        g_desc,
        a_bufs,
        b_bufs,
        ready,
        empty,
        M,
        N,
        K,
        BM: gl.constexpr,
        TN: gl.constexpr,
        BK: gl.constexpr,
        S: gl.constexpr,
        GROUP: gl.constexpr,
        GATED: gl.constexpr,
    ):
        # a tile: TN output columns (TN weight rows; gated, TN value rows and the TN gate
        # rows of the same columns: ``g_desc``, the weight's gate half, below them)
        grid_m = gl.cdiv(M, BM)
        grid_n = gl.cdiv(N, TN)
        it = 0
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, grid_m, grid_n, GROUP)
            for k in range(0, K, BK):
                s = it % S
                # a fresh barrier counts as having completed the phase before its first:
                # the first pass over the ring does not wait
                mbarrier.wait(empty.index(s), ((it // S) & 1) ^ 1)
                bar = ready.index(s)
                if GATED:
                    nbytes: gl.constexpr = a_desc.block_type.nbytes + 2 * b_desc.block_type.nbytes
                    mbarrier.expect(bar, nbytes)
                    tma.async_copy_global_to_shared(a_desc, [pid_m * BM, k], bar, a_bufs.index(s))
                    b = b_bufs.index(s)
                    tma.async_copy_global_to_shared(b_desc, [pid_n * TN, k], bar, b.slice(0, TN))
                    tma.async_copy_global_to_shared(g_desc, [pid_n * TN, k], bar, b.slice(TN, TN))
                else:
                    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                    tma.async_copy_global_to_shared(a_desc, [pid_m * BM, k], bar, a_bufs.index(s))
                    tma.async_copy_global_to_shared(b_desc, [pid_n * TN, k], bar, b_bufs.index(s))
                it += 1

    @gluon.jit
    def _store_half(c_desc, c_smem, part, row, col):
        """``part`` (half a tile) to the output at (``row``, ``col``) through ``c_smem`` and
        one TMA store, once the previous store has read the buffer."""
        tma.store_wait(0)
        gl.thread_barrier()  # the wait is the issuing thread's: the others wait for it
        c_smem.store(part)
        fence_async_shared()
        gl.thread_barrier()
        tma.async_copy_shared_to_global(c_desc, [row, col], c_smem)

    @gluon.jit
    def _store_tile(c_desc, c_smem, lo, hi, row, col, BN: gl.constexpr):
        _store_half(c_desc, c_smem, lo, row, col)
        _store_half(c_desc, c_smem, hi, row, col + BN // 2)

    @gluon.jit
    def _tile_rows(pid_n, N, BN: gl.constexpr, GATED: gl.constexpr, layout: gl.constexpr):
        """The weight rows (of s_channel, bias, L_up) behind a tile's BN accumulator
        columns, and which of them exist: BN rows from ``pid_n · BN``; gated, TN = BN / 2
        output columns c, their value rows c and gate rows N + c."""
        j = gl.arange(0, BN, layout=layout)
        if GATED:
            TN: gl.constexpr = BN // 2
            c = pid_n * TN + j % TN
            rows = gl.where(j < TN, c, c + N)
            mask = c < N
        else:
            rows = pid_n * BN + j
            mask = rows < N
        return rows, mask

    @gluon.jit
    def _activation(y, ACT: gl.constexpr):
        """``_triton_common.apply_activation`` in Gluon, the same operations (so the same
        fp32 results): ``ACT`` 0 none, 1 GELU-tanh, 2 SiLU, 3 GELU (erf by Abramowitz &
        Stegun 7.1.26, |error| ≤ 1.5e-7), 4 GELU-tanh with the fast reciprocal."""
        if ACT == 1 or ACT == 4:
            e = gl.exp2(y * (2.302208198144325 + 0.1029432395800235 * y * y))
            if ACT == 4:  # ``_triton_common.fast_rcp``
                r = gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [e + 1.0],
                                              dtype=gl.float32, is_pure=True, pack=1)  # fmt: skip
                y = y - y * r
            else:
                y = y - y / (e + 1.0)
        elif ACT == 2:
            y = y / (1.0 + gl.exp(-y))
        elif ACT == 3:
            z = gl.abs(y) * 0.7071067811865476
            t = 1.0 / (1.0 + 0.3275911 * z)
            p = 1.061405429 * t - 1.453152027
            p = ((p * t + 1.421413741) * t - 0.284496736) * t + 0.254829592
            half_erfc = 0.5 * p * t * gl.exp(-z * z)
            y = y * gl.where(y >= 0, 1.0 - half_erfc, half_erfc)
        return y

    @gluon.jit
    def int4_codes(x, inv2, BM: gl.constexpr, W: gl.constexpr):
        """``quantize.int4_fp8`` in Gluon, the same operations on the GPU (so the same
        codes): fp32 ``x`` [BM, W] (W a multiple of 64: whole groups) as the paper's int4
        codes per 64-column group, written as fp8(code · s_group · inv2); returned
        [BM, W], in whatever layout the reshapes leave."""
        xg = gl.reshape(x, [BM, W // 64, 64])
        amax = gl.max(gl.abs(xg), axis=2)
        q0 = amax * 0.142857149243354797363281250  # RN(a / 7) by two FMAs
        sg = gl.fma(gl.fma(-q0, 7.0, amax), 0.142857149243354797363281250, q0)
        sg = gl.minimum(sg, 65504.0).to(gl.float16).to(gl.float32)
        safe = gl.where(sg > 0.0, sg, 1.0)
        c0 = 1.0 / safe  # RN(1 / s_group): the fast reciprocal and one Newton step
        inv_sg = gl.where(sg > 0.0, gl.fma(c0, gl.fma(-safe, c0, 1.0), c0), 0.0)
        f = gl.expand_dims(gl.minimum(sg * inv2, 3.4028234663852886e38), 2)
        code = gl.fma(xg, gl.expand_dims(inv_sg, 2), 12582912.0) - 12582912.0
        val = gl.minimum(gl.maximum(code, -7.0), 7.0) * f
        return gl.reshape(val.to(gl.float8e4nv), [BM, W])

    @gluon.jit
    def _quantize_next(h16, row, col, c_smem, q_desc, inv_s2_ptr, ld2_ptr, scale2_ptr,
                       lora2_ptr, M, N, R2, stride_ld2, stride_l2m,
                       NEXT_INT4: gl.constexpr, BR2: gl.constexpr, BM: gl.constexpr,
                       W: gl.constexpr, WARPS: gl.constexpr):  # fmt: skip
        """``gemm.quantize_next`` in Gluon: the 16-bit tile ``h16`` [BM, W] (columns ``col``
        on, W a multiple of 64: whole groups) stored as the next layer's quantized input
        and its share of that layer's low-rank down projection added (fp32 atomics); the
        same operations as the Triton epilogue's on the GPU (``quantize.int4_fp8`` with
        its division-free IEEE quotients), so the same codes. ``c_smem`` (the store
        buffer, unused by such a tile) holds L_down's chunk for the MMA, then the codes
        for one TMA store through ``q_desc`` (the next layer's [M, K2_pad] input: the copy
        engine clips rows past M). Stored from the MMA layout instead, two bytes a thread,
        the one pass was slower than this GEMM writing h plus a standalone quantize (v46:
        128 against 109 µs, SDXL's GEGLU at M = 4096)."""
        # h's registers: half an accumulator's columns, the accumulator layout of W columns
        hl: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, W, 32]
        )
        h16 = gl.convert_layout(h16, hl, assert_trivial=True)
        # L_down's chunk loaded as rows of 8 contiguous values a thread
        blk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
        # the low-rank share first: h · (diag(1/s) · L_downᵀ), L_down's chunk [BR2, W]
        # scaled by 1/s and rounded to 16 bits (``folded_lowrank_dot``), h from registers
        rr = gl.arange(0, BR2, layout=gl.SliceLayout(1, blk))
        cn = col + gl.arange(0, W, layout=gl.SliceLayout(0, blk))
        cmask = cn < N
        inv_s2 = gl.load(inv_s2_ptr + cn, mask=cmask, other=1.0)
        ld_mask = gl.expand_dims(rr < R2, 1) & gl.expand_dims(cmask, 0)
        ld = gl.load(ld2_ptr + gl.expand_dims(rr, 1) * stride_ld2 + gl.expand_dims(cn, 0),
                     mask=ld_mask, other=0.0)  # fmt: skip
        ld16 = (ld.to(gl.float32) * gl.expand_dims(inv_s2, 0)).to(ld2_ptr.dtype.element_ty)
        ld_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BR2, W], ld16.dtype)
        ld_smem = c_smem._reinterpret(ld16.dtype, [BR2, W], ld_layout)
        tma.store_wait(0)
        gl.thread_barrier()  # the buffer's last readers (the previous TMA store) are done
        ld_smem.store(ld16)
        fence_async_shared()
        gl.thread_barrier()
        part_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BR2, 16]
        )
        a_op = gl.convert_layout(
            h16.to(ld16.dtype), gl.DotOperandLayout(operand_index=0, parent=part_layout, k_width=2)
        )
        part = warpgroup_mma(a_op, ld_smem.permute((1, 0)),
                             gl.zeros([BM, BR2], gl.float32, part_layout))  # fmt: skip
        pm = row + gl.arange(0, BM, layout=gl.SliceLayout(1, part_layout))
        pr = gl.arange(0, BR2, layout=gl.SliceLayout(0, part_layout))
        gl.atomic_add(lora2_ptr + gl.expand_dims(pm, 1) * stride_l2m + gl.expand_dims(pr, 0),
                      part, mask=gl.expand_dims(pm < M, 1) & gl.expand_dims(pr < R2, 0),
                      sem="relaxed")  # fmt: skip
        # the codes: x̂ = h / s, columns past N zero (the padded K's), in h's own registers
        hn = col + gl.arange(0, W, layout=gl.SliceLayout(0, hl))
        hmask = hn < N
        hs = gl.load(inv_s2_ptr + hn, mask=hmask, other=1.0)
        x = h16.to(gl.float32) * gl.expand_dims(hs, 0)
        x = gl.where(gl.expand_dims(hmask, 0), x, 0.0)
        inv2 = gl.div_rn(1.0, gl.load(scale2_ptr))
        if NEXT_INT4:
            q = gl.convert_layout(int4_codes(x, inv2, BM, W), hl, assert_trivial=True)
        else:  # fp8 operands of x̂ itself (``to_e4m3``: saturated at ±448)
            q = gl.minimum(gl.maximum(x * inv2, -448.0), 448.0).to(gl.float8e4nv)
        q_smem = c_smem._reinterpret(gl.float8e4nv, [BM, W], q_desc.layout)
        gl.thread_barrier()  # every warpgroup's MMA has read L_down's chunk
        q_smem.store(q)
        fence_async_shared()
        gl.thread_barrier()
        tma.async_copy_shared_to_global(q_desc, [row, col], q_smem)

    @gluon.jit
    def _lowrank_copies(la32_smem, lu_smem, lora_ptr, lu_ptr, pid_m, pid_n, M, N, R,
                        stride_lm, stride_un, B1, B2, B3, LP, O0, O1, O2, O3, W0, W1, W2, W3,
                        C0: gl.constexpr, MASK_R: gl.constexpr, PARTS: gl.constexpr,
                        GATED: gl.constexpr, BR: gl.constexpr, BM: gl.constexpr,
                        BN: gl.constexpr, lr_layout: gl.constexpr):  # fmt: skip
        """A tile's low-rank operands, columns ``C0`` to ``C0 + BR`` of the rank, requested
        by cp.async into shared memory: the fp32 activations' rows and L_up's rows."""
        lm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, lr_layout))
        ln, lmask = _tile_rows(pid_n, N, BN, GATED, gl.SliceLayout(1, lr_layout))
        lu_mask = gl.expand_dims(lmask, 1)
        lr = C0 + gl.arange(0, BR, layout=gl.SliceLayout(0, lr_layout))
        # masked by row; by column too where the rank is not BR (a multiple of 16:
        # the mask is uniform over each 16-byte copy); masked elements arrive as 0
        la_mask = gl.expand_dims(lm < M, 1)
        if MASK_R:
            lu_mask = lu_mask & gl.expand_dims(lr < R, 0)
        la_cols = lr
        if PARTS:
            # the tile's segment takes the shared prefix and its own block of
            # columns (``gemm.fp8_gemm_split``'s parts; multiples of 4: each
            # 16-byte copy lies in one piece)
            col = pid_n * BN
            off = gl.where(col >= B3, O3, gl.where(col >= B2, O2, gl.where(col >= B1, O1, O0)))
            width = LP + gl.where(
                col >= B3, W3, gl.where(col >= B2, W2, gl.where(col >= B1, W1, W0))
            )
            la_cols = gl.where(lr < LP, lr, lr + off)
            la_mask = la_mask & gl.expand_dims(lr < width, 0)
        elif MASK_R:
            la_mask = la_mask & gl.expand_dims(lr < R, 0)
        async_copy.async_copy_global_to_shared(
            la32_smem,
            lora_ptr + gl.expand_dims(lm, 1) * stride_lm + gl.expand_dims(la_cols, 0),
            mask=la_mask,
        )
        async_copy.async_copy_global_to_shared(
            lu_smem,
            lu_ptr + gl.expand_dims(ln, 1) * stride_un + gl.expand_dims(lr, 0),
            mask=lu_mask,
        )
        async_copy.commit_group()

    @gluon.jit
    def _mma_warps(
        a_bufs,
        b_bufs,
        ready,
        empty,
        turn,
        la_smem,
        lu_smem,
        la32_smem,
        c_smem,
        c0_desc,
        c1_desc,
        c2_desc,
        c3_desc,
        sch_ptr,
        scale_ptr,
        lora_ptr,
        lu_ptr,
        bias_ptr,
        M,
        N,
        K,
        stride_lm,
        stride_un,
        R,
        B1,
        B2,
        B3,
        LP,
        O0,
        O1,
        O2,
        O3,
        W0,
        W1,
        W2,
        W3,
        inv_s2_ptr,
        ld2_ptr,
        scale2_ptr,
        lora2_ptr,
        R2,
        stride_ld2,
        stride_l2m,
        ACT_FROM,
        HAS_LORA: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        SPLIT: gl.constexpr,
        LA_IN_C: gl.constexpr,
        MASK_R: gl.constexpr,
        PARTS: gl.constexpr,
        BR: gl.constexpr,
        BM: gl.constexpr,
        BN: gl.constexpr,
        BK: gl.constexpr,
        S: gl.constexpr,
        GROUP: gl.constexpr,
        WARPS: gl.constexpr,
        GATED: gl.constexpr,
        ACT: gl.constexpr,
        NEXT: gl.constexpr,
        NEXT_INT4: gl.constexpr,
        BR2: gl.constexpr,
        FIRST: gl.constexpr = 0,
        NPART: gl.constexpr = 1,
        RCHUNKS: gl.constexpr = 1,
    ):
        # NPART MMA partitions take the program's tiles in turn (ping-pong): this one
        # every NPART-th from its FIRST, its ring positions past the others' tiles. The K
        # loops take turns too (``turn``: each partition's barrier, arrived by the other
        # when its K loop is done; unused with one partition): a ring barrier's wait is by
        # phase parity, right only while the load warp is at most one pass ahead or behind,
        # which a partition starting its K loop before the other's had ended broke (v45:
        # launch failures on the GPU where a program had more than one tile)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BN, 32]
        )
        # the low-rank operands' loads: rows of BR contiguous 16-bit / fp32 values
        lr_layout: gl.constexpr = gl.BlockedLayout(
            [1, 8], [32 // (BR // 8), BR // 8], [WARPS, 1], [1, 0]
        )
        # the 16-bit low-rank MMA's accumulator: the same registers (an instruction's K is
        # 16 for 16-bit operands, 32 for fp8), so the conversions between the two are free
        lr_acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BN, 16]
        )
        cols_layout: gl.constexpr = gl.SliceLayout(0, acc_layout)
        vec_layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        # gated (a GEGLU's up projection, ``fp8_gemm_ws_gated``): a tile's BN accumulator
        # columns are TN value columns, then the TN gate columns of the same outputs
        # (weight rows N + c); N is the output's width
        TN: gl.constexpr = BN // 2 if GATED else BN
        grid_m = gl.cdiv(M, BM)
        grid_n = gl.cdiv(N, TN)
        act_scale = gl.load(scale_ptr)
        k_steps = gl.cdiv(K, BK)
        it = FIRST * k_steps
        turns = 0
        nprog = gl.num_programs(0)
        for tile in range(gl.program_id(0) + FIRST * nprog, grid_m * grid_n, NPART * nprog):
            pid_m, pid_n = _tile_coords(tile, grid_m, grid_n, GROUP)
            # the epilogue's operands are requested before the K loop, so that their
            # latency hides behind it: the low-rank rows by cp.async into shared memory,
            # the column scales and bias into one register a thread
            vn, vmask = _tile_rows(pid_n, N, BN, GATED, vec_layout)
            sch_v = gl.load(sch_ptr + vn, mask=vmask, other=0.0)
            if HAS_BIAS:
                bias_v = gl.load(bias_ptr + vn, mask=vmask, other=0.0)
            if HAS_LORA:
                if LA_IN_C:  # the rows land in the store buffer: the last tile's stores first
                    tma.store_wait(0)
                    gl.thread_barrier()
                _lowrank_copies(la32_smem, lu_smem, lora_ptr, lu_ptr, pid_m, pid_n, M, N, R,
                                stride_lm, stride_un, B1, B2, B3, LP, O0, O1, O2, O3, W0, W1,
                                W2, W3, 0, MASK_R, PARTS, GATED, BR, BM, BN,
                                lr_layout)  # fmt: skip
            if NPART > 1:
                # the other partition's K loop before this one's (the first partition's
                # first waits on a fresh barrier's phase before its first: not at all)
                mbarrier.wait(turn.index(FIRST), (turns + 1 - FIRST) & 1)
            acc = gl.zeros([BM, BN], gl.float32, acc_layout)
            for k in range(0, K, BK):
                s = it % S
                mbarrier.wait(ready.index(s), (it // S) & 1)
                acc = warpgroup_mma(
                    a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True
                )
                # the previous step's MMA is done in this warpgroup; once both are, its
                # stage goes back to the load warp (an arrive is one thread's)
                acc = warpgroup_mma_wait(1, deps=(acc,))
                gl.thread_barrier()
                mbarrier.arrive(empty.index((it + S - 1) % S), count=1, pred=k > 0)
                it += 1
            acc = warpgroup_mma_wait(0, deps=(acc,))
            gl.thread_barrier()
            mbarrier.arrive(empty.index((it + S - 1) % S), count=1)
            if NPART > 1:
                mbarrier.arrive(turn.index(1 - FIRST), count=1)
                turns += 1
            it += (NPART - 1) * k_steps  # the other partitions' tiles between this one's

            scale = act_scale * gl.convert_layout(sch_v, cols_layout)
            y = acc * gl.expand_dims(scale, 0)
            if HAS_LORA:
                # cp.async rows masked past M or N arrive as zeros; a rank over the
                # buffers' BR in RCHUNKS chunks of BR, each after the last one's MMA
                # (``CHUNK_RANKS``: the first requested before the K loop, the others here)
                for c in gl.static_range(RCHUNKS):
                    if c > 0:
                        gl.thread_barrier()  # (the last chunk's MMA has read the buffers)
                        _lowrank_copies(la32_smem, lu_smem, lora_ptr, lu_ptr, pid_m, pid_n, M,
                                        N, R, stride_lm, stride_un, B1, B2, B3, LP, O0, O1, O2,
                                        O3, W0, W1, W2, W3, c * BR, MASK_R, PARTS, GATED, BR,
                                        BM, BN, lr_layout)  # fmt: skip
                    async_copy.wait_group(0)
                    gl.thread_barrier()
                    la = la32_smem.load(lr_layout)
                    la_smem.store(la.to(lu_ptr.dtype.element_ty))
                    fence_async_shared()
                    gl.thread_barrier()
                    y = gl.convert_layout(y, lr_acc_layout, assert_trivial=True)
                    y = warpgroup_mma(la_smem, lu_smem.permute((1, 0)), y)
                    y = gl.convert_layout(y, acc_layout, assert_trivial=True)
            if HAS_BIAS:
                y += gl.expand_dims(gl.convert_layout(bias_v, cols_layout).to(gl.float32), 0)
            # the tile goes out through shared memory in two 128-column halves, each one
            # TMA store (stores straight from the MMA layout, 4 bytes a thread, took ~23 µs
            # of the 107 at M = 4608, N = K = 3072); the copy engine clips rows past M
            # (gated: the halves are the value and the gate columns, the one store h)
            halves = gl.permute(gl.reshape(y.to(c0_desc.dtype), [BM, 2, BN // 2]), (0, 2, 1))
            lo, hi = gl.split(halves)
            row = pid_m * BM
            col = pid_n * BN
            if GATED:
                # h = v · act(g), the activation and the product each rounded to the
                # output's dtype as the unfused modules write them (v and g already are)
                t = _activation(hi.to(gl.float32), ACT).to(c0_desc.dtype)
                h = (lo.to(gl.float32) * t.to(gl.float32)).to(c0_desc.dtype)
                if NEXT:
                    _quantize_next(h, row, pid_n * TN, c_smem, c1_desc, inv_s2_ptr, ld2_ptr,
                                   scale2_ptr, lora2_ptr, M, N, R2, stride_ld2, stride_l2m,
                                   NEXT_INT4, BR2, BM, TN, WARPS)  # fmt: skip
                else:
                    _store_half(c0_desc, c_smem, h, row, pid_n * TN)
            elif NEXT:
                # act(output) as the next layer's quantized input, half a tile at a time;
                # the activation reads the output as written (in 16 bits)
                h = _activation(lo.to(gl.float32), ACT).to(c0_desc.dtype)
                _quantize_next(h, row, col, c_smem, c1_desc, inv_s2_ptr, ld2_ptr, scale2_ptr,
                               lora2_ptr, M, N, R2, stride_ld2, stride_l2m, NEXT_INT4, BR2, BM,
                               BN // 2, WARPS)  # fmt: skip
                h = _activation(hi.to(gl.float32), ACT).to(c0_desc.dtype)
                _quantize_next(h, row, col + BN // 2, c_smem, c1_desc, inv_s2_ptr, ld2_ptr,
                               scale2_ptr, lora2_ptr, M, N, R2, stride_ld2, stride_l2m,
                               NEXT_INT4, BR2, BM, BN // 2, WARPS)  # fmt: skip
            elif SPLIT:
                # a split output: the tile lies in one segment (bounds are multiples of
                # BN), a contiguous [M, width] tensor of its own with its own descriptor;
                # the segments from ACT_FROM on as act(output), read as written
                if ACT != 0:  # noqa: SIM102 (a compile-time branch around a runtime one)
                    if col >= ACT_FROM:
                        lo = _activation(lo.to(gl.float32), ACT).to(c0_desc.dtype)
                        hi = _activation(hi.to(gl.float32), ACT).to(c0_desc.dtype)
                if col < B1:
                    _store_tile(c0_desc, c_smem, lo, hi, row, col, BN)
                elif col < B2:
                    _store_tile(c1_desc, c_smem, lo, hi, row, col - B1, BN)
                elif col < B3:
                    _store_tile(c2_desc, c_smem, lo, hi, row, col - B2, BN)
                else:
                    _store_tile(c3_desc, c_smem, lo, hi, row, col - B3, BN)
            else:
                if ACT != 0:  # act(output), read as written
                    lo = _activation(lo.to(gl.float32), ACT).to(c0_desc.dtype)
                    hi = _activation(hi.to(gl.float32), ACT).to(c0_desc.dtype)
                _store_tile(c0_desc, c_smem, lo, hi, row, col, BN)
        tma.store_wait(0)

    @gluon.jit
    def _fp8_gemm_ws_kernel(
        a_desc,
        b_desc,
        g_desc,
        c0_desc,
        c1_desc,
        c2_desc,
        c3_desc,
        sch_ptr,
        scale_ptr,
        lora_ptr,
        lu_ptr,
        bias_ptr,
        M,
        N,
        K,
        stride_lm,
        stride_un,
        R,
        B1,
        B2,
        B3,
        LP,
        O0,
        O1,
        O2,
        O3,
        W0,
        W1,
        W2,
        W3,
        inv_s2_ptr,
        ld2_ptr,
        scale2_ptr,
        lora2_ptr,
        R2,
        stride_ld2,
        stride_l2m,
        ACT_FROM,
        HAS_LORA: gl.constexpr,
        HAS_BIAS: gl.constexpr,
        SPLIT: gl.constexpr,
        MASK_R: gl.constexpr,
        BR: gl.constexpr,
        S: gl.constexpr,
        GROUP: gl.constexpr,
        num_warps: gl.constexpr,
        PARTS: gl.constexpr = False,
        PINGPONG: gl.constexpr = False,
        PP_REGS: gl.constexpr = 208,  # the launch passes gemm_ws.PP_REGS
        GATED: gl.constexpr = False,
        ACT: gl.constexpr = 0,
        NEXT: gl.constexpr = False,
        NEXT_INT4: gl.constexpr = False,
        BR2: gl.constexpr = 16,
        RCHUNKS: gl.constexpr = 1,
    ):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        # a tile's output columns, as many weight rows a load (gated: and as many gate rows
        # from ``g_desc``, the accumulator twice as wide)
        TN: gl.constexpr = b_desc.block_type.shape[0]
        BN: gl.constexpr = 2 * TN if GATED else TN
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [S, BM, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [S, BN, BK], b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        # the fp32 low-rank rows, staged for their conversion to 16 bits: above rank 32 in
        # the store buffer (free between a tile's stores and the next tile's epilogue),
        # so that three stages still fit next to rank 64's operands
        # (``tile_fits`` takes ranks above 32 only with the 4 · BR columns this needs)
        LA_IN_C: gl.constexpr = BR > 32
        la, lu, la32, c = _epilogue_buffers(c0_desc, lu_ptr, BM, BN, BR, LA_IN_C)
        # (each partition's arguments spelled out as one tuple literal: built by tuple
        # concatenation instead, triton 3.6 failed to compile the partitions; held in a
        # variable, the tuple's constexprs arrive as tensors)
        if PINGPONG:
            # two MMA partitions of one warpgroup each, the program's tiles in turn: one
            # in its K loop while the other is in its epilogue (buffers of its own)
            la2, lu2, la32_2, c2 = _epilogue_buffers(c0_desc, lu_ptr, BM, BN, BR, LA_IN_C)
            turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(2):
                mbarrier.init(turn.index(i), count=1)
            gl.warp_specialize(
                [
                    (_mma_warps, (
                        a_bufs, b_bufs, ready, empty, turn, la, lu, la32, c, c0_desc, c1_desc,
                        c2_desc, c3_desc, sch_ptr, scale_ptr, lora_ptr, lu_ptr, bias_ptr, M, N,
                        K, stride_lm, stride_un, R, B1, B2, B3, LP, O0, O1, O2, O3, W0, W1, W2,
                        W3, inv_s2_ptr, ld2_ptr, scale2_ptr, lora2_ptr, R2,
                        stride_ld2, stride_l2m, ACT_FROM, HAS_LORA, HAS_BIAS, SPLIT, LA_IN_C,
                        MASK_R, PARTS, BR, BM, BN, BK, S, GROUP, num_warps, GATED, ACT, NEXT,
                        NEXT_INT4, BR2, 0, 2, RCHUNKS)),
                    (_mma_warps, (
                        a_bufs, b_bufs, ready, empty, turn, la2, lu2, la32_2, c2, c0_desc,
                        c1_desc, c2_desc, c3_desc, sch_ptr, scale_ptr, lora_ptr, lu_ptr,
                        bias_ptr, M, N, K, stride_lm, stride_un, R, B1, B2, B3, LP, O0, O1, O2,
                        O3, W0, W1, W2, W3, inv_s2_ptr, ld2_ptr, scale2_ptr, lora2_ptr,
                        R2, stride_ld2, stride_l2m, ACT_FROM, HAS_LORA, HAS_BIAS, SPLIT,
                        LA_IN_C, MASK_R, PARTS, BR, BM, BN, BK, S, GROUP, num_warps, GATED, ACT,
                        NEXT, NEXT_INT4, BR2, 1, 2, RCHUNKS)),
                    (_load_warp, (a_desc, b_desc, g_desc, a_bufs, b_bufs, ready, empty, M, N, K,
                                  BM, TN, BK, S, GROUP, GATED)),
                ],
                [num_warps, 1],
                [PP_REGS, 40],
            )  # fmt: skip
        else:
            gl.warp_specialize(
                [
                    # (one MMA partition takes no turns: ``empty`` stands for ``turn``)
                    (_mma_warps, (
                        a_bufs, b_bufs, ready, empty, empty, la, lu, la32, c, c0_desc, c1_desc,
                        c2_desc, c3_desc, sch_ptr, scale_ptr, lora_ptr, lu_ptr, bias_ptr, M, N,
                        K, stride_lm, stride_un, R, B1, B2, B3, LP, O0, O1, O2, O3, W0, W1, W2,
                        W3, inv_s2_ptr, ld2_ptr, scale2_ptr, lora2_ptr, R2,
                        stride_ld2, stride_l2m, ACT_FROM, HAS_LORA, HAS_BIAS, SPLIT, LA_IN_C,
                        MASK_R, PARTS, BR, BM, BN, BK, S, GROUP, num_warps, GATED, ACT, NEXT,
                        NEXT_INT4, BR2, 0, 1, RCHUNKS)),
                    (_load_warp, (a_desc, b_desc, g_desc, a_bufs, b_bufs, ready, empty, M, N, K,
                                  BM, TN, BK, S, GROUP, GATED)),
                ],
                [1],
                [40],
            )  # fmt: skip

    @gluon.jit
    def _epilogue_buffers(c0_desc, lu_ptr, BM: gl.constexpr, BN: gl.constexpr,
                          BR: gl.constexpr, LA_IN_C: gl.constexpr):  # fmt: skip
        """An MMA partition's epilogue buffers: the low-rank operands (16-bit rows of the
        activations and of L_up, the fp32 rows staged) and the store buffer."""
        lr_dtype: gl.constexpr = lu_ptr.dtype.element_ty
        la_smem = gl.allocate_shared_memory(
            lr_dtype, [BM, BR], gl.NVMMASharedLayout.get_default_for([BM, BR], lr_dtype)
        )
        lu_smem = gl.allocate_shared_memory(
            lr_dtype, [BN, BR], gl.NVMMASharedLayout.get_default_for([BN, BR], lr_dtype)
        )
        c_smem = gl.allocate_shared_memory(c0_desc.dtype, c0_desc.block_type.shape, c0_desc.layout)
        la32_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        if LA_IN_C:
            la32_smem = c_smem._reinterpret(gl.float32, [BM, BR], la32_layout)
        else:
            la32_smem = gl.allocate_shared_memory(gl.float32, [BM, BR], la32_layout)
        return la_smem, lu_smem, la32_smem, c_smem


def fp8_gemm_ws(
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
    """``gemm.fp8_gemm`` on this kernel (same arguments and result); needs
    ``available(xq.device)``, contiguous 16-byte-aligned operands and a 16-bit L_up."""
    m, n = xq.shape[0], wq.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    _run(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, y, [n], act=activation)
    return y


def fp8_gemm_ws_split(
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
    """``gemm.fp8_gemm_split`` on this kernel (same arguments and flat result: segment i
    contiguous at ``M · c_i``); the inner bounds must be multiples of ``BLOCK_N``;
    ``parts`` multiples of 4 (``parts_supported``)."""
    m, n = xq.shape[0], wq.shape[0]
    if not 1 <= len(sizes) <= 4 or sum(sizes) != n or any(b % BLOCK_N for b in inner_bounds(sizes)):
        raise ValueError(
            f"fp8_gemm_ws_split takes 1-4 segments summing to N = {n} whose inner bounds "
            f"are multiples of {BLOCK_N}, got {sizes}"
        )
    if parts is not None and not parts_supported(parts):
        raise ValueError(f"fp8_gemm_ws_split takes parts that are multiples of 4, got {parts}")
    flat = torch.empty(m * n, dtype=out_dtype, device=xq.device)
    _run(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, flat, sizes, parts,
         act=last_act, act_from=n - sizes[-1])  # fmt: skip
    return flat


def fp8_gemm_ws_gated(
    xq: torch.Tensor,
    wq: torch.Tensor,
    s_channel: torch.Tensor,
    act_scale: torch.Tensor,
    lora_act: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """A GEGLU's up projection (``wq`` [2H, K]: value rows, then gate rows) whose
    epilogue writes ``h = v · gelu(g)`` [M, H] instead of the [M, 2H] output: the layer's
    output, the GELU (erf) and the product each rounded to ``out_dtype`` as the unfused
    modules write them. Arguments as ``fp8_gemm_ws``'s (``supports_gated``); reference
    ``reference.fp8_gemm_gated_ref``."""
    m, n = xq.shape[0], wq.shape[0]
    if not supports_gated(n, xq.shape[1], lowrank_up.shape[1], lowrank_up.dtype, out_dtype):
        raise ValueError(
            f"fp8_gemm_ws_gated takes 2H rows with H a multiple of 8, K of 16, a rank of "
            f"{RANKS}, a 16-bit L_up and output; got {n} rows, K = {xq.shape[1]}, rank "
            f"{lowrank_up.shape[1]}, {lowrank_up.dtype} L_up, {out_dtype} out"
        )
    y = torch.empty(m, n // 2, dtype=out_dtype, device=xq.device)
    _run(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, y, [n // 2], gated=True)
    return y


def fp8_gemm_ws_next(
    xq: torch.Tensor,
    wq: torch.Tensor,
    s_channel: torch.Tensor,
    act_scale: torch.Tensor,
    lora_act: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    nxt: tuple,
    gated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gemm.fp8_gemm_quantize_next`` (``gated``: ``gemm_gated.fp8_gemm_gated_next``) on
    this kernel: the epilogue writes the next layer's quantized input and adds its
    low-rank sums (``nxt``: ``gemm.next_layer_input``'s tuple, whose zeroed ``xq2`` and
    ``lora2`` it fills and returns) — no 16-bit output. ``supports_next`` says whether it
    takes the shapes."""
    xq2, lora2 = nxt[3], nxt[4]
    n = wq.shape[0] // (2 if gated else 1)
    if not supports_next(wq.shape[0], xq.shape[1], lowrank_up.shape[1], nxt[1].shape[0],
                         xq2.shape[1], lowrank_up.dtype, out_dtype, gated):  # fmt: skip
        raise ValueError(
            f"fp8_gemm_ws_next takes a next layer of rank ≤ 64 whose padded input width is "
            f"a multiple of 16; got rank {nxt[1].shape[0]}, width {xq2.shape[1]}"
        )
    out = torch.empty(0, dtype=out_dtype, device=xq.device)  # the output's dtype only
    _run(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out, [n], gated=gated,
         nxt=nxt)  # fmt: skip
    return xq2, lora2


def supports_next(n: int, k: int, r: int, r2: int, k_out2: int, lr_dtype: torch.dtype,
                  out_dtype: torch.dtype, gated: bool = False) -> bool:  # fmt: skip
    """Whether ``fp8_gemm_ws_next`` takes an up projection of ``n`` rows (``gated``: 2H)
    whose next layer has rank ``r2`` and a padded input width ``k_out2``: ``supports`` /
    ``supports_gated``, the next layer's L_down chunk [BR2, half a tile] within the store
    buffer it borrows (r2 ≤ 64), and its input's rows whole 16-byte units for the TMA
    store (as its own GEMM's TMA loads need them)."""
    ok = supports_gated if gated else supports
    return r in RANKS and r2 <= 64 and k_out2 % 16 == 0 and ok(n, k, r, lr_dtype, out_dtype)


@functools.cache
def _layout(rows: int, cols: int, dtype: torch.dtype):
    """The shared-memory layout of a [rows, cols] TMA box (asked once: ~6 µs of host time
    a call, three a launch — an eager layer's launch is host time the GPU waits for)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], _GL_DTYPES[dtype])


#: Whether the cost model may pick the ping-ponged tiles (two MMA partitions in turn, the
#: ``Tile``'s last field): a switch for A/B runs (``bench/models.py --ab
#: gemm_ws.PINGPONG=False``); ``TILE_OVERRIDE`` launches a ping-ponged tile regardless.
#: Ping-pong compiled (triton 3.6, ``sass_report``): no spill at 128 x 128 and 64 x 128,
#: rank 0 and 32, the second partition's registers capped at ``PP_REGS`` (208-224 spilled
#: nothing; 208, the smallest, keeps the register pool's sum furthest from the 64K), named
#: barriers of 128 threads per partition; its K loops take turns (v45: without that, launch
#: failures where a program walked more than one tile).
PINGPONG = True
#: The second MMA partition's registers when ping-ponged (``setmaxnreg``).
PP_REGS = 208
#: Shared memory of an sm_90 block (227 KB), less a margin for alignment and barriers.
SMEM_BYTES = 227 * 1024 - 2048


def _smem_bytes(tile: Tile, br: int) -> int:
    """The shared memory a launch of ``tile`` takes (its ring of fp8 stages, and per MMA
    partition the store buffer and the low-rank operands; ``sass_report`` agrees within
    1.1 KB at the default tile); above rank 32 the fp32 rows are staged in the store
    buffer (``tile_fits``)."""
    bm, bn, stages, _, partitions = tile
    la32 = 0 if br > 32 else bm * br * 4
    epilogue = bm * bn + (bm + bn) * br * 2 + la32
    return stages * (bm + bn) * BLOCK_K + partitions * epilogue


def tile_fits(tile: Tile, r: int) -> bool:
    """Whether ``tile`` takes a low-rank branch of rank ``r``: its fp32 rows staged in
    the store buffer need ``BLOCK_N >= 4 · BR`` above rank 32 (else no room for them),
    and everything within shared memory (two sets of epilogue buffers ping-pong, whose
    partitions are one warpgroup each)."""
    bm, bn, _, warps, partitions = tile
    br = rank_chunks(r)[0]
    shaped = (bm == 128 or warps == 4) and (partitions == 1 or (partitions == 2 and warps == 4))
    shaped = shaped and (br <= 32 or bn >= 4 * br)
    return shaped and _smem_bytes(tile, br) <= SMEM_BYTES


def tile_name(tile: Tile) -> str:
    """``tile`` as the probe, the tests and NOTES.md name it: ``128x128x4x4``, with
    ``pp`` appended where two MMA partitions take its tiles in turn."""
    return "x".join(map(str, tile[:4])) + ("pp" if tile[4] == 2 else "")


#: The tile of the epilogues that write the next layer's quantized input
#: (``fp8_gemm_ws_next``): the epilogue runs in the MMA warps after each tile's K loop,
#: so eight warps to share it beat the cost model's pick, which times a 16-bit store —
#: fastest of the seven candidates at all four of ``bench/probe_ws_next.py``'s shapes
#: (FLUX and PixArt-Σ fc1, SDXL's two GEGLUs; M = 4096, v46); the ping-ponged tiles,
#: whose one-warpgroup epilogue should hide behind the other partition's K loop, were
#: 1.05-1.30× slower.
NEXT_TILE: Tile = (128, 256, 3, 8, 1)


def pick_tile(m: int, n: int, k: int, r: int, sms: int, next_layer: bool = False) -> Tile:
    """The tile for this shape: ``TILE_OVERRIDE`` where set and it fits, else
    (``next_layer``: an epilogue writing the next layer's input) ``NEXT_TILE`` where it
    fits, else the cheapest of ``TILE_COSTS`` that takes rank ``r`` on ``sms``
    multiprocessors (the ping-ponged ones only with ``PINGPONG``)."""
    if TILE_OVERRIDE is not None:
        if not (isinstance(TILE_OVERRIDE, tuple) and len(TILE_OVERRIDE) == 5):
            raise ValueError(
                "gemm_ws.TILE_OVERRIDE must be (BLOCK_M, BLOCK_N, stages, warps, MMA "
                f"partitions), one of {list(CANDIDATE_TILES)}; got {TILE_OVERRIDE!r} (before "
                "v45 a tile had four fields: add 1, one partition)"
            )
        if tile_fits(TILE_OVERRIDE, r):
            return TILE_OVERRIDE
    if next_layer and tile_fits(NEXT_TILE, r):
        return NEXT_TILE
    return _cheapest_tile(m, n, k, r, sms, PINGPONG)


@functools.lru_cache(maxsize=4096)
def _cheapest_tile(m: int, n: int, k: int, r: int, sms: int, pingpong: bool) -> Tile:
    """``pick_tile``'s model, cached per shape and ``PINGPONG``."""
    fits = (t for t in TILE_COSTS if tile_fits(t, r) and (pingpong or t[4] == 1))
    return min(fits, key=lambda t: tile_cost(TILE_COSTS[t], t, m, n, k, sms))


def tile_cost(abc: tuple[float, float, float], tile: Tile, m: int, n: int, k: int,
              sms: int) -> float:  # fmt: skip
    """The modelled µs of ``tile`` at M x N x K: ``c + waves · (a + b · K)`` with
    ``abc`` = (c, a, b) and ``waves`` the tiles each program of the grid walks."""
    c, a, b = abc
    return c + cdiv(cdiv(m, tile[0]) * cdiv(n, tile[1]), sms) * (a + b * k)


#: A tile for every launch (``bench/probe_ws_tiles.py`` and the tests set it); ``None``:
#: the cost model's.
TILE_OVERRIDE: Tile | None = None


def _run(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out, sizes,
         parts=None, gated=False, nxt=None, act="none", act_from=0) -> None:  # fmt: skip
    """Launch the kernel writing ``out``: [M, N], or (several ``sizes``) the segments
    laid end to end in the flat ``out``, or (``gated``) h = v · gelu(g), [M, N / 2]; with
    ``nxt`` (``gemm.next_layer_input``'s tuple) the next layer's quantized input instead,
    ``out`` only giving the dtype. ``act``: stored (not gated, no ``nxt``), the columns
    from ``act_from`` on as ``act(output)``."""
    m, k = xq.shape
    n = wq.shape[0]
    r = lowrank_up.shape[1]
    out_dtype = out.dtype
    if not supports(n, k, r, lowrank_up.dtype, out_dtype):
        raise ValueError(
            f"fp8_gemm_ws takes N a multiple of 8, K of 16, a rank of {RANKS} (with "
            f"CHUNK_RANKS: a multiple of 16 up to {MAX_CHUNKED_RANK}), a 16-bit "
            f"L_up and output; got N = {n}, K = {k}, rank {r}, "
            f"{lowrank_up.dtype} L_up, {out_dtype} out"
        )
    sms = num_sms(xq.device)
    bm, bn, stages, warps, partitions = pick_tile(m, n, k, r, sms, nxt is not None)
    if m == 0 or n == 0:
        return
    xq, wq = xq.contiguous(), wq.contiguous()
    lora_act, lowrank_up = lora_act.contiguous(), lowrank_up.contiguous()
    a_layout = _layout(bm, BLOCK_K, torch.float8_e4m3fn)
    a = GluonDescriptor.from_tensor(xq, [bm, BLOCK_K], a_layout)
    # a tile's weight rows a load: gated, the value and the gate half, bn / 2 rows of each
    rows = bn // 2 if gated else bn
    b_layout = _layout(rows, BLOCK_K, torch.float8_e4m3fn)
    if gated:
        b = GluonDescriptor.from_tensor(wq[: n // 2], [rows, BLOCK_K], b_layout)
        g = GluonDescriptor.from_tensor(wq[n // 2 :], [rows, BLOCK_K], b_layout)
        n = n // 2
    else:
        b = g = GluonDescriptor.from_tensor(wq, [rows, BLOCK_K], b_layout)
    c_block = [bm, bn // 2]
    c_layout = _layout(*c_block, out_dtype)
    bounds = inner_bounds(sizes)
    if nxt is not None:  # nothing stored through it: a box-sized stand-in for its types
        out = torch.empty(c_block, dtype=out_dtype, device=xq.device)
        segments = [out]
    else:  # one descriptor per segment, each a contiguous [M, width] tensor in ``out``
        flat = out.view(-1)
        pairs = zip([0, *bounds], sizes, strict=True)
        segments = [flat[m * c : m * c + m * w].view(m, w) for c, w in pairs]
    descs = [GluonDescriptor.from_tensor(seg, c_block, c_layout) for seg in segments]
    if nxt is not None:  # the second: the next layer's fp8 input, stored half a tile a box
        xq2 = nxt[3]
        descs.append(GluonDescriptor.from_tensor(xq2, c_block, _layout(*c_block, xq2.dtype)))
    descs += [descs[-1]] * (4 - len(descs))
    tiles = cdiv(m, bm) * cdiv(n, rows)
    br, chunks = rank_chunks(r)
    next_args, next_consts = _next_args(nxt, s_channel, gated, act)
    launch(
        _fp8_gemm_ws_kernel,
        (min(tiles, sms),),
        a,
        b,
        g,
        *descs,
        s_channel,
        act_scale.float().reshape(1),
        lora_act,
        lowrank_up,
        bias if bias is not None else s_channel,
        m,
        n,
        k,
        lora_act.stride(0) if r else 0,
        lowrank_up.stride(0) if r else 0,
        r,
        *three_bounds(bounds, n),
        *part_args(parts),
        *next_args,
        act_from,
        HAS_LORA=r > 0,
        HAS_BIAS=bias is not None,
        SPLIT=len(sizes) > 1,
        MASK_R=r not in (0, br * chunks),
        BR=br,
        S=stages,
        GROUP=GROUP_M,
        num_warps=warps,
        PARTS=parts is not None,
        PINGPONG=partitions == 2,
        PP_REGS=PP_REGS,
        GATED=gated,
        **next_consts,
        RCHUNKS=chunks,
    )


def _next_args(nxt, dummy: torch.Tensor, gated: bool, act: str = "none") -> tuple[tuple, dict]:
    """The kernel's next-layer arguments (1/s, L_down, S, lora2, R2 and the strides; xq2
    goes by a descriptor) and constants (activation, format, L_down's width) from
    ``gemm.next_layer_input``'s tuple; stand-ins where there is none (the activation: the
    gated output's GELU, or ``act`` of a stored one)."""
    if nxt is None:
        code = ACTIVATIONS["gelu"] if gated else act_code(act)
        consts = dict(ACT=code, NEXT=False, NEXT_INT4=False, BR2=block_rank(0))
        return (dummy, dummy, dummy, dummy, 0, 0, 0), consts
    inv_s2, ld2, scale2, _, lora2, activation, act_fmt2 = nxt
    r2 = ld2.shape[0]
    args = (inv_s2, ld2, scale2, lora2, r2, ld2.stride(0) if r2 else 0,
            lora2.stride(0) if r2 else 0)  # fmt: skip
    consts = dict(ACT=act_code(activation), NEXT=True, NEXT_INT4=act_fmt2 == "int4",
                  BR2=block_rank(r2))  # fmt: skip
    return args, consts
