"""The quantize + widen pre-pass: one interleaved launch against two, alone and in the layer.

For each M and (N, K) of ``bench/gemm.py`` (int4 weights, rank 32, bias), replayed from
CUDA graphs in one run: ``ops.quantize_and_widen`` as one launch (``FUSED_PREPASS``), as
two launches with the widen the quantize's programmatic dependent (``OVERLAP_WIDEN``), and
as two plain launches; then the whole layer (``svdq_linear_triton``) with the fused and
the PDL pre-pass, against cuBLAS BF16. Checks that the variants agree bit for bit. For
NOTES.md.

    PYTHONPATH=src python bench/probe_prepass.py [--ms 512,1024,4096,4608] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gemm import MS, NKS, Layer, bench_graph, run_info, write_result

from svdquant.kernels import ops as ops_mod
from svdquant.kernels import reference as ref

MODES = {"fused": (True, True), "pdl": (False, True), "seq": (False, False)}


def probe(m: int, n: int, k: int) -> dict:
    x = torch.randn(m, k, device="cuda").bfloat16()
    layer = Layer(n, k)
    s = ref.act_scale_from_amax(layer.act_amax)
    kp = layer.qweight.shape[1] * 2
    args = (x, layer.smooth, layer.down, s, kp, "int4", layer.qweight, layer.wscales,
            layer.wtensor_scale, layer.fmt)  # fmt: skip
    row: dict = {"M": m, "N": n, "K": k}
    row["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    outs = {}
    try:
        for name, (fused, overlap) in MODES.items():
            ops_mod.FUSED_PREPASS, ops_mod.OVERLAP_WIDEN = fused, overlap
            outs[name] = torch.ops.svdquant.quantize_and_widen(*args)
            row[f"prepass_{name}_us"] = bench_graph(
                lambda: torch.ops.svdquant.quantize_and_widen(*args)
            )
            if name != "seq":
                row[f"layer_{name}_us"] = bench_graph(lambda: layer(x))
                row[f"layer_{name}_x"] = row["bf16_us"] / row[f"layer_{name}_us"]
    finally:
        ops_mod.FUSED_PREPASS, ops_mod.OVERLAP_WIDEN = True, True
    a, b = outs["fused"], outs["seq"]
    same = [torch.equal(a[i].view(torch.uint8), b[i].view(torch.uint8)) for i in (0, 2)]
    row["equal"] = all(same) and torch.equal(a[3], b[3])
    row["equal"] = row["equal"] and torch.allclose(a[1], b[1], rtol=1e-5, atol=1e-6)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default=",".join(str(m) for m in MS))
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args()
    result = run_info()
    result["rows"] = []
    print(f"{'M':>5} {'N':>6} {'K':>6} | prepass us: fused    pdl    seq | layer x BF16: "
          "fused   pdl | equal")  # fmt: skip
    for m in (int(v) for v in args.ms.split(",")):
        for n, k in NKS:
            r = probe(m, n, k)
            result["rows"].append(r)
            print(f"{m:5d} {n:6d} {k:6d} | {r['prepass_fused_us']:17.1f} "
                  f"{r['prepass_pdl_us']:6.1f} {r['prepass_seq_us']:6.1f} | "
                  f"{r['layer_fused_x']:18.3f} {r['layer_pdl_x']:5.3f} | {r['equal']}",
                  flush=True)  # fmt: skip
    print("->", write_result(result, args.out, "probe_prepass"))


if __name__ == "__main__":
    main()
