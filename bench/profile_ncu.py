"""Hardware counters of the engine's kernels, one launch each, under Nsight Compute.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section SchedulerStats \\
        --section WarpStateStats --section LaunchStats \\
        python bench/profile_ncu.py [--only gemv,quantize,...]

Everything is compiled and run once first (autotuning, JIT) outside the profiled range;
then each kernel of a FLUX.1 layer shape runs once between ``cudaProfilerStart`` and
``cudaProfilerStop``, so ncu sees exactly those launches: the W4A16 GEMV at M = 1 and 4
(N = 18432, K = 3072, rank 32, bias) with its x̂ prep kernel (and the Gluon one at 4 and
16 tokens, ``gemv_gluon``), the activation quantize
(M = 4608, K = 3072, rank 32; and the Gluon one, ``quantize_ws``), the widen
(N = K = 3072) and the fp8 GEMM + low-rank + bias (M = 4608, N = K = 3072), the fused
MLP's fc1 (quantize-next epilogue), and the warp-specialized Gluon GEMM (``gemm_ws``, with
and without the low-rank branch; the fc1 writing 16 bits and writing the next layer's
codes: ``gemm_ws_fc1``, ``gemm_ws_next``).
For NOTES.md: what limits each kernel (issue slots, memory pipes, stalls), not its time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemm import Layer

from svdquant.kernels import reference as ref
from svdquant.kernels.gemm import fp8_gemm, fp8_gemm_quantize_next, next_layer_input
from svdquant.kernels.gemm_ws import fp8_gemm_ws, fp8_gemm_ws_next
from svdquant.kernels.gemv import w4a16_linear
from svdquant.kernels.quantize import quantize_act
from svdquant.kernels.quantize_ws import quantize_act_ws
from svdquant.kernels.widen import widen_weight


def _gluon(fn):
    """``fn()`` with the Gluon GEMV on from one token."""
    from svdquant.kernels import gemv

    saved = gemv.GLUON, gemv.GLUON_MIN_M
    gemv.GLUON, gemv.GLUON_MIN_M = True, 1
    try:
        return fn()
    finally:
        gemv.GLUON, gemv.GLUON_MIN_M = saved


def cases() -> dict:
    """name -> a function running that case's kernels once."""
    torch.manual_seed(0)
    big = Layer(18432, 3072)
    sq = Layer(3072, 3072)
    fc1, fc2 = Layer(12288, 3072, seed=1), Layer(3072, 12288, seed=2)
    x1 = torch.randn(1, 3072, device="cuda").bfloat16()
    x4 = torch.randn(4, 3072, device="cuda").bfloat16()
    x16 = torch.randn(16, 3072, device="cuda").bfloat16()
    xm = torch.randn(4608, 3072, device="cuda").bfloat16()
    s = ref.act_scale_from_amax(sq.act_amax)
    g = (big.qweight, big.wscales, big.wtensor_scale, big.smooth, big.down, big.up, big.bias)
    wargs = (sq.qweight, sq.wscales, sq.wtensor_scale, sq.fmt)
    xq, lora = quantize_act(xm, sq.smooth, sq.down, s, 3072, "int4")
    wq, s_ch = widen_weight(*wargs)
    w1, c1 = widen_weight(fc1.qweight, fc1.wscales, fc1.wtensor_scale, fc1.fmt)
    s2 = ref.act_scale_from_amax(fc2.act_amax)
    mlp = (xq, w1, c1, s, lora, fc1.up, fc1.bias, torch.bfloat16, "gelu_tanh")
    mlp += (fc2.smooth, fc2.down, s2, 12288, "int4")
    return {
        "gemv": lambda: (w4a16_linear(x1, *g, "int4"), w4a16_linear(x4, *g, "int4")),
        # the Gluon tensor-core GEMV (``gemv.GLUON``) at 4 and 16 tokens
        "gemv_gluon": lambda: _gluon(
            lambda: (w4a16_linear(x4, *g, "int4"), w4a16_linear(x16, *g, "int4"))
        ),
        "quantize": lambda: quantize_act(xm, sq.smooth, sq.down, s, 3072, "int4"),
        "quantize_nolr": lambda: quantize_act(xm, sq.smooth, sq.down[:0], s, 3072, "int4"),
        # the Gluon quantize (``quantize_ws``, off by default) on the same input
        "quantize_ws": lambda: quantize_act_ws(xm, sq.smooth, sq.down, s, 3072, "int4"),
        "quantize_ws_nolr": lambda: quantize_act_ws(xm, sq.smooth, sq.down[:0], s, 3072, "int4"),
        "widen": lambda: widen_weight(*wargs),
        "gemm": lambda: fp8_gemm(xq, wq, s_ch, s, lora, sq.up, sq.bias, torch.bfloat16),
        "mlp_fc1": lambda: fp8_gemm_quantize_next(*mlp),
        "gemm_ws": lambda: fp8_gemm_ws(xq, wq, s_ch, s, lora, sq.up, sq.bias, torch.bfloat16),
        "gemm_ws_nolr": lambda: fp8_gemm_ws(
            xq, wq, s_ch, s, lora[:, :0], sq.up[:, :0], sq.bias, torch.bfloat16
        ),
        # the fused MLP's fc1 on gemm_ws: its 16-bit output, and the next layer's codes
        "gemm_ws_fc1": lambda: fp8_gemm_ws(*mlp[:8]),
        "gemm_ws_next": lambda: fp8_gemm_ws_next(
            *mlp[:8], next_layer_input(4608, 12288, xm.device, *mlp[8:])[2]
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args()
    todo = cases()
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    for fn in todo.values():  # compile, autotune
        fn()
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in todo.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(todo))


if __name__ == "__main__":
    main()
