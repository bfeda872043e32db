"""Can the warp-specialized GEMM decode the stored 4-bit weight itself, hidden under its MMAs?

    PYTHONPATH=src python bench/probe_ws_decode.py [--ms 512,1024,4096] [--shapes 3072x3072,...]
        [--block-m 128|256] [--stages 4] [--out DIR]

Today every layer widens its whole 4-bit weight into an fp8 copy before the GEMM
(``kernels/widen.py``: 5 ms of a FLUX step's GPU time; at M = 512 as long as the GEMM's
gain over BF16, v25). v25's Triton GEMM that decoded the codes inside its K loop ran
2.2-2.9x slower: the decode's ~560 instructions a step sat in the MMA warps' issue
stream. This probe gives the decode its own warps, the split ``gemm_ws`` already has for
its loads (NOTES "For the next device session", the decode budget on paper):

* a **load warpgroup** (one thread issues) brings A (the fp8 activations) and the
  weight's packed codes ([BLOCK_N, BLOCK_K / 2] bytes, half the fp8 tile) by TMA into a
  ring;
* a **decode warpgroup** loads the step's group scales itself and turns each stage's
  codes into exactly the fp8 tile the widen
  writes (``fp8((code · s_group) · (1 / c))``, ``c`` the row's scale,
  ``reference.widen_row_scale``: a layer could keep it), in 32-row chunks, into the
  stage's B buffer (``decode_reference``: the same arithmetic in PyTorch);
* the **MMA warpgroups** run ``gemm_ws``'s K loop on it and a plain epilogue (the
  per-column scale; no low-rank branch or bias: what the probe asks is the K loop's time).

The output must equal ``gemm_ws`` on the widened weight bit for bit (the same fp8
operands through the same MMAs); the table times, replayed from CUDA graphs in one run:
BF16 ``F.linear``, widen alone, ``gemm_ws`` on the widened weight (no low-rank branch),
widen + that GEMM, and this kernel. GPU only (sm_90, triton 3.6's Gluon); compiled for
sm_90 on any machine by ``bench/sass_report.py --kernels ws_decode``.

Measured (v39, H200, ``bench/results/probe_ws_decode-h200-2026-11-30-v39.json``): equal
bit for bit at all 12 shapes, and **1.3-3.2x slower than widen + ``gemm_ws``** (M = 512:
40 / 104 / 142 / 194 us against 30 / 63 / 89 / 98) — the decode warpgroup, not the MMA,
sets the pace, and every row tile decodes the weight again. NOTES v39 says what might
change that. Three things Triton 3.6 did on the way (v39, found with compute-sanitizer):
a 1-warp partition before the 4-warp one made the decode warps straddle two warpgroups
(``setmaxnreg`` is per warpgroup: an illegal instruction); 1 load warp + 4 decode warps
padded with 3 idle warps gave the load partition two warps; and a TMA box of the group
scales (16 or 32 bytes wide, swizzled or not) stopped the GPU with "Illegal Instruction
Parameter" at its ``UTMALDG`` — so the load partition has 4 warps and the scales come
by plain loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

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

#: 128 x 128 x 128 tiles: with a decode and a load warpgroup beside the MMA's two the
#: kernel has 16 warps, 128 registers a thread at launch, and ptxas wants 154 for
#: ``gemm_ws``'s 128 x 256 accumulator (128 registers a thread); 128 x 128 halves it
BLOCK_M, BLOCK_N, BLOCK_K = g.BLOCK_M, 128, g.BLOCK_K
#: stages of the ring: A 16 KB + codes 8 KB + decoded B 16 KB a stage, the half-tile
#: store buffer 16 KB
STAGES = 4
#: rows a decode step handles at once (the decode warpgroup's registers)
CHUNK = 32
#: the decode warpgroup's registers a thread (the MMA warpgroups take the rest)
DECODE_REGS = 96


def decode_reference(
    qweight: torch.Tensor, wscales: torch.Tensor, inv_c: torch.Tensor, one_mul: bool = False
) -> torch.Tensor:
    """The decode warpgroup's arithmetic in PyTorch (int4 g64): ``fp8((code · s_group) ·
    inv_c)``, the conversion saturating — what must equal the widen's fp8 operand; with
    ``one_mul`` ``fp8(code · (s_group · inv_c))`` (a product per group, one multiply a
    code: not the widen's bits, an operand as good)."""
    from svdquant import formats

    codes = formats.unpack(qweight)  # low nibble first, -8..7
    if one_mul:
        t = (wscales.float() * inv_c.unsqueeze(1)).repeat_interleave(64, dim=1)
        return (codes.float() * t).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    sg = wscales.float().repeat_interleave(64, dim=1)
    v = (codes.float() * sg) * inv_c.unsqueeze(1)
    return v.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


if g.HAVE_GLUON:

    @gluon.jit
    def _int4_value(nib):
        """``_triton_common.int4_value`` for Gluon (a Gluon kernel cannot call a
        ``@triton.jit`` function)."""
        return ((nib ^ 8) | 0x4B000000).to(gl.float32, bitcast=True) - 8388616.0

    @gluon.jit
    def _dec_load(a_desc, q_desc, a_bufs, q_bufs, ready, empty, M, N, K,
                  BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr,
                  GROUP: gl.constexpr):  # fmt: skip
        grid_m = gl.cdiv(M, BM)
        grid_n = gl.cdiv(N, BN)
        it = 0
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            pid_m, pid_n = g._tile_coords(tile, grid_m, grid_n, GROUP)
            for k in range(0, K, BK):
                s = it % S
                mbarrier.wait(empty.index(s), ((it // S) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, a_desc.block_type.nbytes + q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [pid_m * BM, k], bar, a_bufs.index(s))
                tma.async_copy_global_to_shared(q_desc, [pid_n * BN, k // 2], bar, q_bufs.index(s))
                it += 1

    @gluon.jit
    def _dec_decode(q_bufs, sc_smem, b_bufs, ic_smem, ready, decoded, inv_c_ptr, ws_ptr,
                    stride_ws, M, N, K,
                    BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr,
                    GROUP: gl.constexpr, RC: gl.constexpr,
                    ONE_MUL: gl.constexpr):  # fmt: skip
        # a chunk's codes: RC rows x (BK / 2) bytes, 16 bytes a thread, as [rows, the
        # step's two groups, a group's 32 bytes] so that each thread's bytes share a scale
        codes2: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [4, 1], [1, 0])
        codes3: gl.constexpr = gl.BlockedLayout([1, 1, 16], [8, 2, 2], [4, 1, 1], [2, 1, 0])
        scale2: gl.constexpr = gl.SliceLayout(2, codes3)
        row1: gl.constexpr = gl.SliceLayout(1, scale2)
        vec: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        # the step's two group scales of the tile's rows, one row a thread
        pair: gl.constexpr = gl.BlockedLayout([1, 2], [32, 1], [4, 1], [1, 0])
        two = gl.expand_dims(gl.arange(0, 2, layout=gl.SliceLayout(0, pair)), 0)
        grid_m = gl.cdiv(M, BM)
        grid_n = gl.cdiv(N, BN)
        it = 0
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            pid_n = g._tile_coords(tile, grid_m, grid_n, GROUP)[1]
            # the tile's row scales 1/c once, through shared memory (sliced per chunk)
            rn = pid_n * BN + gl.arange(0, BN, layout=vec)
            ic = gl.load(inv_c_ptr + rn, mask=rn < N, other=0.0)
            gl.thread_barrier()  # the previous tile's chunks have read the old ones
            ic_smem.store(ic)
            gl.thread_barrier()
            rows = gl.expand_dims(pid_n * BN + gl.arange(0, BN, layout=gl.SliceLayout(1, pair)), 1)
            for k in range(0, K, BK):
                s = it % S
                # the scales by plain loads (a TMA box of them faulted on the H200, v39),
                # through shared memory to each chunk's layout; the barrier at the end of
                # the previous step has seen its chunks read the old ones
                sc = gl.load(ws_ptr + rows * stride_ws + (k // 64 + two), mask=rows < N, other=0.0)
                sc_smem.store(sc)
                gl.thread_barrier()
                mbarrier.wait(ready.index(s), (it // S) & 1)
                for r0 in gl.static_range(0, BN, RC):
                    q = q_bufs.index(s).slice(r0, RC, 0).load(codes2)
                    q = gl.reshape(q, [RC, 2, BK // 4])  # codes3's registers, no move
                    sg = sc_smem.slice(r0, RC, 0).load(scale2).to(gl.float32)
                    icr = ic_smem.slice(r0, RC, 0).load(row1)
                    b = q.to(gl.int32)
                    f = gl.expand_dims(sg, 2)
                    icf = gl.expand_dims(gl.expand_dims(icr, 1), 2)
                    if ONE_MUL:  # s_group · (1 / c) once a group, one multiply a code
                        t = f * icf
                        lo = _int4_value(b & 0xF) * t
                        hi = _int4_value((b >> 4) & 0xF) * t
                    else:  # the widen's bits: (code · s_group) exact, then · (1 / c)
                        lo = (_int4_value(b & 0xF) * f) * icf
                        hi = (_int4_value((b >> 4) & 0xF) * f) * icf
                    w = gl.reshape(gl.join(lo, hi), [RC, BK])  # column 2j: byte j's low nibble
                    # the conversion saturates (F2FP.SATFINITE): the widen's clamp to ±448,
                    # which only code -8 reaches (8/7 of 448), costs nothing here
                    w = w.to(gl.float8e4nv)
                    b_bufs.index(s).slice(r0, RC, 0).store(w)
                fence_async_shared()
                gl.thread_barrier()
                mbarrier.arrive(decoded.index(s), count=1)
                it += 1

    @gluon.jit
    def _dec_mma(a_bufs, b_bufs, ready, decoded, empty, c_smem, c_desc, sch_ptr, scale_ptr,
                 M, N, K, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                 S: gl.constexpr, GROUP: gl.constexpr, WARPS: gl.constexpr):  # fmt: skip
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BN, 32]
        )
        cols_layout: gl.constexpr = gl.SliceLayout(0, acc_layout)
        vec_layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
        grid_m = gl.cdiv(M, BM)
        grid_n = gl.cdiv(N, BN)
        act_scale = gl.load(scale_ptr)
        it = 0
        for tile in range(gl.program_id(0), grid_m * grid_n, gl.num_programs(0)):
            pid_m, pid_n = g._tile_coords(tile, grid_m, grid_n, GROUP)
            vn = pid_n * BN + gl.arange(0, BN, layout=vec_layout)
            sch_v = gl.load(sch_ptr + vn, mask=vn < N, other=0.0)
            acc = gl.zeros([BM, BN], gl.float32, acc_layout)
            for k in range(0, K, BK):
                s = it % S
                mbarrier.wait(ready.index(s), (it // S) & 1)  # A landed
                mbarrier.wait(decoded.index(s), (it // S) & 1)  # B decoded
                acc = warpgroup_mma(
                    a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True
                )
                acc = warpgroup_mma_wait(1, deps=(acc,))
                gl.thread_barrier()
                mbarrier.arrive(empty.index((it + S - 1) % S), count=1, pred=k > 0)
                it += 1
            acc = warpgroup_mma_wait(0, deps=(acc,))
            gl.thread_barrier()
            mbarrier.arrive(empty.index((it + S - 1) % S), count=1)
            scale = act_scale * gl.convert_layout(sch_v, cols_layout)
            y = acc * gl.expand_dims(scale, 0)
            halves = gl.permute(gl.reshape(y.to(c_desc.dtype), [BM, 2, BN // 2]), (0, 2, 1))
            lo, hi = gl.split(halves)
            g._store_tile(c_desc, c_smem, lo, hi, pid_m * BM, pid_n * BN, BN)
        tma.store_wait(0)

    @gluon.jit
    def _ws_decode_kernel(a_desc, q_desc, ws_ptr, stride_ws, c_desc, inv_c_ptr, sch_ptr,
                          scale_ptr, M, N, K, S: gl.constexpr, GROUP: gl.constexpr,
                          RC: gl.constexpr,
                          num_warps: gl.constexpr, DECODE_REGS: gl.constexpr = 96,
                          ONE_MUL: gl.constexpr = False):  # fmt: skip
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = q_desc.block_type.shape[0]
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [S, BM, BK], a_desc.layout)
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [S, BN, BK // 2], q_desc.layout)
        sc_smem = gl.allocate_shared_memory(
            gl.float16, [BN, 2], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        )
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BK], gl.float8e4nv)
        b_bufs = gl.allocate_shared_memory(gl.float8e4nv, [S, BN, BK], b_layout)
        ic_smem = gl.allocate_shared_memory(
            gl.float32, [BN], gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        )
        c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        decoded = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(decoded.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize(
            [
                (
                    _dec_mma,
                    (a_bufs, b_bufs, ready, decoded, empty, c_smem, c_desc, sch_ptr, scale_ptr,
                     M, N, K, BM, BN, BK, S, GROUP, num_warps),
                ),
                (
                    _dec_decode,
                    (q_bufs, sc_smem, b_bufs, ic_smem, ready, decoded, inv_c_ptr, ws_ptr,
                     stride_ws, M, N, K, BM, BN, BK, S, GROUP, RC, ONE_MUL),
                ),
                (
                    _dec_load,
                    (a_desc, q_desc, a_bufs, q_bufs, ready, empty, M, N, K,
                     BM, BN, BK, S, GROUP),
                ),
            ],
            [4, 4],
            [DECODE_REGS, 40],
        )  # fmt: skip


def stored_operands(xq, qweight, wscales, out_dtype, block_m):
    """What both decoding probes take and make (this one and ``probe_group_scaled``):
    the stored int4 g64 weight checked — K a multiple of 128, N of 8, fp16 scales with
    contiguous rows — the output ``y`` [M, N], the codes' TMA descriptor ([128, 64
    bytes]) and the output's ([block_m, 64]): ``(y, q_desc, c_desc)``."""
    m, k = xq.shape
    n = qweight.shape[0]
    if k % BLOCK_K or n % 8 or qweight.shape[1] * 2 != k or wscales.shape[1] * 64 != k:
        raise ValueError(f"probe shapes: K a multiple of {BLOCK_K}, N of 8; got {n} x {k}")
    if wscales.dtype != torch.float16 or wscales.stride(1) != 1:
        raise ValueError("probe: fp16 group scales with contiguous rows (int4's stored format)")
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    q_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K // 2], gl.uint8)
    q = g.GluonDescriptor.from_tensor(qweight, [BLOCK_N, BLOCK_K // 2], q_layout)
    c_block = [block_m, BLOCK_N // 2]
    c = g.GluonDescriptor.from_tensor(y, c_block, g._layout(*c_block, out_dtype))
    return y, q, c


def ws_decode_gemm(
    xq,
    qweight,
    wscales,
    inv_c,
    s_channel,
    act_scale,
    out_dtype=torch.bfloat16,
    one_mul=False,
    block_m=BLOCK_M,
    stages=STAGES,
):
    """``(xq · widen(qweight)ᵀ) · (S · s_channel)`` with the weight decoded in the GEMM:
    int4 g64 codes [N, K / 2], fp16 scales [N, K / 64], ``inv_c = 1 / widen_row_scale``
    (``one_mul``: ``decode_reference``'s other operand; ``block_m`` 256: the two MMA
    warpgroups take 128 rows each of one decoded weight tile — half the decode a row)."""
    if block_m not in (128, 256):
        raise ValueError(f"probe: block_m 128 or 256, got {block_m}")
    y, q, c = stored_operands(xq, qweight, wscales, out_dtype, block_m)
    m, k = xq.shape
    n = qweight.shape[0]
    a = g.GluonDescriptor.from_tensor(
        xq, [block_m, BLOCK_K], g._layout(block_m, BLOCK_K, torch.float8_e4m3fn)
    )
    tiles = g.cdiv(m, block_m) * g.cdiv(n, BLOCK_N)
    _ws_decode_kernel[(min(tiles, g.num_sms(xq.device)),)](
        a, q, wscales, wscales.stride(0), c, inv_c, s_channel, act_scale.float().reshape(1),
        m, n, k,
        S=stages, GROUP=g.GROUP_M, RC=CHUNK, num_warps=8,
        ONE_MUL=one_mul, DECODE_REGS=DECODE_REGS,
    )  # fmt: skip
    return y


def probe_decode_reference(layer, inv_c: torch.Tensor) -> torch.Tensor:
    """``decode_reference(one_mul=True)`` of ``layer``'s weight, on its device."""
    return decode_reference(layer.qweight, layer.wscales, inv_c, one_mul=True)


def probe_row(m: int, n: int, k: int, block_m: int = BLOCK_M, stages: int = STAGES) -> dict:
    """One shape: the outputs compared, then each way timed (CUDA graphs, one run)."""
    import torch.nn.functional as F
    from gemm import bench_graph
    from probe_gemm import operands

    from svdquant.kernels import reference as ref
    from svdquant.kernels import widen

    x, layer, s, xq, lora, wq, s_ch = operands(m, n, k)
    c = ref.widen_row_scale(layer.wscales, layer.fmt)
    if not torch.equal(s_ch, c * layer.wtensor_scale.float()):
        raise AssertionError("widen_row_scale differs from the widen's s_channel / s_tensor")
    inv_c = 1.0 / c
    none = (lora[:, :0], layer.up[:, :0], None, torch.bfloat16)
    stored = (layer.qweight, layer.wscales, layer.wtensor_scale, layer.fmt)

    def widened_gemm():
        return g.fp8_gemm_ws(xq, *widen.widen_weight(*stored), s, *none)

    def decoded_gemm(one_mul: bool = False):
        return ws_decode_gemm(
            xq, layer.qweight, layer.wscales, inv_c, s_ch, s, one_mul=one_mul,
            block_m=block_m, stages=stages,
        )  # fmt: skip

    ref, got = g.fp8_gemm_ws(xq, wq, s_ch, s, *none), decoded_gemm()
    # the one-multiply operand, widened in PyTorch, through the same GEMM
    wq1 = probe_decode_reference(layer, inv_c)
    ref1, got1 = g.fp8_gemm_ws(xq, wq1, s_ch, s, *none), decoded_gemm(True)
    return {
        "M": m,
        "N": n,
        "K": k,
        "equal": bool(torch.equal(ref, got)),
        "max_abs_diff": (ref.float() - got.float()).abs().max().item(),
        "one_mul_equal": bool(torch.equal(ref1, got1)),
        "bf16_us": bench_graph(lambda: F.linear(x, layer.w16)),
        "widen_us": bench_graph(lambda: widen.widen_weight(*stored)),
        "gemm_ws_us": bench_graph(lambda: g.fp8_gemm_ws(xq, wq, s_ch, s, *none)),
        "widen_gemm_ws_us": bench_graph(widened_gemm),
        "decode_gemm_us": bench_graph(decoded_gemm),
        "decode_one_mul_us": bench_graph(lambda: decoded_gemm(True)),
    }


def main(argv: list[str] | None = None) -> dict:
    from gemm import run_info, write_result

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ms", default="512,1024,4096")
    p.add_argument("--shapes", default="3072x3072,12288x3072,3072x12288,21504x3072")
    p.add_argument("--block-m", type=int, default=BLOCK_M, help="rows of a tile: 128 or 256")
    p.add_argument("--stages", type=int, default=STAGES, help="ring stages (256 rows: 3)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args(argv)
    rows = []
    print(
        "    M      N      K | bf16 us | widen | gemm_ws | widen+gemm | decode | 1-mul |"
        " x bf16 | equal"
    )
    for m in (int(v) for v in args.ms.split(",")):
        for shape in args.shapes.split(","):
            n, k = (int(v) for v in shape.split("x"))
            r = probe_row(m, n, k, args.block_m, args.stages)
            rows.append(r)
            print(
                f"{m:5d} {n:6d} {k:6d} | {r['bf16_us']:7.1f} | {r['widen_us']:5.1f} | "
                f"{r['gemm_ws_us']:7.1f} | {r['widen_gemm_ws_us']:10.1f} | "
                f"{r['decode_gemm_us']:6.1f} | {r['decode_one_mul_us']:5.1f} | "
                f"{r['bf16_us'] / r['decode_gemm_us']:6.2f} | {r['equal']}/{r['one_mul_equal']}"
            )
    result = {**run_info(), "block_m": args.block_m, "stages": args.stages, "chunk": CHUNK}
    result["rows"] = rows
    print("->", write_result(result, args.out, "probe_ws_decode"))
    return result


if __name__ == "__main__":
    main()
