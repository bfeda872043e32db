"""Where the W4A16 GEMV's time goes: its two kernels apart and together.

At FLUX.1's modulation shape (N = 18432, K = 3072, rank 32, bias; M = 1 and 4), replayed
from CUDA graphs: BF16 ``F.linear``; the whole ``w4a16_linear`` with the GEMV launched as
the prep kernel's programmatic dependent (``gemv.PDL``) and without; the prep kernel (x̂
and the low-rank down projection) alone; the GEMV kernel alone on the prep's outputs,
with and without its low-rank epilogue. The differences say what the kernel boundary,
the prep and the low-rank branch cost. Also checks that the graph replays with and
without PDL give the same bits. For NOTES.md.

    PYTHONPATH=src python bench/probe_gemv.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gemm import Layer, bench_graph, copy_bandwidth, run_info, write_result

from svdquant.kernels import gemv as gemv_mod
from svdquant.kernels import reference as ref

N, K = 18432, 3072


def _graph_out(fn) -> torch.Tensor:
    """``fn()``'s result as a CUDA graph replay gives it (not the eager call's)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    out.zero_()
    g.replay()
    torch.cuda.synchronize()
    return out.clone()


def probe(m: int, layer: Layer, copy_gbs: float) -> dict:
    x = torch.randn(m, K, device="cuda").bfloat16()
    fma = m <= gemv_mod.FMA_MAX_M
    w = (layer.qweight, layer.wscales, layer.wtensor_scale)
    args = (*w, layer.smooth, layer.down, layer.up, layer.bias, "int4")
    ops = gemv_mod._operands(*w, layer.up, fma)
    xh, lora = gemv_mod.prep(x, layer.smooth, layer.down, K, "int4", fma=fma)
    row: dict = {"M": m, "path": "fma" if fma else "mma"}
    row["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    outs = {}
    for pdl in (True, False):
        gemv_mod.PDL = pdl
        row[f"full_pdl{int(pdl)}_us"] = bench_graph(lambda: gemv_mod.w4a16_linear(x, *args))
        outs[pdl] = _graph_out(lambda: gemv_mod.w4a16_linear(x, *args))
    gemv_mod.PDL = True
    row["pdl_same_bits"] = bool(torch.equal(outs[True], outs[False]))
    y_ref = ref.w4a16_linear_ref(x, *args)
    row["rel_err"] = float((outs[True].float() - y_ref).norm() / y_ref.norm())
    row["prep_us"] = bench_graph(
        lambda: gemv_mod.prep(x, layer.smooth, layer.down, K, "int4", fma=fma)
    )
    q, s, ts, up = ops
    row["gemv_us"] = bench_graph(
        lambda: gemv_mod.gemv(xh, lora, q, s, ts, up, layer.bias, "int4", torch.bfloat16)
    )
    row["gemv_nolr_us"] = bench_graph(
        lambda: gemv_mod.gemv(
            xh, lora[..., :0], q, s, ts, up[:, :0], layer.bias, "int4", torch.bfloat16
        )
    )
    read = N * K // 2 + layer.wscales.numel() * 2
    row["gemv_nolr_pct_copy"] = 100 * read / row["gemv_nolr_us"] / 1e3 / copy_gbs
    row["x_pdl"] = row["bf16_us"] / row["full_pdl1_us"]
    row["x_no_pdl"] = row["bf16_us"] / row["full_pdl0_us"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth()
    layer = Layer(N, K)
    rows = [probe(m, layer, copy_gbs) for m in (1, 2, 4)]
    result = {
        **run_info(),
        "copy_gbs": copy_gbs,
        "tiles": dict(gemv_mod.TILES),
        "fma_max_m": gemv_mod.FMA_MAX_M,
        "rows": rows,
    }
    path = write_result(result, a.out, "probe_gemv")
    print(f"{result['device']}  copy {copy_gbs:.0f} GB/s  -> {path}")
    cols = ("M", "path", "bf16_us", "full_pdl1_us", "full_pdl0_us", "prep_us", "gemv_us",
            "gemv_nolr_us", "gemv_nolr_pct_copy", "x_pdl", "pdl_same_bits", "rel_err")  # fmt: skip
    print(" ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>13.4g}" if isinstance(r[c], float) else f"{r[c]!s:>13}"
                       for c in cols))  # fmt: skip


if __name__ == "__main__":
    main()
