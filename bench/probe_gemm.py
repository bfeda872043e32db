"""Our fp8 GEMM (+ low-rank + bias) in its variants against cuBLAS, at the issue's shapes.

For each M and (N, K) of ``bench/gemm.py`` (int4 weights widened, rank 32, bias), replayed
from CUDA graphs in one run: cuBLAS BF16 ``F.linear`` with bias, cuBLAS fp8 rowwise
``torch._scaled_mm``, and ``fp8_gemm`` with its operands read by pointer loads and
through tensor descriptors (``gemm.TMA_LOADS``) — each autotuned apart; then the GEMM
with no low-rank branch and no bias, and cuBLAS fp8 with its bias (where the time
goes). Checks that the variants agree; records the tile each chose and every tile's
autotune timing. For NOTES.md.

    PYTHONPATH=src python bench/probe_gemm.py [--ms 512,1024,4096,4608] [--out DIR]
    PYTHONPATH=src python bench/probe_gemm.py --toggle EARLY_LOWRANK  # a flag off vs on
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

from svdquant.kernels import gemm as gemm_mod
from svdquant.kernels import reference as ref
from svdquant.kernels.quantize import quantize_act
from svdquant.kernels.widen import widen_weight

VARIANTS = {"ptr": False, "tma": True}  # gemm.TMA_LOADS


def operands(m: int, n: int, k: int):
    """A layer of the shape and its GEMM's inputs: ``(x, layer, S, xq, lora, wq, s_ch)``."""
    x = torch.randn(m, k, device="cuda").bfloat16()
    layer = Layer(n, k)
    s = ref.act_scale_from_amax(layer.act_amax)
    kp = layer.qweight.shape[1] * 2
    xq, lora = quantize_act(x, layer.smooth, layer.down, s, kp, "int4")
    wq, s_ch = widen_weight(layer.qweight, layer.wscales, layer.wtensor_scale, layer.fmt)
    return x, layer, s, xq, lora, wq, s_ch


