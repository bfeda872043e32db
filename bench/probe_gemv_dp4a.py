"""The dp4a W4A16 GEMV against the kernels before it, on the GPU, and its tiles.

``kernels.gemv.DP4A_MAX_M`` sends int4 weights at up to that many tokens to
``_w4a16_dp4a_kernel``: x̂ as 16-bit integers per group (high and low bytes), the codes as
signed bytes ``16 · code`` by one or two logic ops, four products per ``dp4a`` — ~1.5
instructions per code at one token in its sm_90 SASS against 4.6 for the FMA kernel
(``bench/sass_report.py --kernels gemv_fma,gemv_dp4a``). Here, at FLUX.1's modulation
shapes (N = 18432 and 9216, K = 3072, rank 32, bias), replayed from CUDA graphs, the
whole ``w4a16_linear`` two ways — "before" (``DP4A_MAX_M = 0``: the FMA kernel up to
``FMA_MAX_M`` tokens, the packed tensor-core kernel above) and "dp4a" — each checked
against ``reference.w4a16_linear_ref``, with BF16 ``F.linear`` of the same run, the L2
emptied before each replay as well (``_clean``), and the share of copy bandwidth on the
bytes the GEMV must read (codes and group scales). Then, with ``--sweep``, the dp4a
kernel's tiles (``TILES["dp4a"]`` at one token, ``["dp4a_multi"]`` above).

    PYTHONPATH=src python bench/probe_gemv_dp4a.py [--out DIR] [--sweep]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).parent))
from gemm import (
    Layer,
    _graph,
    bench_graph,
    bench_graph_clean,
    copy_bandwidth,
    run_info,
    write_result,
)
from probe_gemv_mma import K, _case, _rel  # the same layer inputs and error measure

from svdquant.kernels import gemv as gemv_mod

NS = (18432, 9216)
MS = (1, 2, 3, 4, 5, 8)
SWEEP = {
    1: list(itertools.product((4, 8, 16), (512, 1024, 2048), (1, 2))),
    4: list(itertools.product((2, 4, 8), (512, 1024), (1, 2))),
    16: list(itertools.product((1, 2, 4), (512, 1024), (1, 2))),
}


@contextlib.contextmanager
def _config(dp4a: bool, tile: tuple | None = None, key: str = "dp4a"):
    saved = (gemv_mod.DP4A_MAX_M, dict(gemv_mod.TILES))
    try:
        gemv_mod.DP4A_MAX_M = 16 if dp4a else 0
        if tile is not None:
            gemv_mod.TILES[key] = tuple(tile)
        yield
    finally:
        gemv_mod.DP4A_MAX_M = saved[0]
        gemv_mod.TILES.clear()
        gemv_mod.TILES.update(saved[1])


def probe(m: int, n: int, layer: Layer, copy_gbs: float) -> dict:
    x, args, y_ref = _case(m, layer)
    nbytes = n * K // 2 + n * (K // 64) * layer.wscales.element_size()
    row: dict = {"M": m, "N": n, "K": K, "weight_bytes": nbytes}
    with _config(False):
        row["before_path"] = gemv_mod._path(m, "int4")
    w16 = layer.w16
    row["bf16_us"] = bench_graph(lambda: F.linear(x, w16, layer.bias))
    row["bf16_clean_us"] = bench_graph_clean(lambda: F.linear(x, w16, layer.bias))
    for name, dp4a in (("before", False), ("dp4a", True)):
        try:
            with _config(dp4a):
                y = gemv_mod.w4a16_linear(x, *args)
                row[f"{name}_rel_err"] = _rel(y, y_ref)
                row[f"{name}_us"] = bench_graph(lambda: gemv_mod.w4a16_linear(x, *args))
                row[f"{name}_clean_us"] = bench_graph_clean(lambda: gemv_mod.w4a16_linear(x, *args))
            row[f"{name}_x"] = row["bf16_us"] / row[f"{name}_us"]
            row[f"{name}_clean_x"] = row["bf16_clean_us"] / row[f"{name}_clean_us"]
            row[f"{name}_pct_copy"] = 100 * nbytes / row[f"{name}_us"] / 1e3 / copy_gbs
        except Exception as e:  # the PTX or a tile that does not compile
            row[f"{name}_error"] = str(e)[:300]
    return row


def split(m: int, layer: Layer) -> dict:
    """Where the default path's time goes at ``m`` tokens: the prep kernel alone, the GEMV
    alone on the prep's outputs (no PDL: nothing to overlap), and the two together."""
    x, args, _ = _case(m, layer)
    qw, ws, ts, smooth, down, up, bias, fmt = args
    kp = qw.shape[1] * 2
    path = gemv_mod._path(m, fmt)
    kw = dict(fma=path == "fma", packed=path == "packed", i16=path == "dp4a")
    xh, lora = gemv_mod.prep(x, smooth, down, kp, fmt, **kw)
    row = {"M": m, "N": qw.shape[0], "path": path}
    row["prep_us"] = bench_graph(lambda: gemv_mod.prep(x, smooth, down, kp, fmt, **kw))
    row["gemv_us"] = bench_graph(
        lambda: gemv_mod.gemv(xh, lora, qw, ws, ts, up, bias, fmt, x.dtype)
    )
    row["whole_us"] = bench_graph(lambda: gemv_mod.w4a16_linear(x, *args))
    row["gemv_clean_us"] = bench_graph_clean(
        lambda: gemv_mod.gemv(xh, lora, qw, ws, ts, up, bias, fmt, x.dtype)
    )
    return row


