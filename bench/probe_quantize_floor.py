"""How fast can *anything* move the activation quantize's bytes? The floor under its 70% bar.

    PYTHONPATH=src python bench/probe_quantize_floor.py [--shapes 4608x3072,...] [--out DIR]

The quantize (``quantize_act``: x [M, K] bf16 in; fp8 codes [M, K], the low-rank down
projection's partial sums and L_down's rows out and in) is measured by ``bench/gemm.py``
as a percentage of the copy bandwidth (1 GiB, read + write) on the bytes it moves. At
FLUX's sizes (42 MB at M = 4608, K = 3072) the ramp, the tail and the first DRAM round
trip weigh on any kernel; this probe times, in one run and the same two ways as
``bench/gemm.py`` (CUDA graph under ``do_bench``; and with the L2 emptied by reading):

* ``move``: a Triton kernel that reads x and writes one byte per element (x's high byte)
  — the quantize's traffic without its arithmetic — best of a tile sweep;
* ``torch_cast``: ``x.to(torch.float8_e4m3fn)`` (the same bytes, PyTorch's cast);
* ``torch_copy``: ``y.copy_(x)`` (bf16 to bf16: 4 bytes an element);
* ``quantize``: ours (int4, rank 32), and ``quantize_nolr`` without the low-rank branch;
* ``quantize_folded``: ours with L_down's smoothing folded once (``fold_lowrank_down``,
  ``quantize_act(folded=True)``), its outputs checked against ``quantize``'s;
* ``quantize_ws``: the Gluon quantize (``kernels/quantize_ws.py``: x by TMA, the low-rank
  MMA asynchronous), its codes checked against ``quantize``'s;

each as a percentage of the copy bandwidth on its own bytes. If ``move`` itself stays far
below 70% at these sizes, the bar is a property of the GPU at this size, not of the kernel.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from gemm import RANK, Layer, bench_graph, bench_graph_clean, copy_bandwidth, run_info, write_result
from probe_read_floor import best_tile

from svdquant.kernels import reference as ref
from svdquant.kernels.quantize import fold_lowrank_down, quantize_act
from svdquant.kernels.quantize_ws import quantize_act_ws

#: (rows, columns, warps) of a ``move`` program, swept: 8 to 64 elements a thread.
TILES = [
    (bm, bk, nw)
    for bm, bk, nw in itertools.product((4, 8, 16, 32, 64), (256, 512, 1024), (2, 4, 8))
    if 8 <= bm * bk // (32 * nw) <= 64
]


@triton.jit
def _move_kernel(x_ptr, y_ptr, M, K, BM: tl.constexpr, BK: tl.constexpr):
    """y[m, k] = the high byte of the bf16 x[m, k]: 2 bytes read and 1 written an element."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rm < M)[:, None] & (rk < K)[None, :]
    offs = rm[:, None] * K + rk[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, (x.to(tl.int16, bitcast=True) >> 8).to(tl.int8), mask=mask)


def move(x: torch.Tensor, tile) -> torch.Tensor:
    """x's high bytes [M, K] int8, one program per ``tile[:2]`` block."""
    bm, bk, warps = tile
    m, k = x.shape
    y = torch.empty(m, k, dtype=torch.int8, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    _move_kernel[grid](x, y, m, k, BM=bm, BK=bk, num_warps=warps)
    return y


def probe_shape(m: int, k: int, copy_gbs: float, with_move: bool = True) -> dict:
    """One shape: the move's tile sweep, then every case timed both ways."""
    x = torch.randn(m, k, device="cuda").bfloat16()
    layer = Layer(3072, k)
    s = ref.act_scale_from_amax(layer.act_amax)
    kp = layer.qweight.shape[1] * 2
    y = torch.empty_like(x)
    folded = fold_lowrank_down(layer.down, layer.smooth)
    tile, sweep = best_tile(lambda t: move(x, t), TILES) if with_move else (None, [])
    cases = {
        "move": (lambda: move(x, tile), 3 * m * k),
        "torch_cast": (lambda: x.to(torch.float8_e4m3fn), 3 * m * k),
        "torch_copy": (lambda: y.copy_(x), 4 * m * k),
        # the bytes ``bench/gemm.py`` counts for the quantize
        "quantize": (
            lambda: quantize_act(x, layer.smooth, layer.down, s, kp, "int4"),
            m * k * 2 + m * kp + m * RANK * 4 + RANK * k * 2,
        ),
        "quantize_folded": (
            lambda: quantize_act(x, layer.smooth, folded, s, kp, "int4", folded=True),
            m * k * 2 + m * kp + m * RANK * 4 + RANK * k * 2,
        ),
        "quantize_ws": (
            lambda: quantize_act_ws(x, layer.smooth, layer.down, s, kp, "int4"),
            m * k * 2 + m * kp + m * RANK * 4 + RANK * k * 2,
        ),
        "quantize_nolr": (
            lambda: quantize_act(x, layer.smooth, layer.down[:0], s, kp, "int4"),
            m * k * 2 + m * kp,
        ),
    }
    if not with_move:
        del cases["move"]
    row: dict = {"M": m, "K": k, "move_tile": tile, "sweep": sweep}
    a = cases["quantize"][0]()
    for name in ("folded", "ws"):
        b = cases[f"quantize_{name}"][0]()
        row[f"{name}_same_codes"] = torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
        row[f"{name}_lora_rel_err"] = ((a[1] - b[1]).norm() / a[1].norm()).item()
    for name, (fn, nbytes) in cases.items():
        row[f"{name}_us"] = bench_graph(fn)
        row[f"{name}_clean_us"] = bench_graph_clean(fn)
        row[f"{name}_pct_copy"] = 100 * nbytes / row[f"{name}_us"] / 1e3 / copy_gbs
        row[f"{name}_clean_pct_copy"] = 100 * nbytes / row[f"{name}_clean_us"] / 1e3 / copy_gbs
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="4608x3072,4096x3072,1024x3072,4608x12288")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--no-move", action="store_true", help="skip the move's tile sweep")
    a = p.parse_args()
    copy_gbs = copy_bandwidth()
    result = {**run_info(), "copy_gbs": copy_gbs, "rows": []}
    names = ("move", "torch_cast", "torch_copy", "quantize", "quantize_folded", "quantize_ws",
             "quantize_nolr")  # fmt: skip
    names = names[a.no_move :]
    print(f"copy bandwidth {copy_gbs:.0f} GB/s; % of it on each case's bytes, CUDA graph "
          "(clean L2 in brackets)")  # fmt: skip
    print("    M      K | move tile      | " + " | ".join(f"{n:>13}" for n in names))
    for shape in a.shapes.split(","):
        m, k = (int(v) for v in shape.split("x"))
        r = probe_shape(m, k, copy_gbs, not a.no_move)
        result["rows"].append(r)
        cells = " | ".join(
            f"{r[n + '_pct_copy']:5.1f} ({r[n + '_clean_pct_copy']:5.1f})" for n in names
        )
        same = ", ".join(
            f"{n}: same codes {r[n + '_same_codes']}, sums {r[n + '_lora_rel_err']:.1e}"
            for n in ("folded", "ws")
        )
        print(f"{m:5d} {k:6d} | {r['move_tile']!s:14} | {cells} | {same}")
    print("->", write_result(result, a.out, "probe_quantize_floor"))


if __name__ == "__main__":
    main()
