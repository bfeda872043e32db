"""A GEMM on the stored 4-bit weight with no widen: codes as exact fp8 integers, the
group scales applied in the K loop.

    PYTHONPATH=src python bench/probe_group_scaled.py [--ms 512,1024,4096]
        [--shapes 3072x3072,...] [--out DIR]

The engine widens each layer's weight to ``fp8(code · s_group / c)`` before its GEMM
(``kernels/widen.py``): a pass over the weight every call (5 ms of a FLUX step, and the
loss at M = 512 and in the small layers of PixArt-Σ, SDXL and SANA, NOTES v39); a GEMM
that decodes the same values in its own warps (``bench/probe_ws_decode.py``) is equal but
1.3-3.2x slower — the multiply by ``s_group / c`` and the rounding of every code, once per
row tile, cost ~3 MMA steps. Here the weight operand is the **code itself** (-8..7: exact
in e4m3, one conversion a code, no multiply) and each 64-wide group's MMA partial sum is
scaled by its group scale in the accumulator — the "fine-grained scaling" of fp8 GEMMs:

    y = S · s_tensor · Σ_g s_group[n, g] · (xq[:, g] · codes[n, g]ᵀ)

Per stage (two groups, K = 128): a **load warpgroup** brings A as two [128, 64] boxes and
the packed codes [128, 64 bytes] by TMA; a **decode warpgroup** turns the codes into two
fp8 tiles and loads the two groups' scales (plain loads: a TMA box of them faulted on the
H200, v39); the **MMA warpgroups** run each group's MMA into a partial accumulator
(``use_acc=False``), wait for it and add it scaled — promoting the fp8 MMA's sums to fp32
every 64 K, which is also what keeps Hopper's fp8 accumulation exact enough.

Numbers: not the engine's (its weight rounds ``code · s_group / c`` to fp8; these keep
every code exact — closer to the stored weight), so the check is against
``grouped_reference`` (fp32 sums of the same products) within bf16 rounding, and the
engine's output is reported beside. Times (one run, CUDA graphs): BF16 ``F.linear``, widen
+ ``gemm_ws`` (the engine's layer without its low-rank branch and bias), this kernel with
the codes converted through fp32, with ``LUT`` (three byte permutations per 4 codes,
``lut_decode_word``) and with ``LUT`` + ``PIPE`` (each stage's second MMA in flight while
the first one's partial sum is scaled) and with ``LUT`` in two decode warpgroups — the
same operand bytes and the same sums, so the four outputs must be equal.
GPU only (sm_90, triton 3.6's Gluon); compiled for sm_90 on any machine by
``bench/sass_report.py --kernels group_scaled``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import probe_ws_decode as wsd

from svdquant.kernels import gemm_ws as g

if g.HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

#: a tile's rows and columns, and the K of a stage (two 64-wide groups)
BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 128
#: ring stages: A 16 KB + codes 8 KB + the two fp8 code tiles 16 KB + scales 0.5 KB
STAGES = 4
#: rows the decode warpgroup converts at once
CHUNK = 32
#: the decode warpgroup's registers a thread (no multiplies: fewer than the widen's)
DECODE_REGS = 80

#: e4m3 bytes of the int4 codes by their low three bits: 0..7, and -8..-1 (``LUT``)
E4M3_POS = (0x00, 0x38, 0x40, 0x44, 0x48, 0x4A, 0x4C, 0x4E)
E4M3_NEG = (0xD0, 0xCE, 0xCC, 0xCA, 0xC8, 0xC4, 0xC0, 0xB8)


def _word(table: tuple[int, ...]) -> int:
    return sum(b << (8 * i) for i, b in enumerate(table))


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte i of the result is byte ``sel``'s nibble i
    (bits 0-2) of {b, a}, or that byte's sign replicated where the nibble's bit 3 is set."""
    src = a | (b << 32)
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = (src >> (8 * (nib & 7))) & 0xFF
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * i)
    return out


