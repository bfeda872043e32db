"""Where the activation quantize kernel's time goes: variants that leave one stage out.

Times ``_quantize_act_kernel`` (CUDA-graph replays, M = 4608, K = 3072, rank 32) with the
low-rank branch on and off, with its K-split partial sums added atomically or merely
stored (racy: a timing, not a result), in int4 and fp8, over tiles and K splits, so the
differences say what each stage costs (no hardware counters needed). For NOTES.md.

    PYTHONPATH=src python bench/probe_quantize.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton

from svdquant.kernels import quantize as qmod

M, K, RANK = 4608, 3072, 32


def _graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median") * 1e3


def variant(x, smooth, down, scale, *, block_m, warps, split, lora, atomic, int4) -> float:
    m, k = x.shape
    r = down.shape[0] if lora else 0
    groups = triton.cdiv(k, 64)
    kps = triton.cdiv(groups, split) * 64
    split = triton.cdiv(groups * 64, kps)
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn, device="cuda")
    out = torch.zeros(m, max(r, 1), device="cuda")

    def run():
        qmod._quantize_act_kernel[(triton.cdiv(m, block_m), split)](
            x, smooth, down, scale, xq, out, m, k, k, r, kps, x.stride(0), xq.stride(0),
            down.stride(0), out.stride(0), INT4=int4, HAS_LORA=r > 0, ATOMIC=atomic,
            DOT_FP32=False, LORA_FP32=False, FP32_PREC="tf32x3", EXACT=False,
            BLOCK_M=block_m, BLOCK_R=32, num_warps=warps,
        )  # fmt: skip

    return _graph_us(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    smooth = torch.rand(K, device="cuda", generator=g) + 0.5
    down = (torch.randn(RANK, K, device="cuda", generator=g) / K**0.5).bfloat16()
    scale = torch.ones(1, device="cuda")
    nbytes = M * K * 3  # bf16 in, fp8 out
    copy = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")
    copy2 = torch.empty_like(copy)
    copy_gbs = 4 * copy.numel() / _graph_us(lambda: copy2.copy_(copy)) / 1e3
    rows = []
    for block_m, warps in ((16, 4), (32, 4), (64, 4), (64, 8), (128, 8)):
        for split in (1, 2, 4, 8, 16):
            for lora, atomic, int4 in (
                (True, True, True),
                (True, False, True),
                (False, False, True),
                (True, True, False),
                (False, False, False),
            ):
                cfg = {"block_m": block_m, "warps": warps, "split": split}
                cfg |= {"lora": lora, "atomic": atomic, "int4": int4}
                try:
                    us = variant(x, smooth, down, scale, **cfg)
                except Exception as e:  # a tile that does not compile
                    rows.append({**cfg, "error": str(e)[:100]})
                    continue
                rows.append({**cfg, "us": us, "pct_copy": 100 * nbytes / us / 1e3 / copy_gbs})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "M": M, "K": K, "rank": RANK,
              "copy_gbs": copy_gbs, "rows": rows}  # fmt: skip
    (out / "probe_quantize.json").write_text(json.dumps(result, indent=1))
    ok = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
    print(f"copy {copy_gbs:.0f} GB/s; fastest variants of each kind:")
    for kind in ((True, True, True), (True, False, True), (False, False, True),
                 (True, True, False), (False, False, False)):  # fmt: skip
        best = [r for r in ok if (r["lora"], r["atomic"], r["int4"]) == kind][:3]
        for r in best:
            print(f"  lora={r['lora']!s:5} atomic={r['atomic']!s:5} int4={r['int4']!s:5} "
                  f"BM={r['block_m']:>3} w={r['warps']} split={r['split']:>2}: "
                  f"{r['us']:6.1f} us {r['pct_copy']:4.0f}% of copy")  # fmt: skip


if __name__ == "__main__":
    main()
