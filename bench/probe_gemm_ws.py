"""The warp-specialized Gluon GEMM (``kernels/gemm_ws.py``) against the Triton GEMM and cuBLAS.

At each M and (N, K) of ``bench/gemm.py`` (int4 weights widened, rank 32, bias), replayed
from CUDA graphs in one run: cuBLAS BF16 ``F.linear`` with bias, cuBLAS fp8 rowwise
``torch._scaled_mm`` (no bias), the Triton ``fp8_gemm`` (GEMM + low-rank + bias, its
tuned tile) and ``fp8_gemm_ws`` with and without the low-rank branch; both GEMMs checked
against ``fp8_gemm_ref``. For NOTES.md.

    PYTHONPATH=src python bench/probe_gemm_ws.py [--ms 4096,4608] [--set STAGES=3] [--out DIR]
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gemm import MS, NKS, bench_graph, run_info, write_result
from probe_gemm import operands

from svdquant.kernels import gemm as gemm_mod
from svdquant.kernels import gemm_ws
from svdquant.kernels import reference as ref
from svdquant.kernels.gemm import fp8_gemm


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _row(m: int, n: int, k: int) -> dict:
    x, layer, s, xq, lora, wq, s_ch = operands(m, n, k)
    args = (xq, wq, s_ch, s, lora, layer.up, layer.bias, torch.bfloat16)
    nolr = (xq, wq, s_ch, s, lora[:, :0], layer.up[:, :0], layer.bias, torch.bfloat16)
    want = ref.fp8_gemm_ref(*args)
    r = {"M": m, "N": n, "K": k}
    gemm_mod.WS_GEMM = False
    r["err_triton"] = _rel(fp8_gemm(*args), want)
    gemm_mod.WS_GEMM = True
    r["err_ws"] = _rel(gemm_ws.fp8_gemm_ws(*args), want)
    r["err_ws_nolr"] = _rel(gemm_ws.fp8_gemm_ws(*nolr), ref.fp8_gemm_ref(*nolr))
    xf8, wf8 = x.to(torch.float8_e4m3fn), layer.w16.to(torch.float8_e4m3fn)
    sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    r["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    r["cublas_fp8_us"] = bench_graph(
        lambda: torch._scaled_mm(xf8, wf8.t(), sa, sb, out_dtype=torch.bfloat16)
    )
    gemm_mod.WS_GEMM = False  # fp8_gemm itself, not its hand-off to gemm_ws
    r["triton_us"] = bench_graph(lambda: fp8_gemm(*args))
    r["ws_us"] = bench_graph(lambda: gemm_ws.fp8_gemm_ws(*args))
    r["ws_nolr_us"] = bench_graph(lambda: gemm_ws.fp8_gemm_ws(*nolr))
    bare = (*nolr[:6], None, torch.bfloat16)  # no low-rank branch, no bias
    r["ws_bare_us"] = bench_graph(lambda: gemm_ws.fp8_gemm_ws(*bare))
    r["triton_again_us"] = bench_graph(lambda: fp8_gemm(*args))
    gemm_mod.WS_GEMM = True
    for key in ("cublas_fp8", "triton", "ws", "ws_nolr", "ws_bare", "triton_again"):
        r[f"{key}_x"] = r["bf16_us"] / r[f"{key}_us"]
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default=",".join(map(str, MS)))
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in NKS))
    p.add_argument("--set", action="append", default=[], help="gemm_ws.NAME=VALUE")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    for spec in a.set:
        name, value = spec.split("=", 1)
        setattr(gemm_ws, name, ast.literal_eval(value))
    assert gemm_ws.available(torch.device("cuda")), "needs sm_90 and a Gluon triton"
    rows = []
    print(f"{'M':>5} {'N':>6} {'K':>6} | bf16 | cuBLAS fp8 | triton | ws | ws no-lr, bare | "
          "x BF16: triton ws | err triton ws")  # fmt: skip
    for m in map(int, a.ms.split(",")):
        for n, k in (map(int, s.split("x")) for s in a.shapes.split(",")):
            r = _row(m, n, k)
            rows.append(r)
            print(f"{m:5d} {n:6d} {k:6d} | {r['bf16_us']:6.1f} | {r['cublas_fp8_us']:6.1f} | "
                  f"{r['triton_us']:6.1f} {r['triton_again_us']:6.1f} | {r['ws_us']:6.1f} | "
                  f"{r['ws_nolr_us']:6.1f} {r['ws_bare_us']:6.1f} | "
                  f"{r['triton_x']:.3f} {r['ws_x']:.3f} | "
                  f"{r['err_triton']:.1e} {r['err_ws']:.1e} {r['err_ws_nolr']:.1e}")  # fmt: skip
    result = {**run_info(), "bench": "probe_gemm_ws", "set": a.set, "stages": gemm_ws.STAGES,
              "rows": rows}  # fmt: skip
    print("->", write_result(result, a.out, "probe_gemm_ws"))


if __name__ == "__main__":
    main()
