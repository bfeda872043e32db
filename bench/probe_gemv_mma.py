"""The packed-decode tensor-core GEMV against the W4A16 kernels before it, on the GPU.

``kernels.gemv.PACKED_MMA`` (on since this probe's H200 run of 2026-11-29: 1.09-1.11x
at M = 5, 8, 16) sends int4 weights at more than ``FMA_MAX_M`` tokens to
``_w4a16_packed_kernel``: two codes decoded per instance of a small PTX routine into
bf16 ``136 + code`` and multiplied on the tensor cores against x̂'s bf16 hi/lo planes
(bench/NOTES.md, v21–v24: ~4 instructions per code in its sm_90 SASS, against 4.6 for
the FMA kernel at one token and 8.4 for the tensor-core kernel ``_w4a16_mma_kernel``).
Here, at FLUX.1's modulation shape (N = 18432, K = 3072, rank 32, bias), M = 1, 2, 4,
5, 6, 7, 8, 16, replayed from CUDA graphs, the whole ``w4a16_linear`` two ways, each
checked against ``reference.w4a16_linear_ref``: "today", the path without the packed
kernel (``PACKED_MMA`` forced off: the FMA kernel up to ``FMA_MAX_M`` tokens,
``_w4a16_mma_kernel`` above), and "packed", the packed kernel for every M
(``PACKED_MMA`` on, ``FMA_MAX_M = 0``); and BF16 ``F.linear`` of the same run. The
default path is "today" at M ≤ ``FMA_MAX_M`` and "packed" above.

``--sweep``: at M = 1, 2, 4, 5, 8, 16 the packed kernel over its tiles
(``TILES["packed"]`` = BLOCK_N 32–256 × 1, 2, 4 groups of 64 columns a loop step × 4, 8
warps; a tile that does not compile is recorded with its error), each checked against
"today" (rel err) and timed like the rest (CUDA graph, median of ``do_bench``, fewer
repetitions). Prints the best tile per M against "today"; every row goes into
``probe_gemv_mma_sweep-<date>.json`` (rewritten after each M: a run cut short keeps what
it measured). A few minutes on an H200, most of it compiling.

    PYTHONPATH=src python bench/probe_gemv_mma.py [--out DIR] [--sweep]
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
from gemm import Layer, _graph, bench_graph, run_info, write_result

from svdquant.kernels import gemv as gemv_mod
from svdquant.kernels import reference as ref

N, K = 18432, 3072
DEVICE = "cuda"
MS = (1, 2, 4, 5, 6, 7, 8, 16)
SWEEP_MS = (1, 2, 4, 5, 8, 16)
#: (BLOCK_N, groups per step, num_warps) of the packed kernel, as ``TILES["packed"]``
SWEEP_TILES = list(itertools.product((32, 64, 128, 256), (1, 2, 4), (4, 8)))


@contextlib.contextmanager
def _config(packed: bool, tile: tuple | None = None):
    """The GEMV without the packed kernel (``packed`` False: ``PACKED_MMA`` off, the FMA
    kernel up to ``FMA_MAX_M`` tokens, ``_w4a16_mma_kernel`` above) or on the packed
    kernel for every M, at ``tile`` where given; the module's settings restored after."""
    saved = (gemv_mod.PACKED_MMA, gemv_mod.FMA_MAX_M, gemv_mod.TILES["packed"])
    try:
        gemv_mod.PACKED_MMA = packed
        if packed:
            gemv_mod.FMA_MAX_M = 0
        if tile is not None:
            gemv_mod.TILES["packed"] = tuple(tile)
        yield
    finally:
        gemv_mod.PACKED_MMA, gemv_mod.FMA_MAX_M, gemv_mod.TILES["packed"] = saved


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _case(m: int, layer: Layer):
    x = torch.randn(m, K, device=DEVICE).bfloat16()
    args = (layer.qweight, layer.wscales, layer.wtensor_scale, layer.smooth, layer.down)
    args += (layer.up, layer.bias, "int4")
    return x, args, ref.w4a16_linear_ref(x, *args)


