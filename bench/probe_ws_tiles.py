"""The warp-specialized GEMM's tiles (``gemm_ws.CANDIDATE_TILES``) at the models' shapes.

At each M and (N, K) — the small models' layers (PixArt-Σ 1152, SDXL 640/1280, SANA 2240)
and the issue's FLUX shapes — replayed from CUDA graphs in one run: cuBLAS BF16
``F.linear`` with bias, cuBLAS fp8 rowwise ``torch._scaled_mm``, the Triton ``fp8_gemm``
(its tuned tile) and ``fp8_gemm_ws`` (GEMM + rank-32 low-rank + bias) with each candidate
tile (``…pp``: two MMA partitions taking the tiles in turn), each checked against
``fp8_gemm_ref``. Where a tile of 128 x 256 leaves most of the
GPU's multiprocessors idle (M = 1024, N = 1152: 40 tiles for 132), a smaller one may win.
``picked``: the tile ``gemm_ws.pick_tile``'s cost model chooses there. For NOTES.md and
``gemm_ws.TILE_COSTS`` (``bench/fit_tile_costs.py`` fits it to a run).

    PYTHONPATH=src python bench/probe_ws_tiles.py [--ms 1024,4096] [--shapes 1152x1152,...] \
        [--flux-ms 512,1024,4608]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gemm import NKS, bench_graph, run_info, write_result
from probe_gemm import operands

from svdquant.kernels import gemm as gemm_mod
from svdquant.kernels import gemm_ws
from svdquant.kernels import reference as ref
from svdquant.kernels._triton_common import num_sms
from svdquant.kernels.gemm import fp8_gemm

#: The small models' linear shapes (N x K): PixArt-Σ (1152 wide), SDXL (640 and 1280),
#: SANA (2240) — ``bench/models.py``'s architectures.
SMALL = ("1152x1152,3456x1152,4608x1152,1152x4608,640x640,1920x640,640x2560,1280x1280,"
         "3840x1280,1280x5120,2240x2240,6720x2240,11200x2240")  # fmt: skip


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _row(m: int, n: int, k: int) -> dict:
    x, layer, s, xq, lora, wq, s_ch = operands(m, n, k)
    args = (xq, wq, s_ch, s, lora, layer.up, layer.bias, torch.bfloat16)
    want = ref.fp8_gemm_ref(*args)
    r: dict = {"M": m, "N": n, "K": k, "tiles": {}}
    r["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    xf8, wf8 = x.to(torch.float8_e4m3fn), layer.w16.to(torch.float8_e4m3fn)
    sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    r["cublas_fp8_us"] = bench_graph(
        lambda: torch._scaled_mm(xf8, wf8.t(), sa, sb, out_dtype=torch.bfloat16)
    )
    gemm_mod.WS_GEMM = False  # fp8_gemm itself, not its hand-off to gemm_ws
    try:
        r["triton_us"] = bench_graph(lambda: fp8_gemm(*args))
    finally:
        gemm_mod.WS_GEMM = True
    for tile in gemm_ws.CANDIDATE_TILES:
        name = gemm_ws.tile_name(tile)
        if not gemm_ws.tile_fits(tile, 32):  # pick_tile would run another in its place
            r["tiles"][name] = {"error": "does not fit shared memory at rank 32"}
            continue
        gemm_ws.TILE_OVERRIDE = tile
        try:
            err = _rel(gemm_ws.fp8_gemm_ws(*args), want)
            us = bench_graph(lambda: gemm_ws.fp8_gemm_ws(*args))
            r["tiles"][name] = {"us": us, "err": err, "x": r["bf16_us"] / us}
        except Exception as e:  # a tile the GPU cannot launch (shared memory, registers)
            r["tiles"][name] = {"error": str(e)[:200]}
        finally:
            gemm_ws.TILE_OVERRIDE = None
    # every tile computes the same sums in the same order: an error past the tests' 4e-3
    # that all share is the shape's data (v44: 6.7e-3 at the first shape), not a tile's
    ok = 1.01 * min((v["err"] for v in r["tiles"].values() if "err" in v), default=0.0)
    timed = {t: v["us"] for t, v in r["tiles"].items() if "us" in v and v["err"] <= max(4e-3, ok)}
    r["picked"] = gemm_ws.tile_name(gemm_ws.pick_tile(m, n, k, 32, num_sms(x.device)))
    r["best"] = min(timed, key=timed.get) if timed else None
    default = gemm_ws.tile_name(gemm_ws.DEFAULT_TILE)
    if r["best"] and default in timed:
        r["best_vs_default"] = timed[default] / timed[r["best"]]
    return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="1024,4096")
    p.add_argument("--shapes", default=SMALL)
    p.add_argument("--flux-ms", default="512,1024,4608", help="M of the issue's six shapes")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args(argv)
    if not torch.cuda.is_available() or not gemm_ws.available(torch.device("cuda")):
        raise SystemExit("probe_ws_tiles needs a CUDA GPU (sm_90) and a triton with Gluon")
    torch.manual_seed(0)
    nks = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",") if s]
    plan = [(m, n, k) for m in map(int, a.ms.split(",")) for n, k in nks]
    if a.flux_ms:
        plan += [(m, n, k) for m in map(int, a.flux_ms.split(",")) for n, k in NKS]
    rows = []
    for m, n, k in plan:
        rows.append(_row(m, n, k))
        r = rows[-1]
        cells = " ".join(
            f"{t}:{v['us']:.1f}" if "us" in v else f"{t}:err" for t, v in r["tiles"].items()
        )
        print(f"{m:>5} {n:>6} {k:>6} bf16 {r['bf16_us']:.1f} fp8cub {r['cublas_fp8_us']:.1f} "
              f"triton {r['triton_us']:.1f} | {cells} | best {r['best']} "
              f"{r.get('best_vs_default', 0):.3f}x, picked {r['picked']}", flush=True)  # fmt: skip
    result = {**run_info(), "bench": "probe_ws_tiles", "candidates": gemm_ws.CANDIDATE_TILES,
              "rows": rows}  # fmt: skip
    print("->", write_result(result, a.out, "probe_ws_tiles"))


if __name__ == "__main__":
    main()