def _quick(fn) -> float:
    return do_bench(_graph(fn).replay, warmup=5, rep=25, return_mode="median") * 1e3


def sweep(m: int, layer: Layer) -> list[dict]:
    x, args, y_ref = _case(m, layer)
    key = "dp4a" if m == 1 else "dp4a_multi"
    rows = []
    for tile in SWEEP[m]:
        row: dict = {"M": m, "tile": list(tile)}
        try:
            with _config(True, tile, key):
                y = gemv_mod.w4a16_linear(x, *args)
                row["rel_err"] = _rel(y, y_ref)
                row["us"] = _quick(lambda: gemv_mod.w4a16_linear(x, *args))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--sweep", action="store_true", help="the dp4a kernel's tiles")
    a = p.parse_args()
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth()
    result: dict = {**run_info(), "copy_gbs": copy_gbs, "tiles": dict(gemv_mod.TILES),
                    "rows": [], "sweep": []}  # fmt: skip
    t0 = time.perf_counter()
    layers = {n: Layer(n, K) for n in NS}
    if a.sweep:
        for m in SWEEP:
            result["sweep"] += sweep(m, layers[NS[0]])
            ok = [r for r in result["sweep"] if r["M"] == m and "us" in r and r["rel_err"] < 4e-3]
            best = min(ok, key=lambda r: r["us"]) if ok else None
            print(f"M={m:2d} best tile {best and best['tile']} {best and best['us']:.1f} us "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
            write_result(result, a.out, "probe_gemv_dp4a")
    for n in NS:
        for m in MS:
            row = probe(m, n, layers[n], copy_gbs)
            result["rows"].append(row)
            print(json.dumps({c: round(v, 4) if isinstance(v, float) else v
                              for c, v in row.items()}), flush=True)  # fmt: skip
    result["split"] = [split(m, layers[n]) for n in NS for m in (1, 4)]
    for r in result["split"]:
        print(json.dumps({c: round(v, 2) if isinstance(v, float) else v for c, v in r.items()}))
    path = write_result(result, a.out, "probe_gemv_dp4a")
    print(f"{'N':>6} {'M':>3} {'bf16':>6} {'before':>7} {'dp4a':>6} {'x_bef':>6} "
          f"{'x_dp4a':>6} {'%copy':>6}")  # fmt: skip
    for r in result["rows"]:
        print(f"{r['N']:6d} {r['M']:3d} {r['bf16_us']:6.1f} {r.get('before_us', 0):7.1f} "
              f"{r.get('dp4a_us', 0):6.1f} {r.get('before_x', 0):6.2f} "
              f"{r.get('dp4a_x', 0):6.2f} "
              f"{r.get('dp4a_pct_copy', 0):6.1f}")  # fmt: skip
    print(f"-> {path} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
