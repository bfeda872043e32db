"""How fast can *anything* read the W4A16 GEMV's bytes? The floor its 2.5x bar sits on.

    PYTHONPATH=src python bench/probe_read_floor.py [--shapes 18432x3072,9216x3072] [--out DIR]

The GEMV (``w4a16_linear`` at one token) reads the packed codes (K/2 bytes a row) and the
fp16 group scales (K/32 bytes a row) once and writes N outputs. This probe times, in one
run and the same two ways as ``bench/gemm.py`` (CUDA graph under ``do_bench``, whose L2
flush leaves dirty lines; and with the L2 emptied by reading, ``bench_graph_clean``):

* ``read``: a Triton kernel that reads exactly those bytes (codes and scales, 16-byte
  loads) and writes one number per row — no arithmetic to speak of — over a sweep of
  (rows per program, words per step, warps), best kept;
* ``read_persistent``: the same result from a fixed grid (1-4 programs per SM) walking
  row blocks with 1-4 blocks' loads in flight (Triton's pipeliner), best of a sweep —
  whether a different reading scheme lowers the floor (v31's ``read``: 45% of copy);
* ``read_tma`` (sm_90, a triton with Gluon; v33): a persistent Gluon kernel that streams
  row blocks through a ring of shared-memory stages with TMA (the copy engine, not the
  threads, moves the bytes; ``S - 1`` blocks in flight a program), with the threads
  reducing each block (``touch``) or not at all (the copy engine's own rate) — whether
  the floor is the reading scheme's;
* ``torch_sum``: ``codes.sum()`` (PyTorch's reduction, 28 MB read, one number written);
* the GEMV itself (rank 32 + bias) and BF16 ``F.linear`` (with bias).

If even the bare read takes most of the GEMV's time, the GEMV is at its floor and the bar
is a property of the GPU at this size (ramp, tail, DRAM latency), not of the kernel.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from gemm import Layer, bench_graph, bench_graph_clean, copy_bandwidth, run_info, write_result

from svdquant.kernels._triton_common import num_sms

#: (rows per program, 32-bit words of a row per step, warps) swept for the bare read.
TILES = [
    (r, w, nw)
    for r, w, nw in itertools.product((1, 2, 4, 8, 16, 32), (128, 256, 512), (1, 2, 4, 8))
    if 4 <= r * w // (32 * nw) <= 128  # 16-byte loads, at most 128 words a thread
]


@triton.jit
def _read_kernel(q_ptr, s_ptr, out_ptr, N, KW, KS, ROWS: tl.constexpr, BW: tl.constexpr,
                 BS: tl.constexpr):  # fmt: skip
    """out[row] = xor of the row's code words + sum of its scales (every byte read once)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < N
    acc = tl.zeros([ROWS, BW], dtype=tl.int32)
    for k in range(0, KW, BW):
        cols = k + tl.arange(0, BW)
        ptrs = q_ptr + rows[:, None] * KW + cols[None, :]
        acc ^= tl.load(ptrs, mask=rmask[:, None] & (cols[None, :] < KW), other=0)
    scols = tl.arange(0, BS)
    sptrs = s_ptr + rows[:, None] * KS + scols[None, :]
    s = tl.load(sptrs, mask=rmask[:, None] & (scols[None, :] < KS), other=0.0)
    total = tl.xor_sum(acc, 1).to(tl.float32) + tl.sum(s.to(tl.float32), 1)
    tl.store(out_ptr + rows, total, mask=rmask)


def bare_read(codes: torch.Tensor, scales: torch.Tensor, tile) -> torch.Tensor:
    """One program per ``tile[0]`` rows reading the rows' code words and scales."""
    rows, bw, warps = tile
    n, kw = codes.shape
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    _read_kernel[(triton.cdiv(n, rows),)](
        codes, scales, out, n, kw, scales.shape[1], ROWS=rows,
        BW=min(bw, triton.next_power_of_2(kw)), BS=triton.next_power_of_2(scales.shape[1]),
        num_warps=warps,
    )  # fmt: skip
    return out


#: (rows a step, programs per SM, pipeline stages, warps) swept for the persistent read.
PERSISTENT_TILES = [
    (r, pps, st, nw)
    for r, pps, st, nw in itertools.product((4, 8, 16), (1, 2, 4), (1, 2, 3, 4), (4,))
    if r * 512 // (32 * nw) <= 64 and r * 1536 * st * pps <= 160 * 1024  # registers, smem
]


