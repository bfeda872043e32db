"""Where an eager layer call's CPU time goes: the cost a step pays without CUDA graphs.

    PYTHONPATH=src python bench/probe_launch.py [--out DIR]

A FLUX.1-dev step launches ~500 quantized layers; eagerly (no CUDA graph, no
``torch.compile``) the step is CPU-bound (v31: 208 ms eager against 141 ms replayed from
a graph, BF16 eager 173.5). Here each piece of one layer call is timed on the CPU side:
shapes small enough (M = 64, N = K = 256) that the GPU finishes each launch before the
next is issued, so ``n`` calls in a row, one synchronization at the end, give the
host's µs per call. Pieces: BF16 ``F.linear`` (PyTorch's floor), an empty Triton kernel
(Triton's launch floor), the three kernels' Python launchers, the two custom ops, the
whole ``svdq_linear_triton`` and ``SVDQLinear.forward`` (with its input checks), the
W4A16 path at one token, and attention's q/k norm + rotary (``kernels.rms_norm_rope``
against diffusers' passes, 8 text + 8 image tokens, 2 heads of 128); then a cProfile of
the whole layer call (top functions by own time) written beside the JSON.
``--bound-ab`` times every case with ``kernels.launch.BOUND`` on and off, ``--replay-ab``
with ``kernels.replay.ENABLED`` on and off (the ``SVDQLinear`` cases: plain, its fp8
weight kept, a GEGLU's gated input at 2048 rows, W4A16 at one token), alternated twice.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).parent))
from gemm import Layer, run_info, write_result
from probe_layer import constants, with_constants

import svdquant
from svdquant.kernels import launch as launch_mod
from svdquant.kernels import ops, replay
from svdquant.kernels.gemm import fp8_gemm
from svdquant.kernels.quantize import quantize_act
from svdquant.kernels.widen import widen_weight


@triton.jit
def _empty_kernel(x_ptr, n):
    pass


def host_us(fn, n: int = 400) -> float:
    """µs of host time per call of ``fn`` (the GPU keeps up at these sizes)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for _ in range(20):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n * 1e6


def switch_ab(fn, module, name: str) -> tuple[float, float]:
    """``host_us(fn)`` with the switch ``module.name`` on and off, alternated twice: the
    faster of each way (the host's time moves by tens of percent between runs)."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(2):
        for way in (True, False):
            with constants([(module, name, way)]):
                times[way].append(host_us(fn))
    return min(times[True]), min(times[False])


def module(layer: Layer, act_fmt: str = "int4") -> svdquant.SVDQLinear:
    """An ``SVDQLinear`` of ``layer``'s shape (backend ``triton``)."""
    lin = torch.nn.Linear(layer.in_features, layer.out_features).cuda().bfloat16()
    calib = torch.randn(64, layer.in_features, device="cuda").bfloat16()
    mod = svdquant.quantize_linear(lin, calib, fmt="int4", act_fmt=act_fmt, rank=32)
    mod.backend = "triton"
    return mod


def _rope_cases() -> dict:
    """q's norm + rotary as the fused FLUX processor runs it, and as diffusers does."""
    from diffusers.models.embeddings import apply_rotary_emb

    from svdquant import kernels

    q, eq = (torch.randn(1, 8, 2, 128, device="cuda").bfloat16() for _ in range(2))
    norm = torch.nn.RMSNorm(128, eps=1e-6).cuda().bfloat16()
    rot = tuple(torch.rand(16, 128, device="cuda") for _ in range(2))
    return {
        "rms_norm_rope (q, text first)": lambda: kernels.rms_norm_rope(
            q, norm.weight, 1e-6, *rot, eq, norm.weight
        ),
        "diffusers norm + cat + rotary": lambda: apply_rotary_emb(
            torch.cat([norm(eq), norm(q)], dim=1), rot, sequence_dim=1
        ),
    }


