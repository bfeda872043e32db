"""Benchmark the fp8 engine's kernels against cuBLAS on FLUX.1 layer shapes (one GPU).

    PYTHONPATH=src python bench/gemm.py [--out DIR] [--quick] [--sweep] [--ms 1024,4096]
        [--shapes 3840x1280,10240x1280]   # other (N, K) than the issue's: e.g. SDXL's

Per (M, N, K): cuBLAS BF16 ``F.linear`` with bias; cuBLAS fp8 rowwise
``torch._scaled_mm`` (no bias); our quantize alone (GB/s, % of the measured copy
bandwidth); widen alone; GEMM + low-rank + bias alone (whole tiles, and with the split-K
tail forced on: ``gemm.TAIL_SPLIT``); the full layer (quantize + widen + GEMM, the
default tail policy) with and without the low-rank branch, eagerly and replayed from a
CUDA graph (no launch overhead), and replayed with the widened weight kept (``keptG``:
``svdquant.keep_fp8_weights``, quantize + GEMM). Then the MLP pair (fc1 3072->12288,
GELU-tanh, fc2 12288->3072), unfused and fused (fc1's epilogue writes fc2's quantized
input), and the W4A16 GEMV. Times are medians of ``triton.testing.do_bench``; ratios are
BF16 time / our time (> 1: faster). Writes ``gemm-<date>.json`` under ``--out`` (default
``bench/results``, or ``$OUT`` when set) and prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from svdquant import formats
from svdquant.kernels import gemm as gemm_mod
from svdquant.kernels import gemm_ws
from svdquant.kernels import gemv as gemv_mod
from svdquant.kernels import ops as ops_mod
from svdquant.kernels import quantize as quantize_mod
from svdquant.kernels import reference as ref
from svdquant.kernels import widen as widen_mod
from svdquant.kernels.gemm import fp8_gemm
from svdquant.kernels.gemv import w4a16_linear
from svdquant.kernels.ops import svdq_linear_triton, svdq_mlp_triton
from svdquant.kernels.quantize import quantize_act
from svdquant.kernels.widen import widen_weight

MS = (512, 1024, 4096, 4608)
NKS = ((3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360))
RANK = 32


def bench(fn) -> float:
    """Median time of ``fn()`` in microseconds."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def _graph(fn) -> torch.cuda.CUDAGraph:
    fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def bench_graph(fn) -> float:
    """Median time of ``fn()`` replayed from a CUDA graph (no launch overhead), in µs.

    ``do_bench`` empties the L2 before each run by *writing* 256 MB, so the run starts
    with the L2 full of dirty lines whose write-back shares DRAM with it: a few µs that
    weigh on the short memory-bound kernels (see ``bench_graph_clean``)."""
    return bench(_graph(fn).replay)


_SWEEP: torch.Tensor | None = None