@triton.jit
def _read_persistent_kernel(q_ptr, s_ptr, out_ptr, N, KW: tl.constexpr, KS: tl.constexpr,
                            ROWS: tl.constexpr, BW: tl.constexpr, BS: tl.constexpr,
                            STAGES: tl.constexpr):  # fmt: skip
    """``_read_kernel``'s result with a fixed grid: each program walks row blocks (whole
    rows a step), the next ``STAGES - 1`` blocks' loads in flight through Triton's
    pipeliner (shared memory), so an SM keeps reading between its blocks."""
    cols = tl.arange(0, BW)
    scols = tl.arange(0, BS)
    for blk in tl.range(tl.program_id(0), tl.cdiv(N, ROWS), tl.num_programs(0),
                        num_stages=STAGES):  # fmt: skip
        rows = blk * ROWS + tl.arange(0, ROWS)
        rmask = rows < N
        w = tl.load(q_ptr + rows[:, None] * KW + cols[None, :],
                    mask=rmask[:, None] & (cols[None, :] < KW), other=0)  # fmt: skip
        sc = tl.load(s_ptr + rows[:, None] * KS + scols[None, :],
                     mask=rmask[:, None] & (scols[None, :] < KS), other=0.0)  # fmt: skip
        total = tl.xor_sum(w, 1).to(tl.float32) + tl.sum(sc.to(tl.float32), 1)
        tl.store(out_ptr + rows, total, mask=rmask)


def bare_read_persistent(codes: torch.Tensor, scales: torch.Tensor, tile) -> torch.Tensor:
    """``bare_read`` by ``tile[1]`` programs per SM walking blocks of ``tile[0]`` rows."""
    rows, pps, stages, warps = tile
    n, kw = codes.shape
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    sms = num_sms(codes.device, cpu=4)
    grid = (min(triton.cdiv(n, rows), sms * pps),)
    _read_persistent_kernel[grid](
        codes, scales, out, n, kw, scales.shape[1], ROWS=rows, BW=triton.next_power_of_2(kw),
        BS=triton.next_power_of_2(scales.shape[1]), STAGES=stages, num_warps=warps,
    )  # fmt: skip
    return out


#: (rows a block, stages, programs per SM, touch) swept for the TMA read.
TMA_TILES = [
    (r, st, pps, touch)
    for r, st, pps, touch in itertools.product((8, 16, 32), (2, 3, 4, 6), (1, 2), (True, False))
    if r * (3 * 128 * 4 + 128 * 2) * st * pps <= 200 * 1024  # shared memory of an SM
]

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    HAVE_GLUON = True
except ImportError:  # a triton without Gluon: the TMA read is skipped
    HAVE_GLUON = False