def probe(m: int, n: int, k: int) -> dict:
    x, layer, s, xq, lora, wq, s_ch = operands(m, n, k)
    row: dict = {"M": m, "N": n, "K": k}
    row["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    xf8, wf8 = x.to(torch.float8_e4m3fn), layer.w16.to(torch.float8_e4m3fn)
    sa, sb = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
    row["cublas_fp8_us"] = bench_graph(
        lambda: torch._scaled_mm(xf8, wf8.t(), sa, sb, out_dtype=torch.bfloat16)
    )
    outs = {}
    for name, tma in VARIANTS.items():
        gemm_mod.TMA_LOADS = tma
        try:

            def run():
                return gemm_mod.fp8_gemm(
                    xq, wq, s_ch, s, lora, layer.up, layer.bias, torch.bfloat16
                )

            outs[name] = run()
            row[f"{name}_config"] = str(gemm_mod._fp8_gemm_kernel.best_config)
            row[f"{name}_timings"] = {
                str(c): t
                for c, t in getattr(gemm_mod._fp8_gemm_kernel, "configs_timings", {}).items()
            }
            row[f"{name}_us"] = bench_graph(run)
            row[f"{name}_x"] = row["bf16_us"] / row[f"{name}_us"]
        finally:
            gemm_mod.TMA_LOADS = True
    a, b = outs["ptr"].float(), outs["tma"].float()
    row["rel_diff"] = ((a - b).norm() / b.norm()).item()
    # where the time goes (default loads): the epilogue's low-rank branch and bias off,
    # against cuBLAS fp8 with its bias fused
    row["tma_plain_us"] = bench_graph(
        lambda: gemm_mod.fp8_gemm(
            xq, wq, s_ch, s, lora[:, :0], layer.up[:, :0], None, torch.bfloat16
        )
    )
    try:
        row["cublas_fp8_bias_us"] = bench_graph(
            lambda: torch._scaled_mm(
                xf8, wf8.t(), sa, sb, bias=layer.bias, out_dtype=torch.bfloat16
            )
        )
    except RuntimeError as e:  # rowwise scaling with a bias needs a recent torch
        row["cublas_fp8_bias_error"] = str(e)[:200]
    return row


def whole_waves_rows(m: int, n: int, sms: int, bm: int = 128, bn: int = 256) -> int:
    """The rows of the whole waves of bm x bn tiles whose tile rows are complete (0: none)."""
    tiles_n = -(-n // bn)
    full = (-(-m // bm) * tiles_n) // sms * sms
    return full // tiles_n * bm


def row_split(m: int, n: int, k: int) -> dict:
    """One GEMM launch against two: the rows of the whole waves of 128 x 256 tiles, then
    the rest (autotuned on its own: smaller tiles spread it over the SMs)."""
    x, layer, s, xq, lora, wq, s_ch = operands(m, n, k)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    m1 = whole_waves_rows(m, n, sms)
    row: dict = {"M": m, "N": n, "K": k, "m1": m1}
    row["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))

    def gemm(lo, hi):
        return gemm_mod.fp8_gemm(
            xq[lo:hi], wq, s_ch, s, lora[lo:hi], layer.up, layer.bias, torch.bfloat16
        )

    one = gemm(0, m)
    row["one_us"] = bench_graph(lambda: gemm(0, m))
    if 0 < m1 < m:
        two = torch.cat([gemm(0, m1), gemm(m1, m)])
        row["rest_config"] = str(gemm_mod._fp8_gemm_kernel.best_config)
        row["two_us"] = bench_graph(lambda: (gemm(0, m1), gemm(m1, m)))
        row["first_us"] = bench_graph(lambda: gemm(0, m1))
        row["rest_us"] = bench_graph(lambda: gemm(m1, m))
        row["equal"] = bool(torch.equal(one, two))
    return row


def toggle(flag: str, m: int, n: int, k: int) -> dict:
    """GEMM + low-rank + bias with the module flag ``gemm.<flag>`` off and on, timed
    off/on/off/on in one process (each setting autotuned on its own)."""
    x, layer, s, xq, lora, wq, s_ch = operands(m, n, k)
    row: dict = {"M": m, "N": n, "K": k, "flag": flag}
    row["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))

    def run():
        return gemm_mod.fp8_gemm(xq, wq, s_ch, s, lora, layer.up, layer.bias, torch.bfloat16)

    default = getattr(gemm_mod, flag)
    outs = {}
    try:
        for i, on in enumerate((False, True, False, True)):
            setattr(gemm_mod, flag, on)
            name = "on" if on else "off"
            outs[name] = run()
            row[f"{name}_us_{i // 2}"] = bench_graph(run)
            row[f"{name}_config"] = str(gemm_mod._fp8_gemm_kernel.best_config)
    finally:
        setattr(gemm_mod, flag, default)
    a, b = outs["on"].float(), outs["off"].float()
    row["rel_diff"] = ((a - b).norm() / b.norm()).item()
    return row


def terms(m: int, n: int, k: int) -> dict:
    """The GEMM with each epilogue term on its own: neither, bias, low-rank, both — time
    and the tile each autotunes to (where the epilogue's cost goes)."""
    x, layer, s, xq, lora, wq, s_ch = operands(m, n, k)
    row: dict = {"M": m, "N": n, "K": k}
    row["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    cases = {
        "plain": (lora[:, :0], layer.up[:, :0], None),
        "bias": (lora[:, :0], layer.up[:, :0], layer.bias),
        "lowrank": (lora, layer.up, None),
        "both": (lora, layer.up, layer.bias),
    }
    for name, (la, lu, b) in cases.items():

        def run(la=la, lu=lu, b=b):
            return gemm_mod.fp8_gemm(xq, wq, s_ch, s, la, lu, b, torch.bfloat16)

        run()
        row[f"{name}_config"] = str(gemm_mod._fp8_gemm_kernel.best_config)
        row[f"{name}_us"] = bench_graph(run)
    return row


def autotune(m: int, n: int, k: int) -> dict:
    """The GEMM + low-rank + bias autotuned twice each way (``gemm.AUTOTUNE_GRAPH`` off:
    Triton's flushed-L2 launches; on: CUDA-graph replays), the cache cleared before each:
    the tile each picks and its time replayed from a graph."""
    x, layer, s, xq, lora, wq, s_ch = operands(m, n, k)
    row: dict = {"M": m, "N": n, "K": k}
    row["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))

    def run():
        return gemm_mod.fp8_gemm(xq, wq, s_ch, s, lora, layer.up, layer.bias, torch.bfloat16)

    default = gemm_mod.AUTOTUNE_GRAPH
    try:
        for i, on in enumerate((False, True, False, True)):
            gemm_mod.AUTOTUNE_GRAPH = on
            gemm_mod.clear_tuning()
            name = f"{'graph' if on else 'flush'}_{i // 2}"
            run()
            row[f"{name}_config"] = str(gemm_mod._fp8_gemm_kernel.best_config)
            row[f"{name}_us"] = bench_graph(run)
    finally:
        gemm_mod.AUTOTUNE_GRAPH = default
    return row


def _tile(config: str) -> str:
    """'128x256x128/8w/4s' from a Config's string."""
    v = dict(kv.split(": ") for kv in config.split(", "))
    return f"{v['BLOCK_M']}x{v['BLOCK_N']}x{v['BLOCK_K']}/{v['num_warps']}w/{v['num_stages']}s"


def _shape(r: dict) -> str:
    return f"{r['M']:5d} {r['N']:6d} {r['K']:6d} |"


def _line_default(r: dict) -> str:
    return (f"{_shape(r)} {r['bf16_us']:6.1f} {r['cublas_fp8_us']:6.1f} "
            f"{r.get('cublas_fp8_bias_us', float('nan')):6.1f} {r['ptr_us']:6.1f} "
            f"{r['tma_us']:6.1f} {r['tma_plain_us']:6.1f} | {r['ptr_x']:5.2f}  {r['tma_x']:5.2f}"
            f"  diff {r['rel_diff']:.1e}  tma: {r['tma_config'][:60]}")  # fmt: skip


def _line_row_split(r: dict) -> str:
    two = (f"{r['two_us']:7.1f} ({r['first_us']:.1f}+{r['rest_us']:.1f}) "
           f"{r['one_us'] / r['two_us']:.3f}x eq={r['equal']} {r['rest_config'][:50]}"
           if "two_us" in r else "")  # fmt: skip
    return f"{_shape(r)} {r['m1']:5d} {r['bf16_us']:7.1f} {r['one_us']:7.1f} {two}"


def _line_toggle(r: dict) -> str:
    off, on = min(r["off_us_0"], r["off_us_1"]), min(r["on_us_0"], r["on_us_1"])
    return (f"{_shape(r)} {r['bf16_us']:7.1f} {r['off_us_0']:6.1f} {r['off_us_1']:6.1f} "
            f"{r['on_us_0']:6.1f} {r['on_us_1']:6.1f} | {off / on:.3f}x "
            f"diff {r['rel_diff']:.1e}")  # fmt: skip


def _line_terms(r: dict) -> str:
    cfg = " / ".join(r[f"{c}_config"][:38] for c in ("plain", "both"))
    return (f"{_shape(r)} {r['bf16_us']:7.1f} {r['plain_us']:6.1f} {r['bias_us']:6.1f} "
            f"{r['lowrank_us']:6.1f} {r['both_us']:6.1f} | {cfg}")  # fmt: skip


def _line_autotune(r: dict) -> str:
    cells = "  ".join(f"{r[c + '_us']:6.1f} {_tile(r[c + '_config'])}"
                      for c in ("flush_0", "flush_1", "graph_0", "graph_1"))  # fmt: skip
    return f"{_shape(r)} {r['bf16_us']:7.1f}  {cells}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default=",".join(str(m) for m in MS))
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--row-split",
        action="store_true",
        help="one launch against two (the whole waves' rows, then the rest)",
    )
    mode.add_argument("--toggle", metavar="FLAG", help="a gemm module flag, off against on")
    mode.add_argument("--terms", action="store_true", help="each epilogue term on its own")
    mode.add_argument("--autotune", action="store_true", help="autotune timing: flushed vs graph")
    args = p.parse_args()
    shape = f"{'M':>5} {'N':>6} {'K':>6} |"
    if args.row_split:
        fn, line, name = row_split, _line_row_split, "probe_gemm_rowsplit"
        head = f"{shape}    m1 bf16 us  one us  two us (first+rest)"
    elif args.toggle:
        fn, line = (lambda m, n, k: toggle(args.toggle, m, n, k)), _line_toggle
        name = f"probe_gemm_{args.toggle.lower()}"
        head = f"{shape} bf16 us  off (x2)  on (x2) | on/off  ({args.toggle})"
    elif args.terms:
        fn, line, name = terms, _line_terms, "probe_gemm_terms"
        head = f"{shape} bf16 us  plain   bias lowrank  both | configs"
    elif args.autotune:
        fn, line, name = autotune, _line_autotune, "probe_gemm_autotune"
        head = f"{shape} bf16 us  flush x2 (tile)  graph x2 (tile)"
    else:
        fn, line, name = probe, _line_default, "probe_gemm"
        head = (f"{shape} {'bf16':>6} {'fp8':>6} {'fp8+b':>6} {'ptr':>6} {'tma':>6} "
                f"{'plain':>6} | ptr x  tma x")  # fmt: skip
    result = {**run_info(), "rows": []}
    print(head)
    for m in (int(v) for v in args.ms.split(",")):
        for n, k in NKS:
            result["rows"].append(fn(m, n, k))
            print(line(result["rows"][-1]), flush=True)
    print("->", write_result(result, args.out, name))


if __name__ == "__main__":
    main()