def lut_decode_word(w: int) -> tuple[int, int]:
    """The ``LUT`` decode of one 32-bit word of packed codes (bytes j = 0..3, low nibble
    first) into the e4m3 bytes of its 8 codes in column order, as two words — the inline
    PTX's steps, in Python: two ``prmt`` lookups of the low three bits (codes 0..7 and
    -8..-1), and a third that turns each code's sign bit into a byte mask."""
    pos_lo, pos_hi = _word(E4M3_POS[:4]), _word(E4M3_POS[4:])
    neg_lo, neg_hi = _word(E4M3_NEG[:4]), _word(E4M3_NEG[4:])
    out = []
    for c in (w & 0xFFFF, (w >> 16) & 0xFFFF):  # four codes: nibbles in column order
        sel = c & 0x7777
        sign = c & 0x8888
        mask = _prmt(0x80, 0, sign | ((sign >> 1) ^ 0x4444))  # 0xFF where negative
        pos, neg = _prmt(pos_lo, pos_hi, sel), _prmt(neg_lo, neg_hi, sel)
        out.append((neg & mask) | (pos & ~mask & 0xFFFFFFFF))
    return out[0], out[1]


def grouped_reference(
    xq: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    act_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``S · s_tensor · Σ_g s_group[:, g] · (xq_g · codes_gᵀ)`` in fp32 (int4 g64): what
    the kernel computes, one group's partial sum at a time."""
    from svdquant import formats

    codes = formats.unpack(qweight).float()  # [N, K], -8..7
    x = xq.float()
    y = torch.zeros(x.shape[0], codes.shape[0], dtype=torch.float32, device=x.device)
    for gi in range(codes.shape[1] // 64):
        part = x[:, gi * 64 : (gi + 1) * 64] @ codes[:, gi * 64 : (gi + 1) * 64].T
        y += part * wscales[:, gi].float()
    return (y * (act_scale.float() * wtensor_scale.float())).to(out_dtype)


def _lut_ptx() -> str:
    """``lut_decode_word`` in PTX: $2 the word of codes, $0 / $1 columns 0-3 / 4-7."""
    pos, neg = E4M3_POS, E4M3_NEG
    pos_t = f"{_word(pos[:4]):#x}, {_word(pos[4:]):#x}"
    neg_t = f"{_word(neg[:4]):#x}, {_word(neg[4:]):#x}"

    def half(src: str, dst: str) -> list[str]:
        return [
            f"and.b32 sel, {src}, 0x7777;",
            f"and.b32 sgn, {src}, 0x8888;",
            "shr.b32 t, sgn, 1;",
            "xor.b32 t, t, 0x4444;",
            "or.b32 t, t, sgn;",  # 0x8 where negative (sign of 0x80: 0xFF), else 0x4 (0x00)
            "prmt.b32 m, 0x80, 0, t;",
            f"prmt.b32 p, {pos_t}, sel;",
            f"prmt.b32 n, {neg_t}, sel;",
            "and.b32 n, n, m;",
            "not.b32 m, m;",
            "and.b32 p, p, m;",
            f"or.b32 {dst}, p, n;",
        ]

    body = [*half("$2", "$0"), "shr.u32 c, $2, 16;", *half("c", "$1")]
    return "{\n.reg .b32 c, sel, sgn, t, m, p, n;\n" + "\n".join(body) + "\n}"


if g.HAVE_GLUON:
    #: ``lut_decode_word`` in PTX (``_lut_ptx``), for ``inline_asm_elementwise``
    _LUT_PTX = gl.constexpr(_lut_ptx())

    @gluon.jit
    def _lut_decode(w):
        """``lut_decode_word`` on int32 words: (columns 0-3, columns 4-7) as e4m3 bytes."""
        return gl.inline_asm_elementwise(
            asm=_LUT_PTX,
            constraints="=r,=r,r",
            args=[w],
            dtype=(gl.int32, gl.int32),
            is_pure=True,
            pack=1,
        )

    @gluon.jit
    def _gs_load(a_desc, q_desc, a_bufs, q_bufs, ready, empty, M, N, K,
                 BM: gl.constexpr, BN: gl.constexpr, S: gl.constexpr,
                 GROUP: gl.constexpr):  # fmt: skip
        grid_m = gl.cdiv(M, BM)
        grid_n = gl.cdiv(N, BN)
        it = 0
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            pid_m, pid_n = g._tile_coords(tile, grid_m, grid_n, GROUP)
            for k in range(0, K, 128):
                s = it % S
                mbarrier.wait(empty.index(s), ((it // S) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, 2 * a_desc.block_type.nbytes + q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [pid_m * BM, k], bar, a_bufs.index(2 * s))
                tma.async_copy_global_to_shared(
                    a_desc, [pid_m * BM, k + 64], bar, a_bufs.index(2 * s + 1)
                )
                tma.async_copy_global_to_shared(q_desc, [pid_n * BN, k // 2], bar, q_bufs.index(s))
                it += 1

    @gluon.jit
    def _gs_decode(q_bufs, b_bufs, sc_bufs, ready, decoded, ws_ptr, stride_ws, M, N, K,
                   BM: gl.constexpr, BN: gl.constexpr, S: gl.constexpr, GROUP: gl.constexpr,
                   RC: gl.constexpr, LUT: gl.constexpr, ROW0: gl.constexpr,
                   ROWS: gl.constexpr):  # fmt: skip
        # this warpgroup decodes the tile's rows ROW0 .. ROW0 + ROWS (two warpgroups: half
        # each, DECODE_WGS). A chunk's codes: RC rows x 64 bytes (both groups), 8 bytes of
        # each group a thread — as [rows, group, 32 bytes] the same registers (no layout
        # conversion), so that the two groups' values can be split apart in registers
        codes2: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        # LUT: the same bytes as 32-bit words, 2 words of each group a thread, through
        # 32-bit views of the code and operand buffers (their 64-byte rows and swizzle)
        words2: gl.constexpr = gl.BlockedLayout([1, 2], [8, 4], [4, 1], [1, 0])
        q32_layout: gl.constexpr = gl.NVMMASharedLayout(
            swizzle_byte_width=q_bufs.layout.swizzle_byte_width, element_bitwidth=32, rank=2
        )
        b32_layout: gl.constexpr = gl.NVMMASharedLayout(
            swizzle_byte_width=b_bufs.layout.swizzle_byte_width, element_bitwidth=32, rank=2
        )
        vec: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        grid_m = gl.cdiv(M, BM)
        grid_n = gl.cdiv(N, BN)
        it = 0
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            pid_n = g._tile_coords(tile, grid_m, grid_n, GROUP)[1]
            rn = pid_n * BN + ROW0 + gl.arange(0, ROWS, layout=vec)
            for k in range(0, K, 128):
                s = it % S
                # the two groups' scales of the tile's rows, loaded while the stage fills;
                # stored once it is ready (the MMA warps released the stage, read its
                # old scales, before its loads began)
                ptrs = ws_ptr + rn * stride_ws + k // 64
                sc0 = gl.load(ptrs, mask=rn < N, other=0.0)
                sc1 = gl.load(ptrs + 1, mask=rn < N, other=0.0)
                mbarrier.wait(ready.index(s), (it // S) & 1)
                sc_bufs.index(2 * s).slice(ROW0, ROWS).store(sc0)
                sc_bufs.index(2 * s + 1).slice(ROW0, ROWS).store(sc1)
                for r0 in gl.static_range(ROW0, ROW0 + ROWS, RC):
                    if LUT:  # 8 codes a word, 3 byte permutations per 4 (``lut_decode_word``)
                        q32 = q_bufs.index(s)._reinterpret(gl.int32, [BN, 16], q32_layout)
                        wq = gl.reshape(q32.slice(r0, RC, 0).load(words2), [RC, 2, 8])
                        a, b = _lut_decode(wq)  # columns 8i..8i+3, 8i+4..8i+7
                        w = gl.reshape(gl.join(a, b), [RC, 2, 16])
                        w0, w1 = gl.split(gl.permute(w, (0, 2, 1)))
                        b_bufs.index(2 * s)._reinterpret(gl.int32, [BN, 16], b32_layout).slice(
                            r0, RC, 0
                        ).store(w0)
                        b_bufs.index(2 * s + 1)._reinterpret(gl.int32, [BN, 16], b32_layout).slice(
                            r0, RC, 0
                        ).store(w1)
                    else:
                        q = q_bufs.index(s).slice(r0, RC, 0).load(codes2)
                        b = gl.reshape(q, [RC, 2, 32]).to(gl.int32)
                        lo = wsd._int4_value(b & 0xF)
                        hi = wsd._int4_value((b >> 4) & 0xF)
                        # [rows, group, 64 values]: value 2j of a group is byte j's low nibble
                        w = gl.reshape(gl.join(lo, hi), [RC, 2, 64])
                        w0, w1 = gl.split(gl.permute(w, (0, 2, 1)))
                        b_bufs.index(2 * s).slice(r0, RC, 0).store(w0.to(gl.float8e4nv))
                        b_bufs.index(2 * s + 1).slice(r0, RC, 0).store(w1.to(gl.float8e4nv))
                fence_async_shared()
                gl.thread_barrier()
                mbarrier.arrive(decoded.index(s), count=1)
                it += 1

    @gluon.jit
    def _gs_mma(a_bufs, b_bufs, sc_bufs, ready, decoded, empty, c_smem, c_desc, ts_ptr,
                scale_ptr, M, N, K, BM: gl.constexpr, BN: gl.constexpr, S: gl.constexpr,
                GROUP: gl.constexpr, WARPS: gl.constexpr, PIPE: gl.constexpr):  # fmt: skip
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BN, 32]
        )
        cols: gl.constexpr = gl.SliceLayout(0, acc_layout)
        grid_m = gl.cdiv(M, BM)
        grid_n = gl.cdiv(N, BN)
        out_scale = gl.load(scale_ptr) * gl.load(ts_ptr)
        part = gl.zeros([BM, BN], gl.float32, acc_layout)
        part2 = gl.zeros([BM, BN], gl.float32, acc_layout)
        it = 0
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            pid_m, pid_n = g._tile_coords(tile, grid_m, grid_n, GROUP)
            acc = gl.zeros([BM, BN], gl.float32, acc_layout)
            for _ in range(0, K, 128):
                s = it % S
                mbarrier.wait(ready.index(s), (it // S) & 1)  # A landed
                mbarrier.wait(decoded.index(s), (it // S) & 1)  # codes and scales ready
                if PIPE:  # the second group's MMA runs while the first one's is scaled
                    part = warpgroup_mma(
                        a_bufs.index(2 * s), b_bufs.index(2 * s).permute((1, 0)), part,
                        use_acc=False, is_async=True,
                    )  # fmt: skip
                    part2 = warpgroup_mma(
                        a_bufs.index(2 * s + 1), b_bufs.index(2 * s + 1).permute((1, 0)),
                        part2, use_acc=False, is_async=True,
                    )  # fmt: skip
                    part = warpgroup_mma_wait(1, deps=(part,))
                    sg = sc_bufs.index(2 * s).load(cols).to(gl.float32)
                    acc = acc + part * gl.expand_dims(sg, 0)
                    part2 = warpgroup_mma_wait(0, deps=(part2,))
                    sg = sc_bufs.index(2 * s + 1).load(cols).to(gl.float32)
                    acc = acc + part2 * gl.expand_dims(sg, 0)
                else:
                    for gi in gl.static_range(2):
                        part = warpgroup_mma(
                            a_bufs.index(2 * s + gi),
                            b_bufs.index(2 * s + gi).permute((1, 0)),
                            part,
                            use_acc=False,
                            is_async=True,
                        )
                        part = warpgroup_mma_wait(0, deps=(part,))
                        sg = sc_bufs.index(2 * s + gi).load(cols).to(gl.float32)
                        acc = acc + part * gl.expand_dims(sg, 0)
                gl.thread_barrier()
                mbarrier.arrive(empty.index(s), count=1)
                it += 1
            y = acc * out_scale
            halves = gl.permute(gl.reshape(y.to(c_desc.dtype), [BM, 2, BN // 2]), (0, 2, 1))
            lo, hi = gl.split(halves)
            g._store_tile(c_desc, c_smem, lo, hi, pid_m * BM, pid_n * BN, BN)
        tma.store_wait(0)

    @gluon.jit
    def _group_scaled_kernel(a_desc, q_desc, ws_ptr, stride_ws, c_desc, ts_ptr, scale_ptr,
                             M, N, K, S: gl.constexpr, GROUP: gl.constexpr,
                             RC: gl.constexpr, num_warps: gl.constexpr,
                             DECODE_REGS: gl.constexpr = 80,
                             LUT: gl.constexpr = False, PIPE: gl.constexpr = False,
                             DECODE_WGS: gl.constexpr = 1):  # fmt: skip
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BN: gl.constexpr = q_desc.block_type.shape[0]
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [2 * S, BM, 64], a_desc.layout)
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [S, BN, 64], q_desc.layout)
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, 64], gl.float8e4nv)
        b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2 * S, BN, 64], b_layout)
        sc_bufs = gl.allocate_shared_memory(
            gl.float16, [2 * S, BN], gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        )
        c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        decoded = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(decoded.index(i), count=DECODE_WGS)
            mbarrier.init(empty.index(i), count=1)
        if DECODE_WGS == 2:  # two decode warpgroups, half the rows each
            half: gl.constexpr = BN // 2
            gl.warp_specialize(
                [
                    (
                        _gs_mma,
                        (a_bufs, b_bufs, sc_bufs, ready, decoded, empty, c_smem, c_desc,
                         ts_ptr, scale_ptr, M, N, K, BM, BN, S, GROUP, num_warps, PIPE),
                    ),
                    (
                        _gs_decode,
                        (q_bufs, b_bufs, sc_bufs, ready, decoded, ws_ptr, stride_ws, M, N, K,
                         BM, BN, S, GROUP, RC, LUT, 0, half),
                    ),
                    (
                        _gs_decode,
                        (q_bufs, b_bufs, sc_bufs, ready, decoded, ws_ptr, stride_ws, M, N, K,
                         BM, BN, S, GROUP, RC, LUT, half, half),
                    ),
                    (
                        _gs_load,
                        (a_desc, q_desc, a_bufs, q_bufs, ready, empty, M, N, K, BM, BN, S,
                         GROUP),
                    ),
                ],
                [4, 4, 4],
                [DECODE_REGS, DECODE_REGS, 40],
            )  # fmt: skip
            return
        gl.warp_specialize(
            [
                (
                    _gs_mma,
                    (a_bufs, b_bufs, sc_bufs, ready, decoded, empty, c_smem, c_desc, ts_ptr,
                     scale_ptr, M, N, K, BM, BN, S, GROUP, num_warps, PIPE),
                ),
                (
                    _gs_decode,
                    (q_bufs, b_bufs, sc_bufs, ready, decoded, ws_ptr, stride_ws, M, N, K,
                     BM, BN, S, GROUP, RC, LUT, 0, BN),
                ),
                (
                    _gs_load,
                    (a_desc, q_desc, a_bufs, q_bufs, ready, empty, M, N, K, BM, BN, S, GROUP),
                ),
            ],
            [4, 4],  # the decode warpgroup first: setmaxnreg is per warpgroup (v39)
            [DECODE_REGS, 40],
        )  # fmt: skip


def group_scaled_gemm(
    xq, qweight, wscales, wtensor_scale, act_scale, out_dtype=torch.bfloat16, lut=False,
    pipe=False, decode_wgs=1,
):  # fmt: skip
    """``grouped_reference`` on the GPU: xq fp8 [M, K], int4 g64 codes [N, K / 2], fp16
    scales [N, K / 64]; K a multiple of 128, N of 8. ``lut``: the codes become e4m3 bytes
    by byte permutation (``lut_decode_word``) instead of through fp32; ``pipe``: each
    stage's second MMA runs while the first one's partial sum is scaled (two partial
    accumulators; the decode warps at 64 registers to make room); ``decode_wgs`` 2: two
    decode warpgroups, half the rows each (the decode is latency-bound, NOTES v39; 20
    warps, 96 registers a thread at launch: not with ``pipe``)."""
    if decode_wgs not in (1, 2) or (pipe and decode_wgs != 1):
        raise ValueError(f"probe: decode_wgs 1 or 2, and 1 with pipe; got {decode_wgs}")
    y, q, c = wsd.stored_operands(xq, qweight, wscales, out_dtype, BLOCK_M)
    m, k = xq.shape
    n = qweight.shape[0]
    a_layout = g._layout(BLOCK_M, 64, torch.float8_e4m3fn)
    a = g.GluonDescriptor.from_tensor(xq, [BLOCK_M, 64], a_layout)
    tiles = g.cdiv(m, BLOCK_M) * g.cdiv(n, BLOCK_N)
    _group_scaled_kernel[(min(tiles, g.num_sms(xq.device)),)](
        a, q, wscales, wscales.stride(0), c, wtensor_scale.float().reshape(1),
        act_scale.float().reshape(1), m, n, k,
        S=STAGES, GROUP=g.GROUP_M, RC=CHUNK, num_warps=8, LUT=lut, PIPE=pipe,
        DECODE_REGS=64 if pipe or decode_wgs == 2 else DECODE_REGS, DECODE_WGS=decode_wgs,
    )  # fmt: skip
    return y


def probe_row(m: int, n: int, k: int) -> dict:
    """One shape: checked against ``grouped_reference``, then timed (CUDA graphs)."""
    import torch.nn.functional as F
    from gemm import bench_graph
    from probe_gemm import operands

    from svdquant.kernels import widen

    x, layer, s, xq, lora, wq, s_ch = operands(m, n, k)
    none = (lora[:, :0], layer.up[:, :0], None, torch.bfloat16)
    stored = (layer.qweight, layer.wscales, layer.wtensor_scale, layer.fmt)
    ts = layer.wtensor_scale

    def ours(lut=False, pipe=False, wgs=1):
        return group_scaled_gemm(
            xq, layer.qweight, layer.wscales, ts, s, lut=lut, pipe=pipe, decode_wgs=wgs
        )

    got, got_lut, got_pipe = ours().float(), ours(True).float(), ours(True, True).float()
    got_2wg = ours(True, wgs=2).float()
    ref = grouped_reference(xq, layer.qweight, layer.wscales, ts, s).float()
    engine = g.fp8_gemm_ws(xq, wq, s_ch, s, *none).float()
    return {
        "M": m,
        "N": n,
        "K": k,
        "rel_err_vs_reference": ((got - ref).norm() / ref.norm()).item(),
        "lut_equal": bool(torch.equal(got, got_lut)),
        "pipe_equal": bool(torch.equal(got, got_pipe)),
        "two_wg_equal": bool(torch.equal(got, got_2wg)),
        "rel_diff_vs_engine": ((got - engine).norm() / engine.norm()).item(),
        "bf16_us": bench_graph(lambda: F.linear(x, layer.w16)),
        "widen_gemm_ws_us": bench_graph(
            lambda: g.fp8_gemm_ws(xq, *widen.widen_weight(*stored), s, *none)
        ),
        "group_scaled_us": bench_graph(ours),
        "group_scaled_lut_us": bench_graph(lambda: ours(True)),
        "group_scaled_pipe_us": bench_graph(lambda: ours(True, True)),
        "group_scaled_2wg_us": bench_graph(lambda: ours(True, wgs=2)),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ms", default="512,1024,4096")
    p.add_argument("--shapes", default="3072x3072,12288x3072,3072x12288,21504x3072")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args(argv)
    if not (torch.cuda.is_available() and g.HAVE_GLUON):
        raise SystemExit("probe_group_scaled: needs a CUDA GPU (sm_90) and triton's Gluon")
    from gemm import run_info, write_result

    rows = []
    print("    M      N      K | bf16 us | widen+gemm_ws | group-scaled | LUT | +pipe |"
          " LUT 2wg | x bf16 | err ref | vs engine | equal")  # fmt: skip
    for m in (int(v) for v in args.ms.split(",")):
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            r = probe_row(m, n, k)
            rows.append(r)
            times = [r[f"group_scaled{w}_us"] for w in ("", "_lut", "_pipe", "_2wg")]
            print(
                f"{m:5d} {n:6d} {k:6d} | {r['bf16_us']:7.1f} | {r['widen_gemm_ws_us']:13.1f} | "
                f"{times[0]:12.1f} | {times[1]:5.1f} | {times[2]:5.1f} | {times[3]:7.1f} | "
                f"{r['bf16_us'] / min(times):6.2f} | {r['rel_err_vs_reference']:.1e} | "
                f"{r['rel_diff_vs_engine']:.1e} | "
                f"{r['lut_equal']}/{r['pipe_equal']}/{r['two_wg_equal']}",
                flush=True,
            )
    result = {**run_info(), "stages": STAGES, "chunk": CHUNK, "rows": rows}
    print("->", write_result(result, args.out, "probe_group_scaled"))
    return result


if __name__ == "__main__":
    main()