def _lora_cases(mod: svdquant.SVDQLinear, nk: int, rank: int) -> dict:
    """``mod`` with ``rank`` more low-rank rows (a LoRA's), called on 256 rows (the
    routes need more than 64): through ``quantize.WIDE_BY_MM``'s cuBLAS sums and through
    the sliced quantize kernel."""
    import copy

    from svdquant.kernels import quantize

    lora = copy.deepcopy(mod)
    g = torch.Generator(device="cuda").manual_seed(3)
    down = torch.randn(rank, nk, device="cuda", generator=g).bfloat16() / nk**0.5
    up = torch.randn(lora.out_features, rank, device="cuda", generator=g).bfloat16() * 0.02
    lora.lowrank_down = torch.cat([lora.lowrank_down, down]).contiguous()
    lora.lowrank_up = torch.cat([lora.lowrank_up, up], dim=1).contiguous()
    x = torch.randn(256, nk, device="cuda").bfloat16()
    down_all, smooth = lora.lowrank_down, lora.smooth
    fold = quantize.folded_down(down_all, smooth)
    buf = torch.empty(256, down_all.shape[0], device="cuda")
    s, kp = ops._act_scale(lora.act_amax), lora.qweight.shape[1] * 2

    def routed(route: bool, fn):
        return with_constants(fn, [(quantize, "WIDE_BY_MM", route)])

    def quantize_rank(r: int):
        return lambda: quantize_act(x, smooth, down_all[:r], s, kp, "int4")

    return {
        f"SVDQLinear.forward + LoRA {rank}, route": routed(True, lambda: lora(x)),
        f"SVDQLinear.forward + LoRA {rank}, slices": routed(False, lambda: lora(x)),
        "SVDQLinear.forward, 256 rows": lambda: mod(x),
        f"quantize_act rank {rank + 32}, route": routed(True, quantize_rank(rank + 32)),
        f"quantize_act rank {rank + 32}, slices": routed(False, quantize_rank(rank + 32)),
        "quantize_act rank 0": routed(False, quantize_rank(0)),
        "folded_down (kept)": lambda: quantize.folded_down(down_all, smooth),
        "torch.mm bf16": lambda: torch.mm(x, fold.t()),
        "torch.mm out_dtype fp32": lambda: torch.mm(x, fold.t(), out_dtype=torch.float32),
        "torch.mm out_dtype fp32, out=": lambda: torch.mm(
            x, fold.t(), out_dtype=torch.float32, out=buf
        ),
        "lowrank_mm": lambda: quantize.lowrank_mm(x, fold, buf),
        "torch.empty + zero_": lambda: torch.empty(256, 160, device="cuda").zero_(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--m", type=int, default=64)
    p.add_argument("--nk", type=int, default=256)
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="also a layer with a LoRA of this rank on its rank 32, at 256 rows (a wide "
        "rank's routes: quantize.WIDE_BY_MM on and off), and its cProfile",
    )
    p.add_argument(
        "--bound-ab",
        action="store_true",
        help="time every case with kernels.launch.BOUND on and off (alternated twice, the "
        "faster of each way): the bound launches' host time against Triton's run",
    )
    p.add_argument(
        "--replay-ab",
        action="store_true",
        help="the same with kernels.replay.ENABLED: replayed layer calls against their own "
        "path (the cases that call an SVDQLinear)",
    )
    a = p.parse_args()
    torch.manual_seed(0)
    m, nk = a.m, a.nk
    layer = Layer(nk, nk)
    x = torch.randn(m, nk, device="cuda").bfloat16()
    x1 = x[:1].clone()
    x1024 = torch.randn(1024, nk, device="cuda").bfloat16()
    w16 = layer.w16
    s = ops._act_scale(layer.act_amax)
    kp = layer.qweight.shape[1] * 2
    w = (layer.qweight, layer.wscales, layer.wtensor_scale)
    xq, lora = quantize_act(x, layer.smooth, layer.down, s, kp, "int4")
    wq, s_ch = widen_weight(*w, "int4")
    mod = module(layer)
    kept_mod = module(layer)
    svdquant.keep_fp8_weights(kept_mod)
    w4a16_mod = module(layer, act_fmt="none")
    h = torch.randn(2048, 2 * nk, device="cuda").bfloat16()
    halves = h[:, :nk], h[:, nk:]  # (a GEGLU's up projection, read where it lies)
    cases = {
        "F.linear bf16": lambda: F.linear(x, w16, layer.bias),
        "empty triton kernel": lambda: _empty_kernel[(1,)](x, 1),
        "empty triton kernel, kernels.launch": lambda: launch_mod.launch(_empty_kernel, (1,), x, 1),
        "quantize_act (launcher)": lambda: quantize_act(x, layer.smooth, layer.down, s, kp, "int4"),
        "widen_weight (launcher)": lambda: widen_weight(*w, "int4"),
        "fp8_gemm (launcher)": lambda: fp8_gemm(
            xq, wq, s_ch, s, lora, layer.up, layer.bias, torch.bfloat16
        ),
        "act scale (S = amax / 224)": lambda: ops._act_scale(layer.act_amax),
        "op quantize_and_widen": lambda: torch.ops.svdquant.quantize_and_widen(
            x, layer.smooth, layer.down, s, kp, "int4", *w, "int4"
        ),
        "op fp8_gemm": lambda: torch.ops.svdquant.fp8_gemm(
            xq, wq, s_ch, s, lora, layer.up, layer.bias, torch.bfloat16
        ),
        "svdq_linear_triton": lambda: layer(x),
        "SVDQLinear.forward": lambda: mod(x),
        "SVDQLinear.forward, 1024 rows": lambda: mod(x1024),
        "SVDQLinear.forward, kept fp8 weights": lambda: kept_mod(x),
        "SVDQLinear.forward_gated, 2048 rows": lambda: mod.forward_gated(*halves),
        "SVDQLinear.forward, W4A16, one token": lambda: w4a16_mod(x1),
        "W4A16 layer, M = 1": lambda: layer(x1, act_fmt="none"),
        **_rope_cases(),
        **(_lora_cases(mod, nk, a.lora_rank) if a.lora_rank else {}),
    }
    result: dict = {**run_info(), "M": m, "N": nk, "K": nk, "host_us": {}}
    switch = None
    if a.bound_ab or a.replay_ab:
        switch = (launch_mod, "BOUND") if a.bound_ab else (replay, "ENABLED")
        off_key = "host_us_unbound" if a.bound_ab else "host_us_not_replayed"
        result[off_key] = {}
    for name, fn in cases.items():
        if switch is not None:
            on, off = switch_ab(fn, *switch)
            result["host_us"][name], result[off_key][name] = on, off
            print(f"{name:40s} {on:8.1f} µs with {switch[1]}, {off:8.1f} without "
                  f"({off / on:.2f}x)", flush=True)  # fmt: skip
            continue
        result["host_us"][name] = host_us(fn)
        print(f"{name:30s} {result['host_us'][name]:8.1f} µs", flush=True)
    prof = cProfile.Profile()
    route = f"SVDQLinear.forward + LoRA {a.lora_rank}, route"
    profiled = cases[route] if a.lora_rank else cases["SVDQLinear.forward"]
    prof.enable()
    for _ in range(300):
        profiled()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
    result["profile_top"] = buf.getvalue()
    path = write_result(result, a.out, "probe_launch")
    print(buf.getvalue()[:11000])
    print(f"-> {path}")


if __name__ == "__main__":
    main()
