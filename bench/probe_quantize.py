"""Where the activation quantize kernel's time goes: variants that leave one stage out.

Times ``_quantize_act_kernel`` (CUDA-graph replays, M = 4608, K = 3072, rank 32) with the
low-rank branch on and off, its K-split partial sums added atomically or merely stored
(racy: a timing, not a result), int4 or fp8 activations, one to four groups per step,
over tiles, K splits and pipeline depths, so the differences say what each stage costs
(no hardware counters needed). For NOTES.md.

    PYTHONPATH=src python bench/probe_quantize.py [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch
import triton

from svdquant.kernels import quantize as qmod

sys.path.insert(0, str(Path(__file__).parent))
from gemm import copy_bandwidth, run_info, write_result

M, K, RANK = 4608, 3072, 32


def _graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median") * 1e3


def variant(
    x, smooth, down, scale, *, block_m, warps, split, lora, atomic, int4,
    block_k=64, stages=None, maxnreg=None, kernel=None,
) -> float:  # fmt: skip
    m, k = x.shape
    r = down.shape[0] if lora else 0
    steps = triton.cdiv(k, block_k)
    kps = triton.cdiv(steps, split) * block_k
    split = triton.cdiv(steps * block_k, kps)
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn, device="cuda")
    out = torch.zeros(m, max(r, 1), device="cuda")

    kernel = kernel or qmod._quantize_act_kernel

    def run():
        kernel[(triton.cdiv(m, block_m), split)](
            x, x, smooth, down, scale, xq, out, m, k, k, k, r, kps, x.stride(0), x.stride(0),
            xq.stride(0), down.stride(0), out.stride(0), INT4=int4, HAS_LORA=r > 0,
            ATOMIC=atomic, EXACT=False, TAIL_ACT=-1, SEAM_ALIGNED=False, ROUND_BF16=False,
            BLOCK_M=block_m, BLOCK_R=32, BLOCK_K=block_k, num_warps=warps,
            **({} if stages is None else {"num_stages": stages}),
            **({} if maxnreg is None else {"maxnreg": maxnreg}),
        )  # fmt: skip

    return _graph_us(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--long-only", action="store_true", help="only the pipelined long loops")
    p.add_argument(
        "--maxnreg",
        action="store_true",
        help="only today's tile under register caps (more programs per SM)",
    )
    p.add_argument(
        "--diet",
        metavar="OLD_QUANTIZE_PY",
        help="today's tile: this kernel against the kernel in OLD_QUANTIZE_PY (a quantize.py "
        "of an earlier commit whose imports today's modules still have; v26 also timed a "
        "register prefetch of the next step, dropped)",
    )
    a = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    smooth = torch.rand(K, device="cuda", generator=g) + 0.5
    down = (torch.randn(RANK, K, device="cuda", generator=g) / K**0.5).bfloat16()
    scale = torch.ones(1, device="cuda")
    nbytes = M * K * 3  # bf16 in, fp8 out
    copy_gbs = copy_bandwidth()  # the figure bench/gemm.py's "% of copy" uses
    rows = []

    def measure(**cfg) -> None:
        """Time one variant into ``rows`` (or the reason it does not compile)."""
        try:
            us = variant(x, smooth, down, scale, **cfg)
        except Exception as e:  # a tile that does not compile
            rows.append({**cfg, "error": str(e)[:100]})
            return
        rows.append({**cfg, "us": us, "pct_copy": 100 * nbytes / us / 1e3 / copy_gbs})

    kinds = (  # (lora, atomic, int4, block_k)
        (True, True, True, 128),
        (True, True, True, 256),
        (True, False, True, 128),  # partial sums stored, not added
        (False, False, True, 128),  # without the low-rank branch
        (False, False, True, 256),
        (True, True, False, 128),  # fp8 activations (W4A8)
    )
    if a.maxnreg:  # today's tile (64 x 128, 4 warps, 12 splits) capped at fewer registers
        for cap in (None, 128, 96, 80):
            for split in (12, 24):
                for lora in (True, False):
                    measure(block_m=64, warps=4, split=split, lora=lora, atomic=lora,
                            int4=True, block_k=128, stages=1, maxnreg=cap)  # fmt: skip
        for r in rows:
            print(f"  maxnreg={r['maxnreg']!s:4} split={r['split']:>2} lora={r['lora']!s:5}: "
                  + (f"{r['us']:6.1f} us {r['pct_copy']:4.0f}% of copy" if "us" in r
                     else r["error"]))  # fmt: skip
    if a.diet:
        spec = importlib.util.spec_from_file_location("quantize_old", a.diet)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        for split in (6, 8, 12, 16, 24):
            for name, kern in (("old", old._quantize_act_kernel), ("new", None)):
                for lora in (True, False):
                    measure(block_m=64, warps=4, split=split, lora=lora, atomic=lora,
                            int4=True, block_k=128, stages=1, kernel=kern)  # fmt: skip
                    rows[-1]["kernel"] = name
        for r in rows:
            print(f"  {r['kernel']:13} split={r['split']:>2} lora={r['lora']!s:5}: "
                  + (f"{r['us']:6.1f} us {r['pct_copy']:4.0f}% of copy" if "us" in r
                     else r["error"]))  # fmt: skip
    short = () if a.long_only or a.maxnreg or a.diet else (
        (32, 2), (32, 4), (64, 4), (64, 8), (128, 4), (128, 8)
    )  # fmt: skip
    if a.long_only:  # today's tile (the launcher's 64 x 128, 4 warps, ~7 programs/SM)
        for lora in (True, False):
            measure(block_m=64, warps=4, split=14, lora=lora, atomic=lora, int4=True,
                    block_k=128, stages=1)  # fmt: skip
    for block_m, warps in short:
        for split in (8, 12, 16):
            for lora, atomic, int4, block_k in kinds:
                for stages in (1, 2):
                    measure(block_m=block_m, warps=warps, split=split, lora=lora,
                            atomic=atomic, int4=int4, block_k=block_k, stages=stages)  # fmt: skip
    # Long loops that triton can pipeline (cp.async into shared memory with num_stages >= 2:
    # 187-194 registers with the low-rank branch, triton 3.6 sm_90): few splits, deep
    # pipelines, the layer's own kind (low-rank, atomics, int4) only.
    for block_m, warps in () if a.maxnreg or a.diet else ((32, 4), (64, 4), (64, 8), (128, 8)):
        for split in (1, 2, 4):
            for stages in (2, 3, 4):
                measure(block_m=block_m, warps=warps, split=split, lora=True, atomic=True,
                        int4=True, block_k=128, stages=stages)  # fmt: skip
    result = {**run_info(), "M": M, "K": K, "rank": RANK, "copy_gbs": copy_gbs, "rows": rows}
    print("->", write_result(result, a.out, "probe_quantize"))
    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    print(f"copy {copy_gbs:.0f} GB/s; fastest variants of each kind:")
    for kind in () if a.maxnreg or a.diet else (*kinds, ("long",)):
        if kind == ("long",):
            best = [r for r in ok if r["lora"] and r["stages"] > 1][:8]
        else:
            best = [r for r in ok if tuple(r[c] for c in KIND) == kind][:3]
        for r in best:
            print(
                f"  lora={r['lora']!s:5} atomic={r['atomic']!s:5} int4={r['int4']!s:5} "
                f"BK={r['block_k']:>3} "
                f"BM={r['block_m']:>3} w={r['warps']} split={r['split']:>2} "
                f"stages={r['stages']}: {r['us']:6.1f} us {r['pct_copy']:4.0f}% of copy"
            )


KIND = ("lora", "atomic", "int4", "block_k")


if __name__ == "__main__":
    main()
