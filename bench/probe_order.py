"""Launch order of the widen: the row tiles of a column tile together, or a row's tiles.

The widen's grid was (row tiles, column tiles): programs launched together read the same
columns of different rows — each DRAM page of a row opened by a different program at a
different time. ``widen.K_FAST`` swaps the axes, so programs launched together share
rows. Times both orders (CUDA-graph replays, one run) at the issue's shapes and checks
that the outputs agree. For NOTES.md. (v26 also timed the quantize's two orders, within
±2%: ``probe_order-h200-2026-11-29.json``; that option was not kept.)

    PYTHONPATH=src python bench/probe_order.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemm import NKS, Layer, bench_graph, run_info, write_result

from svdquant.kernels import widen as wmod


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    result = {**run_info(), "widen": []}
    default = wmod.K_FAST
    for n, k in NKS:
        layer = Layer(n, k)
        args = (layer.qweight, layer.wscales, layer.wtensor_scale, layer.fmt)
        out, us = [], []
        try:
            for k_fast in (False, True):
                wmod.K_FAST = k_fast
                out.append(wmod.widen_weight(*args))
                us.append(bench_graph(lambda: wmod.widen_weight(*args)))  # noqa: B023
        finally:
            wmod.K_FAST = default
        same = torch.equal(out[0][0].view(torch.uint8), out[1][0].view(torch.uint8))
        same = same and torch.equal(out[0][1], out[1][1])
        result["widen"].append({"N": n, "K": k, "rows_us": us[0], "k_us": us[1], "same": same})
        print(f"widen N={n:5d} K={k:5d}: rows together {us[0]:6.1f} us, K together "
              f"{us[1]:6.1f} us ({us[0] / us[1]:.3f}x) same={same}", flush=True)  # fmt: skip
    print("->", write_result(result, a.out, "probe_order"))


if __name__ == "__main__":
    main()