def probe(m: int, layer: Layer) -> dict:
    """The path without the packed kernel ("today") and the packed kernel at ``m``
    tokens (time, error, ratio to BF16)."""
    x, args, y_ref = _case(m, layer)
    row: dict = {"M": m, "today": "fma" if m <= gemv_mod.FMA_MAX_M else "mma"}
    row["default"] = gemv_mod._path(m, "int4")  # the kernel w4a16_linear picks
    row["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    for name, packed in (("today", False), ("packed", True)):
        try:
            with _config(packed):
                y = gemv_mod.w4a16_linear(x, *args)
                row[f"{name}_rel_err"] = _rel(y, y_ref)
                row[f"{name}_us"] = bench_graph(lambda: gemv_mod.w4a16_linear(x, *args))
            row[f"{name}_x"] = row["bf16_us"] / row[f"{name}_us"]
        except Exception as e:  # the PTX or a tile that does not compile
            row[f"{name}_error"] = str(e)[:300]
    return row


def _quick(fn) -> float:
    """``bench_graph`` with fewer repetitions (the sweep times ~150 configurations)."""
    return do_bench(_graph(fn).replay, warmup=5, rep=25, return_mode="median") * 1e3


def _time_config(m, x, args, y_today, y_ref, packed, tile=None) -> dict:
    """One sweep row: the configuration's time and errors, or the error it raised."""
    row: dict = {"M": m, "path": "packed" if packed else "today"}
    if packed:
        row["tile"] = list(tile if tile is not None else gemv_mod.TILES["packed"])
    t0 = time.perf_counter()
    try:
        with _config(packed, tile):
            y = gemv_mod.w4a16_linear(x, *args)
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - t0, 2)  # mostly compiling
            row["rel_err_ref"] = _rel(y, y_ref)
            if y_today is not None:
                row["rel_err_today"] = _rel(y, y_today)
            row["us"] = _quick(lambda: gemv_mod.w4a16_linear(x, *args))
    except Exception as e:  # a tile that does not compile (or run)
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
    return row


def sweep(m: int, layer: Layer) -> tuple[list[dict], dict]:
    """Every packed tile at ``m`` tokens and the path without the packed kernel:
    (rows, summary)."""
    x, args, y_ref = _case(m, layer)
    with _config(False):
        y_today = gemv_mod.w4a16_linear(x, *args)
    today = _time_config(m, x, args, None, y_ref, packed=False)
    today["kernel"] = "fma" if m <= gemv_mod.FMA_MAX_M else "mma"
    rows = [today]
    for tile in SWEEP_TILES:
        rows.append(_time_config(m, x, args, y_today, y_ref, True, tile))
    # a tile counts if it matches today's path as closely as the tests ask of the reference
    ok = [r for r in rows[1:] if "us" in r and r["rel_err_today"] <= 4e-3]
    summary: dict = {"M": m, "today": today["kernel"], "today_us": today.get("us")}
    if ok:
        best = min(ok, key=lambda r: r["us"])
        default = next(
            (r for r in ok if tuple(r["tile"]) == gemv_mod.TILES["packed"]), None
        )  # the default packed tile
        summary |= {
            "best_tile": best["tile"],
            "best_us": best["us"],
            "default_tile_us": default["us"] if default else None,
            "failed": sum("error" in r for r in rows),
        }
    return rows, summary


def _table(summaries: list[dict]) -> str:
    lines = [
        f"{'M':>3} {'today':>5} {'us':>7}   {'default pk':>10}   {'best tile':>14} {'us':>7}"
        f"   {'today/best':>10}"
    ]
    for s in summaries:
        if "best_us" not in s:
            lines.append(
                f"{s['M']:>3} {s['today']:>5} {s['today_us'] or 0:7.1f}   no packed tile ran"
            )
            continue
        lines.append(
            f"{s['M']:>3} {s['today']:>5} {s['today_us'] or 0:7.1f}   "
            f"{s['default_tile_us'] or 0:10.1f}   {tuple(s['best_tile'])!s:>14} "
            f"{s['best_us']:7.1f}   {(s['today_us'] or 0) / s['best_us']:10.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--sweep", action="store_true", help="the packed kernel's tiles")
    a = p.parse_args()
    torch.manual_seed(0)
    layer = Layer(N, K)
    if a.sweep:
        t0 = time.perf_counter()
        rows: list[dict] = []
        summaries: list[dict] = []
        for m in SWEEP_MS:
            r, s = sweep(m, layer)
            rows += r
            summaries.append(s)
            print(json.dumps(s), f"({time.perf_counter() - t0:.0f} s)", flush=True)
            result = {
                **run_info(),
                "tiles": dict(gemv_mod.TILES),
                "summary": summaries,
                "sweep": rows,
            }
            path = write_result(result, a.out, "probe_gemv_mma_sweep")
        print(_table(summaries))
        print(f"-> {path} ({time.perf_counter() - t0:.0f} s)")
        return
    rows = []
    for m in MS:
        rows.append(probe(m, layer))
        print(json.dumps({c: round(v, 4) if isinstance(v, float) else v
                          for c, v in rows[-1].items()}), flush=True)  # fmt: skip
    result = {
        **run_info(),
        "tiles": dict(gemv_mod.TILES),
        "rows": rows,
    }
    path = write_result(result, a.out, "probe_gemv_mma")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