def bench_graph_clean(fn, reps: int = 200) -> float:
    """Like ``bench_graph``, but the L2 is emptied by *reading* 512 MB before each run:
    cold and clean, nothing to write back — the kernel's own time, as Nsight Compute
    measures it (it flushes and invalidates the caches). Median µs."""
    global _SWEEP
    if _SWEEP is None:
        _SWEEP = torch.ones(2**27, device="cuda")
    g = _graph(fn)
    for _ in range(10):
        g.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]  # fmt: skip
    for start, end in ev:
        _SWEEP.sum()
        start.record()
        g.replay()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in ev)[reps // 2] * 1e3


def copy_bandwidth() -> float:
    """Device copy bandwidth (read + write) in GB/s, on a 1 GiB buffer."""
    a = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    us = bench(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / us / 1e3


class Layer:
    """A random 4-bit layer (int4 weights) in the engine's stored format."""

    def __init__(
        self, n: int, k: int, fmt: str = "int4", seed: int = 0, device: str = "cuda"
    ) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        w = torch.randn(n, k, device=device, generator=g) * 0.02
        self.w16 = w.bfloat16()
        q = formats.quantize(w, fmt)
        self.qweight, self.wscales, self.wtensor_scale = q.packed, q.scales, q.tensor_scale
        self.smooth = torch.rand(k, device=device, generator=g) + 0.5
        self.act_amax = torch.tensor(8.0, device=device)
        self.down = (torch.randn(RANK, k, device=device, generator=g) / k**0.5).bfloat16()
        self.up = (torch.randn(n, RANK, device=device, generator=g) * 0.02).bfloat16()
        self.bias = torch.randn(n, device=device, generator=g).bfloat16()
        self.fmt, self.act_fmt = fmt, "int4"
        self.in_features, self.out_features = k, n
        self.lowrank_down, self.lowrank_up = self.down, self.up  # SVDQLinear's names
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def fp8_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The widened weight kept for the fused paths (``SVDQLinear.fp8_weights``)."""
        return self.kept

    def keep_fp8_weights(self) -> None:
        """Widen once and keep it (``SVDQLinear.keep_fp8_weights``)."""
        self.kept = widen_weight(self.qweight, self.wscales, self.wtensor_scale, self.fmt)

    def __call__(self, x: torch.Tensor, act_fmt: str = "int4", lowrank: bool = True,
                 kept: tuple[torch.Tensor, torch.Tensor] | None = None):  # fmt: skip
        """The layer; ``kept``: its widened weight kept (``keep_fp8_weights``): no widen."""
        down = self.down if lowrank else self.down[:0]
        up = self.up if lowrank else self.up[:, :0]
        return svdq_linear_triton(
            x, self.qweight, self.wscales, self.wtensor_scale, self.smooth, self.act_amax,
            down, up, self.bias, self.fmt, act_fmt, kept,
        )  # fmt: skip

    def w4a16(self, x: torch.Tensor, lowrank: bool = True) -> torch.Tensor:
        """The layer on its W4A16 path (16-bit activations: ``w4a16_linear``)."""
        down = self.down if lowrank else self.down[:0]
        up = self.up if lowrank else self.up[:, :0]
        w = (self.qweight, self.wscales, self.wtensor_scale, self.smooth)
        return w4a16_linear(x, *w, down, up, self.bias, self.fmt)


def bench_shape(m: int, n: int, k: int, copy_gbs: float) -> dict:
    x = torch.randn(m, k, device="cuda").bfloat16()
    layer = Layer(n, k)
    s = ref.act_scale_from_amax(layer.act_amax)
    kp = layer.qweight.shape[1] * 2
    flop = 2 * m * n * k
    row: dict = {"M": m, "N": n, "K": k}

    row["bf16_us"] = bench(lambda: F.linear(x, layer.w16, layer.bias))
    row["bf16_graph_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    xf8 = x.to(torch.float8_e4m3fn)
    wf8 = layer.w16.to(torch.float8_e4m3fn)
    sa = torch.ones(m, 1, device="cuda")
    sb = torch.ones(1, n, device="cuda")
    try:
        row["cublas_fp8_us"] = bench(
            lambda: torch._scaled_mm(xf8, wf8.t(), sa, sb, out_dtype=torch.bfloat16)
        )
    except RuntimeError as e:  # rowwise scaling needs a recent torch + Hopper
        row["cublas_fp8_us"], row["cublas_fp8_error"] = None, str(e)[:200]

    row["quantize_us"] = bench(lambda: quantize_act(x, layer.smooth, layer.down, s, kp, "int4"))
    # A fast kernel finishes before Python launches the next one: its eager time is the
    # launch; the CUDA-graph replay is the GPU's time, the one that % of copy reads.
    row["quantize_graph_us"] = bench_graph(
        lambda: quantize_act(x, layer.smooth, layer.down, s, kp, "int4")
    )
    row["quantize_nolr_graph_us"] = bench_graph(
        lambda: quantize_act(x, layer.smooth, layer.down[:0], s, kp, "int4")
    )
    q_bytes = m * k * 2 + m * kp + m * RANK * 4 + RANK * k * 2
    row["quantize_gbs"] = q_bytes / row["quantize_graph_us"] / 1e3
    row["quantize_pct_copy"] = 100 * row["quantize_gbs"] / copy_gbs
    row["quantize_clean_us"] = bench_graph_clean(
        lambda: quantize_act(x, layer.smooth, layer.down, s, kp, "int4")
    )
    row["quantize_clean_pct_copy"] = 100 * q_bytes / row["quantize_clean_us"] / 1e3 / copy_gbs
    row["quantize_fp8_us"] = bench(lambda: quantize_act(x, layer.smooth, layer.down, s, kp, "fp8"))
    row["quantize_nolr_us"] = bench(
        lambda: quantize_act(x, layer.smooth, layer.down[:0], s, kp, "int4")
    )

    args = (layer.qweight, layer.wscales, layer.wtensor_scale, layer.fmt)
    row["widen_us"] = bench(lambda: widen_weight(*args))
    row["widen_graph_us"] = bench_graph(lambda: widen_weight(*args))
    w_bytes = n * kp // 2 + layer.wscales.numel() * 2 + n * kp + n * 4
    row["widen_gbs"] = w_bytes / row["widen_graph_us"] / 1e3
    row["widen_pct_copy"] = 100 * row["widen_gbs"] / copy_gbs
    row["widen_clean_us"] = bench_graph_clean(lambda: widen_weight(*args))
    row["widen_clean_pct_copy"] = 100 * w_bytes / row["widen_clean_us"] / 1e3 / copy_gbs

    xq, lora = quantize_act(x, layer.smooth, layer.down, s, kp, "int4")
    wq, s_ch = widen_weight(*args)
    # GEMM columns: whole tiles, then the split-K tail forced on; the layers: the default
    gemm_mod.TAIL_SPLIT = False
    try:
        # which kernel the GEMM columns time (``fp8_gemm`` hands large shapes to gemm_ws)
        ws = gemm_mod._ws_wanted(xq, wq, lora, layer.up, torch.bfloat16)
        row["gemm_kernel"] = "gemm_ws" if ws else "triton"
        row["gemm_us"] = bench(
            lambda: fp8_gemm(xq, wq, s_ch, s, lora, layer.up, layer.bias, torch.bfloat16)
        )
        row["gemm_nolr_us"] = bench(
            lambda: fp8_gemm(xq, wq, s_ch, s, lora[:, :0], layer.up[:, :0], layer.bias, x.dtype)
        )
        row["gemm_graph_us"] = bench_graph(
            lambda: fp8_gemm(xq, wq, s_ch, s, lora, layer.up, layer.bias, torch.bfloat16)
        )
        # the low-rank branch's share of the GEMM, replayed (eagerly the small GEMMs time
        # the host: v45's 3072² rows)
        row["gemm_nolr_graph_us"] = bench_graph(
            lambda: fp8_gemm(xq, wq, s_ch, s, lora[:, :0], layer.up[:, :0], layer.bias, x.dtype)
        )
        gemm_mod.TAIL_SPLIT = True
        row["gemm_tail_graph_us"] = bench_graph(
            lambda: fp8_gemm(xq, wq, s_ch, s, lora, layer.up, layer.bias, torch.bfloat16)
        )
    finally:
        gemm_mod.TAIL_SPLIT = None
    row["layer_us"] = bench(lambda: layer(x))
    row["layer_nolr_us"] = bench(lambda: layer(x, lowrank=False))
    row["layer_w4a8_us"] = bench(lambda: layer(x, act_fmt="fp8"))
    row["layer_graph_us"] = bench_graph(lambda: layer(x))
    row["layer_nolr_graph_us"] = bench_graph(lambda: layer(x, lowrank=False))
    # the layer with its widened weight kept (svdquant.keep_fp8_weights): quantize + GEMM
    row["layer_kept_graph_us"] = bench_graph(lambda: layer(x, kept=(wq, s_ch)))
    ops_mod.OVERLAP_WIDEN = False  # the quantize and the widen one after the other, no overlap
    try:
        row["layer_seq_graph_us"] = bench_graph(lambda: layer(x))
    finally:
        ops_mod.OVERLAP_WIDEN = True
    for key in [c for c in row if c.endswith("_us") and row[c]]:
        row[key.replace("_us", "_tflops")] = flop / row[key] / 1e6
        base = row["bf16_graph_us"] if "graph" in key else row["bf16_us"]
        row[key.replace("_us", "_x")] = base / row[key]
    # what the low-rank branch adds (the issue: <= 8%), to the GEMM and to the whole layer
    row["lowrank_gemm_pct"] = 100 * (row["gemm_graph_us"] / row["gemm_nolr_graph_us"] - 1)
    row["lowrank_layer_pct"] = 100 * (row["layer_graph_us"] / row["layer_nolr_graph_us"] - 1)
    return row


def bench_lora_ranks(m: int, n: int, k: int) -> list[dict]:
    """The extra rank a loaded LoRA adds to the low-rank branch: the whole layer (CUDA
    graph) at growing ranks, against rank 0 and the base rank 32 (issue 5)."""
    x = torch.randn(m, k, device="cuda").bfloat16()
    layer = Layer(n, k)
    g = torch.Generator(device="cuda").manual_seed(7)
    rows = []
    bf16 = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    for r in (0, 16, 32, 36, 40, 48, 64, 96, 128, 160, 256):  # 36, 40: rank-4 / 8 LoRAs
        layer.down = (torch.randn(r, k, device="cuda", generator=g) / k**0.5).bfloat16()
        layer.up = (torch.randn(n, r, device="cuda", generator=g) * 0.02).bfloat16()
        try:
            us = bench_graph(lambda: layer(x))
        except Exception as e:  # a rank the kernels cannot take (registers, shared memory)
            rows.append({"M": m, "N": n, "K": k, "rank": r, "error": str(e)[:200]})
            continue
        rows.append({"M": m, "N": n, "K": k, "rank": r, "layer_graph_us": us})
        rows[-1]["bf16_graph_us"] = bf16
    timed = {r["rank"]: r["layer_graph_us"] for r in rows if "layer_graph_us" in r}
    base = timed.get(32)
    for r in rows:
        if base and "layer_graph_us" in r:
            r["vs_rank32"] = r["layer_graph_us"] / base
            r["x_bf16"] = bf16 / r["layer_graph_us"]
    return rows


def mlp_bf16(x: torch.Tensor, fc1: Layer, fc2: Layer) -> torch.Tensor:
    """The MLP pair in BF16: ``F.linear`` + GELU-tanh + ``F.linear`` (the baseline)."""
    h = F.gelu(F.linear(x, fc1.w16, fc1.bias), approximate="tanh")
    return F.linear(h, fc2.w16, fc2.bias)


def bench_mlp(m: int) -> dict:
    """fc1 3072->12288, GELU-tanh, fc2 12288->3072: BF16 vs the engine (unfused)."""
    fc1, fc2 = Layer(12288, 3072, seed=1), Layer(3072, 12288, seed=2)
    x = torch.randn(m, 3072, device="cuda").bfloat16()

    def bf16():
        return mlp_bf16(x, fc1, fc2)

    def ours(act_fmt: str = "int4"):
        return fc2(F.gelu(fc1(x, act_fmt), approximate="tanh"), act_fmt)

    def fused(act_fmt: str = "int4"):
        fc1.act_fmt = fc2.act_fmt = act_fmt
        return svdq_mlp_triton(x, fc1, fc2)

    row = {"M": m, "bf16_us": bench(bf16), "ours_us": bench(ours)}
    row["fused_us"] = bench(fused)
    row["fused_w4a8_us"] = bench(lambda: fused("fp8"))
    row["fused_graph_us"] = bench_graph(fused)
    row["fused_w4a8_graph_us"] = bench_graph(lambda: fused("fp8"))
    fc1.keep_fp8_weights()  # the pair with both widened weights kept (keep_fp8_weights)
    fc2.keep_fp8_weights()
    try:
        row["fused_kept_graph_us"] = bench_graph(fused)
    finally:
        fc1.kept = fc2.kept = None
    if gemm_ws.available(x.device):  # fc1's epilogue on the warp-specialized GEMM (v45)
        gemm_mod.WS_NEXT = True
        try:
            row["fused_ws_graph_us"] = bench_graph(fused)
        finally:
            gemm_mod.WS_NEXT = False
    row["ours_w4a8_us"] = bench(lambda: ours("fp8"))
    row["bf16_graph_us"] = bench_graph(bf16)
    row["ours_graph_us"] = bench_graph(ours)
    row["ours_w4a8_graph_us"] = bench_graph(lambda: ours("fp8"))
    row["x"] = row["bf16_us"] / row["ours_us"]
    row["graph_x"] = row["bf16_graph_us"] / row["ours_graph_us"]
    row["fused_x"] = row["bf16_us"] / row["fused_us"]
    row["fused_graph_x"] = row["bf16_graph_us"] / row["fused_graph_us"]
    row["fused_w4a8_graph_x"] = row["bf16_graph_us"] / row["fused_w4a8_graph_us"]
    row["fused_kept_graph_x"] = row["bf16_graph_us"] / row["fused_kept_graph_us"]
    if "fused_ws_graph_us" in row:
        row["fused_ws_graph_x"] = row["bf16_graph_us"] / row["fused_ws_graph_us"]
    return row


def bench_gemv(m: int, n: int, k: int, copy_gbs: float) -> dict:
    layer = Layer(n, k)
    x = torch.randn(m, k, device="cuda").bfloat16()
    row = {"M": m, "N": n, "K": k, "bf16_us": bench(lambda: F.linear(x, layer.w16, layer.bias))}
    row["gemv_us"] = bench(lambda: layer.w4a16(x))
    row["gemv_nolr_us"] = bench(lambda: layer.w4a16(x, lowrank=False))
    row["gemv_graph_us"] = bench_graph(lambda: layer.w4a16(x))
    read = n * k // 2 + layer.wscales.numel() * 2
    row["gemv_nolr_gbs"] = read / row["gemv_nolr_us"] / 1e3
    row["gemv_nolr_pct_copy"] = 100 * row["gemv_nolr_gbs"] / copy_gbs
    row["x"] = row["bf16_us"] / row["gemv_us"]
    row["nolr_x"] = row["bf16_us"] / row["gemv_nolr_us"]
    row["bf16_graph_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    row["graph_x"] = row["bf16_graph_us"] / row["gemv_graph_us"]
    # the L2 emptied by reading (``bench_graph_clean``): both sides' own time
    row["gemv_clean_us"] = bench_graph_clean(lambda: layer.w4a16(x))
    row["bf16_clean_us"] = bench_graph_clean(lambda: F.linear(x, layer.w16, layer.bias))
    row["clean_x"] = row["bf16_clean_us"] / row["gemv_clean_us"]
    return row


def _timed(fn, nbytes: float, copy_gbs: float, graph: bool = False) -> dict:
    try:
        us = (bench_graph if graph else bench)(fn)
    except Exception as e:  # a tile that does not compile or fit
        return {"error": str(e)[:120]}
    return {"us": us, "pct_copy": 100 * nbytes / us / 1e3 / copy_gbs}


def sweep(copy_gbs: float, parts: str = "quantize,widen,gemv") -> dict:
    """Time the memory-bound kernels (``parts`` of them) over tile shapes (M = 4608 and,
    for the quantize, 512; N = 12288, K = 3072; the GEMV at N = 18432) and keep the best
    tiles for the run."""
    out: dict = {"quantize": [], "widen": [], "gemv": []}
    m, n, k = 4608, 12288, 3072
    layer = Layer(n, k)
    x = torch.randn(m, k, device="cuda").bfloat16()
    s = ref.act_scale_from_amax(layer.act_amax)
    # quantize: (BLOCK_M, columns per step, warps) at M = 4608 ("large", also over the
    # programs per SM its K split aims for) and at M = 512 ("medium": the text stream)
    default_per_sm, default_q = quantize_mod.PROGRAMS_PER_SM, dict(quantize_mod.TILES)
    q_tiles = [(a, bk, w) for a in (32, 64, 128) for bk in (64, 128) for w in (2, 4, 8)]
    q_runs = ((4608, "large", (4, 7, 12)), (512, "medium", (default_per_sm,)))
    for mq, key, per_sms in q_runs * ("quantize" in parts):
        xm = x[:mq]
        for tile, per_sm in itertools.product(q_tiles, per_sms):
            quantize_mod.TILES[key], quantize_mod.PROGRAMS_PER_SM = tile, per_sm
            fn = lambda xm=xm: quantize_act(xm, layer.smooth, layer.down, s, k, "int4")  # noqa: E731
            timed = _timed(fn, mq * k * 3, copy_gbs, True)
            out["quantize"].append({"M": mq, "path": key, "tile": (*tile, per_sm), **timed})
    quantize_mod.PROGRAMS_PER_SM = default_per_sm
    quantize_mod.TILES.update(default_q)
    args = (layer.qweight, layer.wscales, layer.wtensor_scale, "int4")
    widen_tiles = [(a, b, w) for a in (16, 32, 64) for b in (256, 512, 1024) for w in (4, 8)]
    for tile in widen_tiles * ("widen" in parts):
        widen_mod.TILE = tile
        timed = _timed(lambda: widen_weight(*args), n * k * 1.5, copy_gbs, True)
        out["widen"].append({"tile": tile, **timed})
    g = Layer(18432, 3072)
    # the modulation layers' case: rank 32 and a bias (the low-rank epilogue's share grows
    # with the programs: v24 chose 2-row tiles without it, slower with it)
    gargs = (g.qweight, g.wscales, g.wtensor_scale, g.smooth, g.down, g.up, g.bias)
    # FMA kernel: rows over threads (small steps) or every row in each thread (BLOCK_K =
    # 1024 · warps: x̂ loaded once per step for all rows)
    fma_tiles = [(a, b, w) for a in (1, 2, 4, 8, 16) for b in (256, 1024, 2048) for w in (1, 2, 4)]
    # the tensor-core kernel also over its K split (programs per SM): at M = 4 it ran
    # with 13 warps per SM, latency-bound (ncu, 2026-11-25)
    mma_tiles = [(a, 64, w, pps) for a in (64, 128, 256) for w in (2, 4) for pps in (4, 8, 16)]
    default_pps, default_fma_max = gemv_mod.PROGRAMS_PER_SM, gemv_mod.FMA_MAX_M
    default_multi = gemv_mod.TILES["fma_multi"]
    # (M, path label, tiles): one token on the FMA kernel; four on the tensor cores and
    # on the FMA kernel (FMA_MAX_M = 4)
    fma = [(*t, default_pps) for t in fma_tiles]
    gemv_runs = ((1, "fma", fma), (4, "mma", mma_tiles), (4, "fma_multi", fma))
    for mm, key, tiles in gemv_runs * ("gemv" in parts):
        xg = torch.randn(mm, 3072, device="cuda").bfloat16()
        # which kernel M = 4 runs on is FMA_MAX_M's choice: force each (v24 timed the FMA
        # kernel under "mma" once the default had become 4)
        gemv_mod.FMA_MAX_M = {"fma": max(1, default_fma_max), "fma_multi": 4, "mma": 1}[key]
        for *tile, pps in tiles:
            gemv_mod.TILES[key] = tuple(tile)
            gemv_mod.PROGRAMS_PER_SM = pps
            fn = lambda xg=xg: w4a16_linear(xg, *gargs, "int4")  # noqa: E731
            timed = _timed(fn, 18432 * 1536 + g.wscales.numel() * 2, copy_gbs, True)
            out["gemv"].append({"M": mm, "path": key, "tile": (*tile, pps), **timed})
            print(f"gemv M={mm} {key} {tile} pps {pps}: {timed.get('us', timed.get('error'))}")
    gemv_mod.PROGRAMS_PER_SM, gemv_mod.FMA_MAX_M = default_pps, default_fma_max
    gemv_mod.TILES["fma_multi"] = default_multi
    best = {}
    for key, rows in out.items():
        ok = [r for r in rows if "us" in r]
        for mm in sorted({(r.get("M", 0), r.get("path", "")) for r in ok}):
            best[key, *mm] = min(
                (r for r in ok if (r.get("M", 0), r.get("path", "")) == mm), key=lambda r: r["us"]
            )
            print(f"sweep {key}: best {best[key, *mm]}", flush=True)
    # the rest of this run uses the best tiles
    if ("quantize", 4608, "large") in best:
        *tile, quantize_mod.PROGRAMS_PER_SM = best["quantize", 4608, "large"]["tile"]
        quantize_mod.TILES["large"] = tuple(tile)
    if ("quantize", 512, "medium") in best:
        quantize_mod.TILES["medium"] = tuple(best["quantize", 512, "medium"]["tile"][:3])
    if ("widen", 0, "") in best:
        widen_mod.TILE = best["widen", 0, ""]["tile"]
    if ("gemv", 4, "mma") in best:
        gemv_mod.TILES["fma"] = tuple(best["gemv", 1, "fma"]["tile"][:3])
        *tile, gemv_mod.PROGRAMS_PER_SM = best["gemv", 4, "mma"]["tile"]
        gemv_mod.TILES["mma"] = tuple(tile)
        multi = best.get(("gemv", 4, "fma_multi"))
        fma_wins = multi is not None and multi["us"] < best["gemv", 4, "mma"]["us"]
        if fma_wins:
            gemv_mod.TILES["fma_multi"] = tuple(multi["tile"][:3])
        gemv_mod.FMA_MAX_M = 4 if fma_wins else 1
        print(f"sweep gemv: FMA kernel up to M = {gemv_mod.FMA_MAX_M}", flush=True)
    return out


def kernel_stats() -> dict:
    """Registers, spills and shared memory of every compiled variant of our kernels, and
    the GEMM's autotuned configs (for NOTES.md)."""
    fns = {
        "quantize": quantize_mod._quantize_act_kernel,
        "widen": widen_mod._widen_kernel,
        "gemv_fma": gemv_mod._w4a16_fma_kernel,
        "gemv_mma": gemv_mod._w4a16_mma_kernel,
        "gemm": gemm_mod._fp8_gemm_kernel.fn,
    }
    out: dict = {}
    for name, fn in fns.items():
        rows = []
        try:
            for caches in fn.device_caches.values():
                for k in caches[0].values():
                    rows.append({a: getattr(k, a, None) for a in ("n_regs", "n_spills", "shared")})
        except Exception as e:  # the cache layout is triton-internal
            rows.append({"error": str(e)[:120]})
        out[name] = rows
    try:
        out["gemm_autotune"] = {str(k): str(v) for k, v in gemm_mod._fp8_gemm_kernel.cache.items()}
    except Exception as e:
        out["gemm_autotune"] = str(e)[:120]
    return out


def run_info() -> dict:
    """The head of every result JSON: device, date, commit, versions."""
    return {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }


def write_result(result: dict, out: str, stem: str) -> Path:
    """``result`` as ``<out>/<stem>-<date>.json``, or ``…-<date>-2.json`` and on where an
    earlier run of the day is there (a second probe in one device call must not replace
    the first); written to a temporary file and renamed. Returns the path."""
    base = Path(out) / f"{stem}-{datetime.date.today().isoformat()}"
    base.parent.mkdir(parents=True, exist_ok=True)
    path, n = base.with_name(base.name + ".json"), 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}.json")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return path


def _commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--quick", action="store_true", help="M = 4608 only, 3 shapes")
    p.add_argument(
        "--sweep",
        nargs="?",
        const="quantize,widen,gemv",
        default="",
        help="first sweep the memory-bound kernels' tiles (all, or e.g. 'gemv,quantize')",
    )
    p.add_argument("--no-table", action="store_true", help="only the sweep")
    p.add_argument(
        "--lora-ranks-only",
        action="store_true",
        help="only the layer at growing low-rank ranks (a LoRA's), at --ms (default 4096) "
        "and --shapes (default 3072x3072,12288x3072)",
    )
    p.add_argument("--ms", default=None, help="comma-separated M of the table (default all)")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated NxK of the table instead of the issue's six (e.g. SDXL's "
        "3840x1280,10240x1280); the MLP pair and LoRA ranks are then left out",
    )
    a = p.parse_args()
    torch.manual_seed(0)
    ms, nks = ((4608,), NKS[:3]) if a.quick else (MS, NKS)
    ms = tuple(int(v) for v in a.ms.split(",")) if a.ms else ms
    if a.shapes:
        try:
            nks = tuple(tuple(int(v) for v in s.split("x")) for s in a.shapes.split(","))
        except ValueError:
            raise SystemExit(f"--shapes wants NxK,NxK,..., got {a.shapes!r}") from None
        if any(len(nk) != 2 for nk in nks):
            raise SystemExit(f"--shapes wants NxK,NxK,..., got {a.shapes!r}")
    ms = () if a.no_table else ms
    if a.lora_ranks_only:
        ranks_ms = tuple(int(v) for v in a.ms.split(",")) if a.ms else (4096,)
        ranks_nks = nks if a.shapes else ((3072, 3072), (12288, 3072))
        ranks = [row for m in ranks_ms for n, k in ranks_nks for row in bench_lora_ranks(m, n, k)]
        path = write_result({**run_info(), "rank": RANK, "lora_ranks": ranks}, a.out, "gemm")
        _print_lora_ranks(ranks)
        print(f"-> {path}")
        return
    copy_gbs = copy_bandwidth()
    tiles = sweep(copy_gbs, a.sweep) if a.sweep else None
    rows = []
    for m in ms:
        for n, k in nks:
            rows.append(bench_shape(m, n, k, copy_gbs))
            print(json.dumps({c: round(v, 3) if isinstance(v, float) else v
                              for c, v in rows[-1].items()}), flush=True)  # fmt: skip
    mlp = [] if a.shapes else [bench_mlp(m) for m in (512, 4096, 4608) if m in ms]
    gemv = [bench_gemv(m, 18432, 3072, copy_gbs) for m in (1, 4)]
    lora_ranks = (
        []
        if a.quick or a.no_table or a.shapes or 4096 not in ms
        else [row for n, k in ((3072, 3072), (12288, 3072)) for row in bench_lora_ranks(4096, n, k)]
    )
    result = {
        **run_info(),
        "copy_gbs": copy_gbs,
        "rank": RANK,
        "layers": rows,
        "mlp": mlp,
        "gemv": gemv,
        "lora_ranks": lora_ranks,
        "sweep": tiles,
        "kernels": kernel_stats(),
    }
    path = write_result(result, a.out, "gemm")
    print(f"\n{result['device']}  torch {torch.__version__}  triton {triton.__version__}  "
          f"copy {copy_gbs:.0f} GB/s  -> {path}")  # fmt: skip
    print("ratios = BF16 time / ours; quantize in % of copy bandwidth; G = in a CUDA graph; "
          "C = L2 emptied by reading, not writing (bench_graph_clean)")  # fmt: skip
    for name, rows_ in result["kernels"].items():
        print(f"kernel {name}: {rows_}")
    hdr = ("M", "N", "K", "bf16Gus", "fp8cub", "quant%", "quantC%", "widen%", "widenC%",
           "gemm+lrG", "+tailG", "lr%gemmG", "lr%layG",
           "gemm", "layer", "layer-lr", "w4a8", "layerG", "layer-lrG", "layerSeqG",
           "keptG")  # fmt: skip
    print(" ".join(f"{h:>9}" for h in hdr))
    for r in rows:
        vals = (r["M"], r["N"], r["K"], f"{r['bf16_graph_us']:.0f}", _x(r.get("cublas_fp8_x")),
                f"{r['quantize_pct_copy']:.0f}", f"{r['quantize_clean_pct_copy']:.0f}",
                f"{r['widen_pct_copy']:.0f}", f"{r['widen_clean_pct_copy']:.0f}",
                _x(r["gemm_graph_x"]), _x(r.get("gemm_tail_graph_x")),
                f"{r['lowrank_gemm_pct']:.1f}", f"{r['lowrank_layer_pct']:.1f}",
                _x(r["gemm_nolr_x"]), _x(r["layer_x"]), _x(r["layer_nolr_x"]),
                _x(r["layer_w4a8_x"]), _x(r["layer_graph_x"]),
                _x(r["layer_nolr_graph_x"]), _x(r["layer_seq_graph_x"]),
                _x(r.get("layer_kept_graph_x")))  # fmt: skip
        print(" ".join(f"{v:>9}" for v in vals))
    for r in mlp:
        print(f"MLP M={r['M']}: bf16 {r['bf16_us']:.0f} us, ours {r['ours_us']:.0f} us "
              f"({r['x']:.2f}x), W4A8 {r['ours_w4a8_us']:.0f} us; CUDA graph: bf16 "
              f"{r['bf16_graph_us']:.0f} us, ours {r['ours_graph_us']:.0f} us "
              f"({r['graph_x']:.2f}x), W4A8 {r['ours_w4a8_graph_us']:.0f} us")  # fmt: skip
        print(f"  fused MLP: {r['fused_us']:.0f} us ({r['fused_x']:.2f}x); CUDA graph "
              f"{r['fused_graph_us']:.0f} us ({r['fused_graph_x']:.2f}x), W4A8 "
              f"{r['fused_w4a8_graph_us']:.0f} us ({r['fused_w4a8_graph_x']:.2f}x); weights kept "
              f"{r['fused_kept_graph_us']:.0f} us ({r['fused_kept_graph_x']:.2f}x)")  # fmt: skip
        if "fused_ws_graph_us" in r:
            print(f"  fused MLP, fc1's epilogue on gemm_ws (gemm.WS_NEXT): CUDA graph "
                  f"{r['fused_ws_graph_us']:.0f} us ({r['fused_ws_graph_x']:.2f}x)")  # fmt: skip
    for r in gemv:
        print(f"W4A16 GEMV M={r['M']} N={r['N']} K={r['K']}: bf16 {r['bf16_us']:.1f} us, "
              f"ours {r['gemv_us']:.1f} us ({r['x']:.2f}x), no low-rank {r['gemv_nolr_us']:.1f}"
              f" us ({r['nolr_x']:.2f}x, {r['gemv_nolr_pct_copy']:.0f}% of copy); CUDA graph: "
              f"bf16 {r['bf16_graph_us']:.1f} us, ours {r['gemv_graph_us']:.1f} us "
              f"({r['graph_x']:.2f}x); clean L2: bf16 {r['bf16_clean_us']:.1f} us, ours "
              f"{r['gemv_clean_us']:.1f} us ({r['clean_x']:.2f}x)")  # fmt: skip
    _print_lora_ranks(lora_ranks)


def _print_lora_ranks(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"LoRA rank {r['rank']} M={r['M']} N={r['N']}: {r['error']}")
        else:
            print(f"layer + rank {r['rank']:>3} M={r['M']} N={r['N']} K={r['K']}: "
                  f"{r['layer_graph_us']:.0f} us, {r.get('vs_rank32', 0):.2f}x the rank-32 "
                  f"time, {r.get('x_bf16', 0):.2f}x BF16")  # fmt: skip


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


if __name__ == "__main__":
    main()
