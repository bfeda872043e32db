"""Launch order of the memory-bound kernels: row tiles next to each other, or K splits.

The quantize's grid is (row tiles, K splits) and the widen's (row tiles, column tiles):
programs launched together read the same columns of different rows — each DRAM page of
a row is opened by a different program at a different time. ``K_FAST`` swaps the axes, so
programs launched together share rows. Times both orders (CUDA-graph replays, one run)
at the issue's shapes. For NOTES.md.

    PYTHONPATH=src python bench/probe_order.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemm import MS, NKS, Layer, bench_graph, run_info, write_result

from svdquant.kernels import quantize as qmod
from svdquant.kernels import reference as ref
from svdquant.kernels import widen as wmod


def _both(mod, fn) -> tuple[float, float, bool]:
    """(rows-together µs, K-together µs, same output) of ``fn`` under ``mod.K_FAST``."""
    out, us = [], []
    try:
        for k_fast in (False, True):
            mod.K_FAST = k_fast
            out.append(fn())
            us.append(bench_graph(fn))
    finally:
        mod.K_FAST = False
    fp8 = [(a, b) for a, b in zip(*out, strict=True) if a.dtype == torch.float8_e4m3fn]
    same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in fp8)
    return us[0], us[1], same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    result = run_info()
    result["quantize"], result["widen"] = [], []
    for m in MS:
        for k in sorted({k for _, k in NKS}):
            layer = Layer(3072, k)
            x = torch.randn(m, k, device="cuda").bfloat16()
            s = ref.act_scale_from_amax(layer.act_amax)
            rows_us, k_us, same = _both(
                qmod,
                lambda: qmod.quantize_act(x, layer.smooth, layer.down, s, k, "int4"),  # noqa: B023
            )
            result["quantize"].append({"M": m, "K": k, "rows_us": rows_us, "k_us": k_us,
                                       "same": same})  # fmt: skip
            print(f"quantize M={m:5d} K={k:5d}: rows together {rows_us:6.1f} us, K "
                  f"together {k_us:6.1f} us ({rows_us / k_us:.3f}x) same={same}")  # fmt: skip
    for n, k in NKS:
        layer = Layer(n, k)
        args = (layer.qweight, layer.wscales, layer.wtensor_scale, layer.fmt)
        rows_us, k_us, same = _both(wmod, lambda: wmod.widen_weight(*args))  # noqa: B023
        result["widen"].append({"N": n, "K": k, "rows_us": rows_us, "k_us": k_us, "same": same})
        print(f"widen N={n:5d} K={k:5d}: rows together {rows_us:6.1f} us, K together "
              f"{k_us:6.1f} us ({rows_us / k_us:.3f}x) same={same}", flush=True)  # fmt: skip
    print("->", write_result(result, a.out, "probe_order"))


if __name__ == "__main__":
    main()
