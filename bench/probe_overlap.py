"""Which way the quantize and the widen of a layer overlap, on the GPU.

``ops.quantize_and_widen`` launches the two memory-bound passes of a layer next to each
other. Three ways, the whole layer (quantize + widen + GEMM + low-rank + bias) replayed
from a CUDA graph, timed a, b, c, a, b, c in one run with BF16 ``F.linear`` of the same
run, at every shape of ``bench/gemm.py`` (the overlap forced on for all, whatever
``OVERLAP_MIN_M`` / ``OVERLAP_MAX_WEIGHTS`` say):

* ``seq``: one after the other (``OVERLAP_WIDEN = False``);
* ``q_w``: the widen as the quantize's programmatic dependent (the default until v28):
  it starts when the quantize's last wave does;
* ``w_q``: the widen first, triggering at once, the quantize as its dependent
  (``WIDEN_FIRST``, the default since): the widen's few programs run beside the whole
  quantize.

Outputs are compared across the three (the low-rank sums meet through atomics: equal to
rounding, not bit for bit).

    PYTHONPATH=src python bench/probe_overlap.py [--ms 4608,4096,1024] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gemm import NKS, Layer, bench_graph, run_info, write_result

from svdquant.kernels import ops as ops_mod

MODES = {"seq": (False, False), "q_w": (True, False), "w_q": (True, True)}


def _set(mode: str) -> None:
    ops_mod.OVERLAP_WIDEN, ops_mod.WIDEN_FIRST = MODES[mode]


def probe(m: int, n: int, k: int) -> dict:
    x = torch.randn(m, k, device="cuda").bfloat16()
    layer = Layer(n, k)
    row: dict = {"M": m, "N": n, "K": k}
    row["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    outs = {}
    for i in range(2):
        for mode in MODES:
            _set(mode)
            outs[mode] = layer(x)
            row[f"{mode}_us_{i}"] = bench_graph(lambda: layer(x))
    base = outs["seq"].float()
    for mode in ("q_w", "w_q"):
        row[f"{mode}_rel_diff"] = ((outs[mode].float() - base).norm() / base.norm()).item()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="4608,4096,1024")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    saved = (ops_mod.OVERLAP_WIDEN, ops_mod.WIDEN_FIRST, ops_mod.OVERLAP_MIN_M,
             ops_mod.OVERLAP_MAX_WEIGHTS)  # fmt: skip
    ops_mod.OVERLAP_MIN_M, ops_mod.OVERLAP_MAX_WEIGHTS = 0, None
    result = {**run_info(), "rows": []}
    print(f"{'M':>5} {'N':>6} {'K':>6} | bf16 us | seq x2 | q_w x2 | w_q x2 | "
          "w_q vs q_w, vs seq (best of two)")  # fmt: skip
    try:
        for m in (int(v) for v in a.ms.split(",")):
            for n, k in NKS:
                r = probe(m, n, k)
                result["rows"].append(r)
                best = {md: min(r[f"{md}_us_0"], r[f"{md}_us_1"]) for md in MODES}
                cells = " | ".join(f"{r[f'{md}_us_0']:6.1f} {r[f'{md}_us_1']:6.1f}" for md in MODES)
                print(f"{m:5d} {n:6d} {k:6d} | {r['bf16_us']:7.1f} | {cells} | "
                      f"{best['q_w'] / best['w_q']:.3f}x {best['seq'] / best['w_q']:.3f}x "
                      f"diff {r['w_q_rel_diff']:.1e}", flush=True)  # fmt: skip
    finally:
        (ops_mod.OVERLAP_WIDEN, ops_mod.WIDEN_FIRST, ops_mod.OVERLAP_MIN_M,
         ops_mod.OVERLAP_MAX_WEIGHTS) = saved  # fmt: skip
    print("->", write_result(result, a.out, "probe_overlap"))


if __name__ == "__main__":
    main()