if HAVE_GLUON:

    @gluon.jit
    def _tma_issue(q_desc, s_desc, q_bufs, s_bufs, ready, blk, slot, pred, ROWS: gl.constexpr,
                   QBOX: gl.constexpr):  # fmt: skip
        """Block ``blk``'s code words (``QBOX`` boxes of 128 words) and scales into ``slot``."""
        bar = ready.index(slot)
        nbytes: gl.constexpr = QBOX * q_desc.block_type.nbytes + s_desc.block_type.nbytes
        mbarrier.expect(bar, nbytes, pred=pred)
        for j in gl.static_range(QBOX):
            tma.async_copy_global_to_shared(q_desc, [blk * ROWS, j * 128], bar,
                                            q_bufs.index(slot * QBOX + j), pred)  # fmt: skip
        tma.async_copy_global_to_shared(s_desc, [blk * ROWS, 0], bar, s_bufs.index(slot), pred)

    @gluon.jit
    def _read_tma_kernel(
        q_desc,
        s_desc,
        out_ptr,
        N,
        ROWS: gl.constexpr,
        QBOX: gl.constexpr,
        S: gl.constexpr,
        TOUCH: gl.constexpr,
        num_warps: gl.constexpr,
    ):
        """``_read_kernel``'s result (with ``TOUCH``) from TMA loads: each program walks row
        blocks ``num_programs`` apart, ``S - 1`` blocks' copies in flight."""
        q_bufs = gl.allocate_shared_memory(gl.int32, [S * QBOX, ROWS, 128], q_desc.layout)
        s_bufs = gl.allocate_shared_memory(gl.float16, [S, ROWS, 128], s_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [S, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(S):
            mbarrier.init(ready.index(i), count=1)
        layout: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])
        pid = gl.program_id(0)
        step = gl.num_programs(0)
        mine = gl.cdiv(gl.cdiv(N, ROWS) - pid, step)
        for i in gl.static_range(S - 1):
            _tma_issue(q_desc, s_desc, q_bufs, s_bufs, ready, pid + i * step, i, i < mine,
                       ROWS, QBOX)  # fmt: skip
        for j in range(mine):
            gl.thread_barrier()  # every thread is done with the slot about to be refilled
            nxt = j + S - 1
            _tma_issue(q_desc, s_desc, q_bufs, s_bufs, ready, pid + nxt * step, nxt % S,
                       nxt < mine, ROWS, QBOX)  # fmt: skip
            slot = j % S
            mbarrier.wait(ready.index(slot), (j // S) & 1)
            if TOUCH:
                acc = gl.zeros([ROWS, 128], gl.int32, layout)
                for q in gl.static_range(QBOX):
                    acc ^= q_bufs.index(slot * QBOX + q).load(layout)
                sc = s_bufs.index(slot).load(layout).to(gl.float32)
                total = gl.xor_sum(acc, 1).to(gl.float32) + gl.sum(sc, 1)
                rows = (pid + j * step) * ROWS + gl.arange(
                    0, ROWS, layout=gl.SliceLayout(1, layout)
                )
                gl.store(out_ptr + rows, total, mask=rows < N)


def tma_read_available(device: torch.device) -> bool:
    from svdquant.kernels._triton_common import hopper_or_later

    return HAVE_GLUON and hopper_or_later(device)


def bare_read_tma(codes: torch.Tensor, scales: torch.Tensor, tile) -> torch.Tensor:
    """``bare_read`` through TMA (``_read_tma_kernel``): rows of 384 code words (K = 3072)
    as three 128-word boxes, the scales as one box of 128 (columns past K/32 read as 0)."""
    rows, stages, pps, touch = tile
    n, kw = codes.shape
    if kw % 128 or kw // 128 > 4:
        raise ValueError(f"the TMA read takes 128-512 code words a row, got {kw}")
    out = torch.zeros(n, dtype=torch.float32, device=codes.device)
    plain = dict(swizzle_byte_width=0, rank=2)
    q_layout = gl.NVMMASharedLayout(element_bitwidth=32, **plain)
    s_layout = gl.NVMMASharedLayout(element_bitwidth=16, **plain)
    q = GluonDescriptor.from_tensor(codes, [rows, 128], q_layout)
    s = GluonDescriptor.from_tensor(scales, [rows, 128], s_layout)
    grid = (min(triton.cdiv(n, rows), num_sms(codes.device) * pps),)
    _read_tma_kernel[grid](q, s, out, n, ROWS=rows, QBOX=kw // 128, S=stages, TOUCH=touch,
                           num_warps=4)  # fmt: skip
    return out


def best_tile(run, tiles) -> tuple[tuple, list[dict]]:
    """The fastest of ``tiles`` for ``run(tile)`` (CUDA graph), and every tile's time or
    the error it raised."""
    sweep = []
    for tile in tiles:
        try:
            sweep.append({"tile": tile, "us": bench_graph(lambda t=tile: run(t))})
        except Exception as e:  # a tile that does not compile
            sweep.append({"tile": tile, "error": str(e)[:100]})
    return tuple(min((s for s in sweep if "us" in s), key=lambda s: s["us"])["tile"]), sweep


def probe_shape(n: int, k: int, copy_gbs: float) -> dict:
    """One shape: the bare read's tile sweep, then the four cases timed both ways."""
    layer = Layer(n, k)
    x = torch.randn(1, k, device="cuda").bfloat16()
    codes = layer.qweight.contiguous().view(torch.int32)
    scales = layer.wscales.contiguous()
    nbytes = codes.numel() * 4 + scales.numel() * scales.element_size()
    tile, sweep = best_tile(lambda t: bare_read(codes, scales, t), TILES)
    ptile, psweep = best_tile(lambda t: bare_read_persistent(codes, scales, t), PERSISTENT_TILES)
    row = {"N": n, "K": k, "bytes": nbytes, "sweep": sweep, "read_tile": tile,
           "persistent_sweep": psweep, "persistent_tile": ptile}  # fmt: skip
    tma_cases = {}
    if tma_read_available(codes.device):
        for touch in (True, False):
            tiles = [t for t in TMA_TILES if t[3] == touch]
            name = "read_tma" if touch else "read_tma_notouch"
            best, tsweep = best_tile(lambda t: bare_read_tma(codes, scales, t), tiles)
            row[f"{name}_tile"], row[f"{name}_sweep"] = best, tsweep
            tma_cases[name] = lambda b=best: bare_read_tma(codes, scales, b)
        got = bare_read_tma(codes, scales, row["read_tma_tile"])
        want = bare_read(codes, scales, tile)  # the scales' sums in another order: to rounding
        row["read_tma_matches"] = bool(torch.allclose(got, want, rtol=1e-5, atol=1e-3))
    cases = {
        "read": lambda: bare_read(codes, scales, tile),
        "read_persistent": lambda: bare_read_persistent(codes, scales, ptile),
        **tma_cases,
        "torch_sum": lambda: codes.sum(),
        "gemv": lambda: layer.w4a16(x),
        "bf16": lambda: F.linear(x, layer.w16, layer.bias),
    }
    for name, fn in cases.items():
        row[f"{name}_us"] = bench_graph(fn)
        row[f"{name}_clean_us"] = bench_graph_clean(fn)
    row["read_pct_copy"] = 100 * nbytes / row["read_us"] / 1e3 / copy_gbs
    row["read_persistent_pct_copy"] = 100 * nbytes / row["read_persistent_us"] / 1e3 / copy_gbs
    row["gemv_pct_copy"] = 100 * nbytes / row["gemv_us"] / 1e3 / copy_gbs
    for name in tma_cases:
        row[f"{name}_pct_copy"] = 100 * nbytes / row[f"{name}_us"] / 1e3 / copy_gbs
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="18432x3072,9216x3072")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    copy_gbs = copy_bandwidth()
    result = {**run_info(), "copy_gbs": copy_gbs, "rows": []}
    print(f"copy bandwidth {copy_gbs:.0f} GB/s; µs, CUDA graph (clean L2 in brackets)")
    print(
        "    N      K |   MB | read tile      | read         | torch sum | gemv         | "
        "bf16         | gemv/read bf16/gemv bf16/read"
    )
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        r = probe_shape(n, k, copy_gbs)
        result["rows"].append(r)
        cols = " | ".join(
            f"{r[c + '_us']:5.1f} ({r[c + '_clean_us']:5.1f})" for c in ("read", "gemv", "bf16")
        ).split(" | ")
        print(f"{n:5d} {k:6d} | {r['bytes'] / 1e6:4.1f} | {r['read_tile']!s:14} | {cols[0]} | "
              f"{r['torch_sum_us']:9.1f} | {cols[1]} | {cols[2]} | "
              f"{r['gemv_us'] / r['read_us']:9.2f} {r['bf16_us'] / r['gemv_us']:9.2f} "
              f"{r['bf16_us'] / r['read_us']:9.2f}")  # fmt: skip
        print(f"{'':12} | persistent read {r['persistent_tile']}: {r['read_persistent_us']:5.1f} "
              f"({r['read_persistent_clean_us']:5.1f}) µs, "
              f"{r['read_persistent_pct_copy']:.0f}% of copy, "
              f"BF16 / it {r['bf16_us'] / r['read_persistent_us']:.2f}")  # fmt: skip
        for name in ("read_tma", "read_tma_notouch"):
            if f"{name}_us" in r:
                print(f"{'':12} | {name} {r[name + '_tile']}: {r[name + '_us']:5.1f} "
                      f"({r[name + '_clean_us']:5.1f}) µs, {r[name + '_pct_copy']:.0f}% of copy, "
                      f"BF16 / it {r['bf16_us'] / r[name + '_us']:.2f}")  # fmt: skip
        if "read_tma_matches" in r:
            print(
                f"{'':12} | the TMA read's result equals the plain read's: {r['read_tma_matches']}"
            )
    print("->", write_result(result, a.out, "probe_read_floor"))


if __name__ == "__main__":
    main()
