"""The widen with each weight's row scales kept (``widen.KEEP_ROW_SCALE``), on the GPU.

The widen writes ``fp8(code · s_group / c)`` with ``c = qmax · max_g(s_group) / 448`` per
row. Without the kept row scales every program reduces all of its rows' group scales
for ``c`` — at K = 12288 more bytes per program than its codes; with them (the first
widen of a weight keeps ``c`` on its ``wscales``) it loads one float per row. At the six
(N, K) of ``bench/gemm.py``: the widen alone, then the whole layer (quantize + widen +
GEMM + low-rank + bias) at each M, both ways alternated twice in one run with BF16
``F.linear`` of the same run, all replayed from CUDA graphs; outputs compared bit for
bit.

    PYTHONPATH=src python bench/probe_row_scale.py [--ms 512,1024,4608] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gemm import NKS, Layer, bench_graph, copy_bandwidth, run_info, write_result

from svdquant.kernels import widen as wmod


def _both(fn) -> tuple[dict, dict]:
    """``fn()`` and its CUDA-graph time with the row scales computed per program and kept,
    alternated twice; returns (outputs, times)."""
    outs, times = {}, {}
    for i in range(2):
        for keep in (False, True):
            wmod.KEEP_ROW_SCALE = keep
            outs[keep] = fn()  # (with keep, the first call fills what later ones load)
            times[f"{'kept' if keep else 'per_program'}_us_{i}"] = bench_graph(fn)
    return outs, times


def _same(a, b) -> bool:
    return all(
        torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b, strict=True)
    )


def probe_widen(n: int, k: int, copy_gbs: float) -> dict:
    layer = Layer(n, k)
    args = (layer.qweight, layer.wscales, layer.wtensor_scale, layer.fmt)
    outs, row = _both(lambda: wmod.widen_weight(*args))
    row.update(N=n, K=k, equal=_same(outs[False], outs[True]))
    nbytes = layer.qweight.numel() + layer.wscales.numel() * 2 + n * k + n * 4
    for way in ("per_program", "kept"):
        us = min(row[f"{way}_us_0"], row[f"{way}_us_1"])
        row[f"{way}_pct_copy"] = 100 * nbytes / us / 1e3 / copy_gbs
    return row


def probe_layer(m: int, n: int, k: int) -> dict:
    x = torch.randn(m, k, device="cuda").bfloat16()
    layer = Layer(n, k)
    bf16 = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    outs, row = _both(lambda: layer(x))
    diff = ((outs[True].float() - outs[False].float()).norm() / outs[False].float().norm()).item()
    row.update(M=m, N=n, K=k, bf16_us=bf16, rel_diff=diff)
    return row


def _line(head: str, row: dict, extra: str) -> str:
    a = min(row["per_program_us_0"], row["per_program_us_1"])
    b = min(row["kept_us_0"], row["kept_us_1"])
    return (f"{head} | {row['per_program_us_0']:7.1f} {row['per_program_us_1']:7.1f} | "
            f"{row['kept_us_0']:7.1f} {row['kept_us_1']:7.1f} | {a / b:.3f}x {extra}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="512,1024,4608")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    saved = wmod.KEEP_ROW_SCALE
    copy_gbs = copy_bandwidth()
    result = {**run_info(), "copy_gbs": copy_gbs, "widen": [], "layer": []}
    try:
        print(f"widen alone (copy {copy_gbs:.0f} GB/s)")
        print(f"{'N':>6} {'K':>6} | per program x2 | kept x2        | speed-up, % copy")
        for n, k in NKS:
            r = probe_widen(n, k, copy_gbs)
            result["widen"].append(r)
            extra = f"{r['per_program_pct_copy']:.0f}% -> {r['kept_pct_copy']:.0f}% eq {r['equal']}"
            print(_line(f"{n:6d} {k:6d}", r, extra), flush=True)
        print("layer (quantize + widen + GEMM + low-rank + bias)")
        print(f"{'M':>5} {'N':>6} {'K':>6} | per program x2 | kept x2        | speed-up, vs BF16")
        for m in (int(v) for v in a.ms.split(",")):
            for n, k in NKS:
                r = probe_layer(m, n, k)
                result["layer"].append(r)
                best = min(r["kept_us_0"], r["kept_us_1"])
                old = min(r["per_program_us_0"], r["per_program_us_1"])
                extra = (f"bf16 {r['bf16_us']:.1f}: {r['bf16_us'] / old:.3f}x -> "
                         f"{r['bf16_us'] / best:.3f}x diff {r['rel_diff']:.1e}")  # fmt: skip
                print(_line(f"{m:5d} {n:6d} {k:6d}", r, extra), flush=True)
    finally:
        wmod.KEEP_ROW_SCALE = saved
    print("->", write_result(result, a.out, "probe_row_scale"))


if __name__ == "__main__":
    main()
