"""The widen's tile (``widen.TILE``) swept per weight shape, on the GPU.

``bench/gemm.py --sweep`` picks one tile at N = 12288, K = 3072; at K = 12288 and 15360
(N = 3072) the widen runs at ~47-50% of copy against 54-61% for the wide-N shapes, and
each program re-reads all of its rows' group scales (G = K / 64) for the row scale —
more bytes than its codes at K = 12288. Narrower or wider tiles change that ratio: each
tile timed at each (N, K), replayed from a CUDA graph, outputs compared bit for bit with
the default tile's.

    PYTHONPATH=src python bench/probe_widen_tiles.py [--shapes 3072x12288,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemm import Layer, bench_graph, copy_bandwidth, run_info, write_result

from svdquant.kernels import widen as wmod

TILES = list(itertools.product((8, 16, 32), (512, 1024, 2048), (2, 4, 8)))


def probe(n: int, k: int, copy_gbs: float) -> list[dict]:
    layer = Layer(n, k)
    args = (layer.qweight, layer.wscales, layer.wtensor_scale, layer.fmt)
    nbytes = layer.qweight.numel() + layer.wscales.numel() * 2 + n * k + n * 4
    default = wmod.TILE
    ref_wq, ref_s = wmod.widen_weight(*args)
    rows = []
    try:
        for tile in [default, *[t for t in TILES if t != default]]:
            wmod.TILE = tile
            wq, s = wmod.widen_weight(*args)
            same = torch.equal(wq.view(torch.uint8), ref_wq.view(torch.uint8))
            us = bench_graph(lambda: wmod.widen_weight(*args))
            pct = 100 * nbytes / us / 1e3 / copy_gbs
            row = {"N": n, "K": k, "tile": list(tile), "us": us, "pct_copy": pct}
            rows.append({**row, "equal": same and torch.equal(s, ref_s)})
    finally:
        wmod.TILE = default
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="3072x12288,3072x15360,12288x3072,3072x3072")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    copy_gbs = copy_bandwidth()
    result = {**run_info(), "copy_gbs": copy_gbs, "default_tile": list(wmod.TILE), "rows": []}
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        rows = probe(n, k, copy_gbs)
        result["rows"] += rows
        base = rows[0]["us"]
        print(f"N {n} K {k}: default {tuple(rows[0]['tile'])} {base:.1f} us "
              f"({rows[0]['pct_copy']:.0f}% of copy); best five:")  # fmt: skip
        for r in sorted(rows, key=lambda r: r["us"])[:5]:
            print(f"  {tuple(r['tile'])} {r['us']:6.1f} us {r['pct_copy']:4.0f}% "
                  f"{base / r['us']:.3f}x equal {r['equal']}", flush=True)  # fmt: skip
    print("->", write_result(result, a.out, "probe_widen_tiles"))


if __name__ == "__main__":
    main()
