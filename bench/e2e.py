"""End-to-end FLUX.1-dev denoiser step: svdquant against BF16, NF4 and torchao (issue 6).

    PYTHONPATH=src python bench/e2e.py [--out DIR] [--budget-s S] [--compile] [--rows a,b]
                                       [--steps N] [--batches 1,4] [--tiny]
                                       [--set 'gemm.WS_GEMM=False' ...] [--fp8-weights-gib G]
                                       [--ab 'rope.ENABLED=False' ...]

Each row builds the full-size FLUX.1-dev transformer (real config, 11.9B parameters,
random bf16 weights) on the GPU, applies one method, and times the denoiser's forward at
1024x1024 (4096 image tokens, 512 text tokens) at batch 1 and 4: medians over ``--steps``
steps timed with CUDA events after warm-up, the transformer's weight memory (allocator
bytes right after the method was applied) and the peak memory of one whole step
(``torch.cuda.max_memory_allocated`` around it). Speedups are against the BF16 and the
NF4 rows of the same run. Rows, in the order they run (``--budget-s`` skips the rest when
the wall time runs out, each with its reason):

    bf16 (diffusers), svdq-int4 (ours W4A4), nf4 (bitsandbytes W4A16), svdq-w4a16 (ours),
    torchao int8 weight-only / int8 dynamic / float8 dynamic / int4 weight-only,
    svdq-nvfp4, svdq-w4a8, svdq-int4-fused (q/k/v fused: ``svdquant.fuse_projections``),
    svdq-int4-lora and svdq-int4-fused-lora (a random rank ``--lora-rank`` LoRA on every
    quantized layer, each its own down factor: loaded with ``svdquant.load_lora``, then
    fused), svdq-int4-fused-fp8w (fused, the widened weights kept:
    ``svdquant.keep_fp8_weights``; ``--fp8-weights-gib``: only the smallest layers'
    within that budget), svdq-int4-fused-fp8w-host (the same with the 4-bit codes in host
    memory: ``codes_on_host=True``), then with --compile the torch.compile'd variants of
    the same rows.

Each eager row is also replayed from a CUDA graph captured around one step (mode
``cudagraph``, through ``svdquant.cuda_graphed`` as ``svdquant generate`` runs it; off with
``--no-cuda-graphs``), which removes the CPU launch overhead. Our
rows are calibrated on one synthetic run with a fixed smoothing alpha = 0.5 (speed does
not depend on the calibration). NF4 and torchao quantize exactly the layers ours does
(every linear inside the transformer blocks); embedders and the output projection stay
16-bit everywhere. A row whose library is missing is skipped with the reason; a row that
fails records its error and the run goes on. Writes ``e2e-<device>-<date>.json`` and a PNG
plot of latency and memory next to it under ``--out`` (default ``bench/results``, or
``$OUT`` when set); prints a markdown table last. ``--tiny`` runs a 1-block model with
few tokens on the CPU (CPU timers, no memory columns): what ``tests/test_bench.py`` runs.
``--set module.NAME=VALUE`` sets an engine constant under ``svdquant.kernels`` for every
row (as in ``probe_layer.py``; recorded in the JSON): one engine path against another.
``--ab module.NAME=VALUE`` times each eager and CUDA-graph row again with the constant set,
on the same model in the same process, alternated with the default (``ab`` in the row):
the comparison to quote, free of the spread between processes and hosts. A constant of
``svdquant.lora`` (``lora.RANK_MULTIPLE=1``) stacks the loaded LoRAs again each way.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


def _sibling(name: str) -> Any:
    """Import ``bench/<name>.py`` by path (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


_fq = _sibling("flux_quantize")
FLUX_DEV: dict[str, Any] = _fq.FLUX_DEV
# one double-stream and one single-stream block; width 64 so that int4's groups of 64 fit
TINY: dict[str, Any] = dict(_fq.TINY, attention_head_dim=32, axes_dims_rope=(8, 12, 12))

GiB = 2**30


# --------------------------------------------------------------------------- methods


@dataclass
class Method:
    """One way to run the transformer: ``apply(model, ctx)`` changes it in place (or
    returns a replacement); ``missing()`` says why it cannot run here (``None``: it can)."""

    name: str
    label: str
    library: str
    weights: str
    activations: str
    apply: Callable[[nn.Module, Ctx], nn.Module | None]
    missing: Callable[[Ctx], str | None] = lambda ctx: None
    est_s: float = 60.0  # rough wall time of one eager row on the H100 (for --budget-s)
    notes: str = ""


def _in_blocks(name: str) -> bool:
    """The layers every quantized row quantizes: the linears inside the blocks."""
    return name.startswith(("transformer_blocks.", "single_transformer_blocks."))


def _no_module(mod: str) -> Callable[[Ctx], str | None]:
    def check(ctx: Ctx) -> str | None:
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install {mod}; on the device carry its wheel)"
        return None

    return check


#: Rank of the synthetic LoRA the ``*-lora`` rows load on every quantized layer
#: (``--lora-rank``).
LORA_RANK = 16
#: The svdq-int4-fused-fp8w row's byte budget for ``keep_fp8_weights`` in GiB (None: every
#: layer; ``--fp8-weights-gib``).
FP8_WEIGHTS_GIB: float | None = None


def _load_random_lora(
    model: nn.Module,
    rank: int,
    keep: Callable[[str], bool] = _in_blocks,
    dtype: torch.dtype = torch.bfloat16,
) -> None:
    """A random rank-``rank`` LoRA in diffusers/PEFT form on every quantized layer whose
    name ``keep`` takes (by default those of FLUX's blocks) — its own down factor per
    layer, as LoRAs trained with diffusers have (q, k and v each their own: the fused
    layers stack them, the costliest case) — written to a temporary file in ``dtype`` and
    loaded with ``svdquant.load_lora``, as a user's would be."""
    import tempfile

    from safetensors.torch import save_file

    import svdquant

    g = torch.Generator().manual_seed(0)
    factors = {}
    for name, m in model.named_modules():
        if isinstance(m, svdquant.SVDQLinear) and keep(name):
            a = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
            b = torch.randn(m.out_features, rank, generator=g) * 0.01
            factors[f"transformer.{name}.lora_A.weight"] = a.to(dtype)
            factors[f"transformer.{name}.lora_B.weight"] = b.to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_file(factors, str(path))
        svdquant.load_lora(model, path, name="bench")


def _ours(
    fmt: str,
    act_fmt: str | None,
    fuse: bool = False,
    lora: bool = False,
    fp8w: bool = False,
    codes_on_host: bool = False,
) -> Callable[[nn.Module, Ctx], None]:
    def apply(model: nn.Module, ctx: Ctx) -> None:
        import svdquant

        cfg = svdquant.QuantizeConfig(
            fmt=fmt, act_fmt=act_fmt, alpha=0.5, max_samples=256, progress=False
        )
        svdquant.quantize_model(model, ctx.calibration, cfg)
        if lora:  # before fusing: the fused layers stack each layer's LoRA
            _load_random_lora(model, LORA_RANK)
        if fuse:  # q/k/v (+ the single blocks' MLP up) as one layer: one quantize, one GEMM
            svdquant.fuse_projections(model)
        if fp8w:  # the widened fp8 weights kept: no per-step widen, more memory
            keep_fp8_weights(model, FP8_WEIGHTS_GIB, codes_on_host)

    return apply


def keep_fp8_weights(model: nn.Module, gib: float | None, codes_on_host: bool = False) -> int:
    """``svdquant.keep_fp8_weights`` within ``gib`` GiB (None: every layer)."""
    import svdquant

    budget = None if gib is None else int(gib * 2**30)
    return svdquant.keep_fp8_weights(model, max_bytes=budget, codes_on_host=codes_on_host)


def _nf4(model: nn.Module, ctx: Ctx) -> None:
    import bitsandbytes as bnb

    for name, lin in list(model.named_modules()):
        if not (isinstance(lin, nn.Linear) and _in_blocks(name)):
            continue
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=torch.bfloat16,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            lin.weight.data, requires_grad=False, quant_type="nf4", module=q
        ).to(ctx.device)  # .to() of an unquantized Params4bit quantizes it
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
        del lin


def _torchao_config(kind: str) -> Any:
    """The torchao config object of ``kind`` for the installed version, or raise
    ``LookupError`` saying what is missing."""
    import torchao.quantization as tq

    def cls(name: str) -> Any:
        c = getattr(tq, name, None)
        if c is None:
            raise LookupError(f"torchao {_version('torchao')} has no {name}")
        return c

    def make(c: Any, **kw: Any) -> Any:
        import dataclasses

        names = {f.name for f in dataclasses.fields(c)} if dataclasses.is_dataclass(c) else set()
        # its recommended inductor settings are global and slow every later compile: off,
        # so every compiled row runs under the same inductor settings
        if "set_inductor_config" in names:
            kw["set_inductor_config"] = False
        return c(**{k: v for k, v in kw.items() if not names or k in names})

    if kind == "int8wo":
        return make(cls("Int8WeightOnlyConfig"))
    if kind == "int8dq":
        return make(cls("Int8DynamicActivationInt8WeightConfig"))
    if kind == "fp8dq":
        per_row = getattr(tq, "PerRow", None)
        kw = {"granularity": per_row()} if per_row is not None else {}
        return make(cls("Float8DynamicActivationFloat8WeightConfig"), **kw)
    if kind == "int4wo":
        # the tinygemm layout runs on torch's own CUDA kernel; the default ("plain") wants
        # the separate fbgemm-gpu-genai package
        return make(
            cls("Int4WeightOnlyConfig"), group_size=128, int4_packing_format="tile_packed_to_4d"
        )
    raise ValueError(kind)


def _torchao(kind: str) -> Callable[[nn.Module, Ctx], None]:
    def apply(model: nn.Module, ctx: Ctx) -> None:
        from torchao.quantization import quantize_

        quantize_(
            model,
            _torchao_config(kind),
            filter_fn=lambda m, n: isinstance(m, nn.Linear) and _in_blocks(n),
        )

    return apply


def _torchao_missing(kind: str) -> Callable[[Ctx], str | None]:
    def check(ctx: Ctx) -> str | None:
        reason = _no_module("torchao")(ctx)
        if reason:
            return reason
        try:
            _torchao_config(kind)
        except LookupError as e:
            return str(e)
        except Exception as e:  # an import error of torchao itself
            return f"torchao does not import: {type(e).__name__}: {e}"
        if kind in ("fp8dq", "int4wo") and not ctx.cuda:
            return f"torchao's {kind} kernels need a CUDA device"
        if kind == "fp8dq" and torch.cuda.get_device_capability() < (8, 9):
            return "float8 needs compute capability 8.9 or newer"
        return None

    return check


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("bf16", "diffusers BF16", "diffusers", "bf16", "bf16", lambda m, c: None, est_s=25),
        Method("svdq-int4", "svdquant W4A4 int4", "svdquant", "int4 g64 + rank 32", "int4 g64",
               _ours("int4", None), est_s=90),
        Method("svdq-int4-fused", "svdquant W4A4 int4, fused projections", "svdquant",
               "int4 g64 + rank 32", "int4 g64", _ours("int4", None, fuse=True), est_s=90),
        Method("svdq-int4-lora", "svdquant W4A4 int4 + LoRA", "svdquant",
               "int4 g64 + rank 32 + LoRA", "int4 g64", _ours("int4", None, lora=True), est_s=95),
        Method("svdq-int4-fused-lora", "svdquant W4A4 int4 + LoRA, fused projections",
               "svdquant", "int4 g64 + rank 32 + LoRA", "int4 g64",
               _ours("int4", None, fuse=True, lora=True), est_s=95),
        Method("svdq-int4-fused-fp8w", "svdquant W4A4 int4, fused, fp8 weights kept",
               "svdquant", "int4 g64 + rank 32 (+ fp8 copy)", "int4 g64",
               _ours("int4", None, fuse=True, fp8w=True), est_s=90),
        Method("svdq-int4-fused-fp8w-host", "svdquant W4A4 int4, fused, fp8 weights kept, "
               "codes on the host", "svdquant", "int4 g64 + rank 32 (fp8 copy on the GPU)",
               "int4 g64", _ours("int4", None, fuse=True, fp8w=True, codes_on_host=True),
               est_s=95),
        Method("nf4", "bitsandbytes NF4 W4A16", "bitsandbytes", "nf4 g64", "bf16", _nf4,
               _no_module("bitsandbytes"), est_s=40),
        Method("svdq-w4a16", "svdquant W4A16 int4", "svdquant", "int4 g64 + rank 32", "bf16",
               _ours("int4", "none"), est_s=90),
        Method("ao-int8wo", "torchao int8 weight-only", "torchao", "int8 per channel", "bf16",
               _torchao("int8wo"), _torchao_missing("int8wo"), est_s=50),
        Method("ao-int8dq", "torchao int8 dynamic", "torchao", "int8 per channel",
               "int8 per token", _torchao("int8dq"), _torchao_missing("int8dq"), est_s=50),
        Method("ao-fp8dq", "torchao float8 dynamic", "torchao", "fp8 e4m3 per row",
               "fp8 e4m3 per row", _torchao("fp8dq"), _torchao_missing("fp8dq"), est_s=50),
        Method("ao-int4wo", "torchao int4 weight-only", "torchao", "int4 g128 (tinygemm)",
               "bf16", _torchao("int4wo"), _torchao_missing("int4wo"), est_s=50),
        Method("svdq-nvfp4", "svdquant W4A4 nvfp4", "svdquant", "nvfp4 g16 + rank 32",
               "nvfp4 g16", _ours("nvfp4", None), est_s=90),
        Method("svdq-w4a8", "svdquant W4A8 (int4 weights, fp8 acts)", "svdquant",
               "int4 g64 + rank 32", "fp8 e4m3 (static scale)", _ours("int4", "fp8"), est_s=90),
    )
}  # fmt: skip
#: the order rows run in: most important first (--budget-s cuts the tail)
ORDER = tuple(METHODS)
#: a device call runs at most 600 s; this leaves room for start-up, the plot and the table
DEFAULT_BUDGET_S = 540.0
COMPILE_EST_S = 150.0  # one torch.compile of the 12B model, per batch size (probe 7: 125 s)


# --------------------------------------------------------------------------- context


@dataclass
class Ctx:
    device: str
    tiny: bool
    cfg: dict[str, Any]
    img_tokens: int
    txt_tokens: int
    batches: tuple[int, ...]
    steps: int
    warmup: int
    calib_runs: int = 1
    profile_rows: tuple[str, ...] = ()
    inputs_cache: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def inputs(self, batch: int) -> dict[str, Any]:
        """The denoiser's inputs of one step at ``batch`` (fixed seed)."""
        if batch not in self.inputs_cache:
            g = torch.Generator(self.device).manual_seed(batch)
            dev, bf = self.device, torch.bfloat16

            def rnd(*shape: int) -> torch.Tensor:
                return torch.randn(*shape, generator=g, device=dev).to(bf)

            side = round(self.img_tokens**0.5)
            ids = torch.zeros(self.img_tokens, 3, device=dev)
            ids[:, 1] = torch.arange(self.img_tokens, device=dev) // side
            ids[:, 2] = torch.arange(self.img_tokens, device=dev) % side
            self.inputs_cache[batch] = dict(
                hidden_states=rnd(batch, self.img_tokens, self.cfg["in_channels"]),
                encoder_hidden_states=rnd(batch, self.txt_tokens, self.cfg["joint_attention_dim"]),
                pooled_projections=rnd(batch, self.cfg["pooled_projection_dim"]),
                timestep=torch.full((batch,), 0.5, device=dev, dtype=bf),
                guidance=torch.full((batch,), 3.5, device=dev, dtype=bf),
                img_ids=ids,
                txt_ids=torch.zeros(self.txt_tokens, 3, device=dev),
                return_dict=False,
            )
        return self.inputs_cache[batch]

    def calibration(self, model: nn.Module) -> None:
        """Synthetic calibration: the transformer on random inputs at a few timesteps."""
        for i in range(self.calib_runs):
            kw = dict(self.inputs(1))
            kw["timestep"] = torch.full((1,), (i + 0.5) / self.calib_runs, device=self.device)
            model(**kw)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside wrapper subclasses (torchao) to their data."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) not in (torch.Tensor, nn.Parameter):
        try:
            names, _ = t.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(t, n)) for n in names)
        except Exception:
            pass
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module, cuda_only: bool = False) -> int:
    """Bytes of the model's parameters and buffers (and bitsandbytes' quantization states);
    ``cuda_only``: those on a GPU (``keep_fp8_weights(codes_on_host=True)`` leaves the
    4-bit codes in host memory)."""
    seen: set[int] = set()
    total = 0
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)  # bitsandbytes keeps absmax etc. beside the data
        if qs is not None:
            tensors += [v for v in vars(qs).values() if isinstance(v, torch.Tensor)]
            nested = getattr(qs, "state2", None)
            if nested is not None:
                tensors += [v for v in vars(nested).values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        if id(t) in seen or (cuda_only and not t.is_cuda):
            continue
        seen.add(id(t))
        total += _tensor_bytes(t)
    return total


def stray_cuda_tensors(model: nn.Module, top: int = 5) -> list[dict[str, Any]]:
    """The largest live CUDA tensors that are not the model's parameters or buffers — what
    the allocator counts beside the weights after a build (to say what it is)."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    found: dict[int, dict[str, Any]] = {}
    for obj in gc.get_objects():
        try:
            if not (isinstance(obj, torch.Tensor) and obj.is_cuda):
                continue
            st = obj.untyped_storage()
            ptr = st.data_ptr()
        except Exception:  # wrapper subclasses without storage, freed objects, and the
            continue  # fake tensors an earlier row's torch.compile left behind
        if ptr in owned or ptr in found:
            continue
        found[ptr] = {
            "shape": list(obj.shape),
            "dtype": str(obj.dtype).removeprefix("torch."),
            "bytes": st.nbytes(),
        }
    rows = sorted(found.values(), key=lambda d: -d["bytes"])
    return [{"count": len(rows), "bytes": sum(d["bytes"] for d in rows)}, *rows[:top]]


def _free() -> None:
    """Drop garbage and cached blocks — and cuBLAS's workspaces, which the allocator
    counts as allocated once a matmul has run (the calibration pass of our rows, not
    BF16's build): they are not weights."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        torch.cuda.empty_cache()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


# --------------------------------------------------------------------------- timing


def time_steps(fn: Callable[[], Any], ctx: Ctx) -> dict[str, Any]:
    """``warmup`` calls of ``fn`` (the first one timed on the wall clock: it holds any
    compilation or autotuning), then ``steps`` timed calls and one more for the peak."""
    t0 = time.perf_counter()
    fn()
    ctx.sync()
    first_s = time.perf_counter() - t0
    for _ in range(ctx.warmup - 1):
        fn()
    ctx.sync()
    times: list[float] = []
    for _ in range(ctx.steps):
        if ctx.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    peak = None
    if ctx.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "times_ms": [round(t, 3) for t in times],
        "first_call_s": round(first_s, 3),
        "peak_abs_bytes": peak,
    }


def profile_step(fn: Callable[[], Any], ctx: Ctx, top: int = 30) -> dict[str, Any]:
    """torch.profiler of one call of ``fn``: the ``top`` ops by self GPU time (CPU time on
    the CPU), to say where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=acts) as prof:
        fn()
        ctx.sync()
    events = prof.key_averages()

    def self_us(e: Any) -> float:
        if not ctx.cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)

    ranked = sorted(events, key=self_us, reverse=True)
    return {
        "time": "self GPU time" if ctx.cuda else "self CPU time",
        "total_ms": round(sum(self_us(e) for e in events) / 1e3, 3),
        "ops": [
            {"name": e.key, "calls": e.count, "self_ms": round(self_us(e) / 1e3, 3)}
            for e in ranked[:top]
        ],
    }


def _graph_step(model: nn.Module, kw: dict[str, Any]) -> Callable[[], Any]:
    """One step through ``svdquant.cuda_graphed`` (what ``svdquant generate`` runs on a
    GPU): after the eager warm-up (autotuning is done) the next call captures, and the
    returned step replays — copying the inputs in and the output out, as a pipeline's
    call does."""
    from svdquant.cuda_graph import CUDAGraphed

    graphed = CUDAGraphed(model)
    graphed(**kw)  # the signature's first call: eager
    graphed(**kw)  # the capture
    if graphed.num_graphs != 1:
        raise RuntimeError(f"the step was not captured: {graphed._failed}")
    return lambda: graphed(**kw)


# --------------------------------------------------------------------------- rows


def _row_base(method: Method, mode: str, compile_mode: str | None) -> dict[str, Any]:
    return {
        "name": method.name if mode == "eager" else f"{method.name}+{mode}",
        "method": method.name,
        "label": method.label,
        "library": method.library,
        "weights": method.weights,
        "activations": method.activations,
        "mode": mode,  # eager | cudagraph | compile
        "compiled": mode == "compile",
        "compile_mode": compile_mode if mode == "compile" else None,
        "cuda_graphs": mode == "cudagraph"
        or (mode == "compile" and compile_mode == "reduce-overhead"),
        "status": "pending",
        "reason": None,
        "error": None,
        "latency_ms": {},
        "latency": {},
        "step_peak_bytes": {},
    }


def build_bf16(factory: Callable[[], nn.Module], device: str) -> nn.Module:
    """``factory()`` built straight in bf16 on ``device`` (seed 0: the same random weights
    every run), in eval mode without gradients."""
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = factory()
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def _build(ctx: Ctx) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return build_bf16(lambda: FluxTransformer2DModel(**ctx.cfg), ctx.device)


def run_method(
    method: Method, ctx: Ctx, modes: Sequence[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Build the model, apply ``method``, time it in each of ``modes`` (``eager``,
    ``cudagraph`` or ``compile``); one result row per mode. Never raises."""
    rows = [_row_base(method, m, args.compile_mode) for m in modes]
    t_row = time.perf_counter()
    model = None
    try:
        _free()
        base = _allocated()
        t0 = time.perf_counter()
        model = _build(ctx)
        with torch.inference_mode(False), torch.no_grad():
            out = method.apply(model, ctx)
        model = out if isinstance(out, nn.Module) else model
        ctx.sync()
        setup_s = time.perf_counter() - t0
        _free()
        weights = _allocated() - base if ctx.cuda else None
        sbytes = state_bytes(model, cuda_only=ctx.cuda)
        stray = stray_cuda_tensors(model) if ctx.cuda else None
        backend = _svdq_backend(model, ctx)
        for row in rows:
            row.update(setup_s=round(setup_s, 2), weights_bytes=weights, state_bytes=sbytes)
            row["stray_cuda_tensors"] = stray
            if backend:
                row["svdq_backend"] = backend
        for row in rows:
            mode = row["mode"]
            if mode == "cudagraph" and not ctx.cuda:
                row.update(status="skipped", reason="CUDA graphs need a CUDA device")
                continue
            try:
                for b in ctx.batches:
                    kw = ctx.inputs(b)
                    fn_model: Any = model
                    if mode == "compile":  # one static-shape compilation per batch size
                        torch._dynamo.reset()
                        fn_model = torch.compile(
                            model,
                            mode=args.compile_mode,
                            backend=args.compile_backend,
                            dynamic=False,
                        )
                    with torch.inference_mode():
                        if mode == "cudagraph":
                            model(**kw)  # eager warm-up (autotuning) before capture
                            ctx.sync()
                            step = _graph_step(model, kw)
                        else:
                            step = lambda m=fn_model, kw=kw: m(**kw)  # noqa: E731
                        res = time_steps(step, ctx)
                    peak = res.pop("peak_abs_bytes")
                    row["latency_ms"][f"b{b}"] = round(res["median_ms"], 3)
                    row["latency"][f"b{b}"] = res
                    row["step_peak_bytes"][f"b{b}"] = None if peak is None else peak - base
                    if mode == "compile":
                        row.setdefault("compile_s", {})[f"b{b}"] = round(
                            res["first_call_s"] - res["median_ms"] / 1e3, 2
                        )
                    if mode == "eager" and method.name in ctx.profile_rows and b == ctx.batches[0]:
                        with torch.inference_mode():
                            row[f"profile_b{b}"] = profile_step(step, ctx)
                    if args.ab_sets and mode != "compile":
                        row.setdefault("ab", {"set": list(args.ab_sets)})[f"b{b}"] = ab_times(
                            model, kw, mode, ctx, args.ab_parsed, res["median_ms"]
                        )
                    del step, fn_model
                    _free()
                row["status"] = "ok"
            except Exception as e:
                _record_error(row, e)
            finally:
                if mode == "compile":
                    torch._dynamo.reset()
                _free()
    except Exception as e:
        for row in rows:
            if row["status"] == "pending":
                _record_error(row, e)
    finally:
        del model
        _free()
    wall = time.perf_counter() - t_row
    for row in rows:
        row["row_wall_s"] = round(wall, 2)
    return rows


def ab_times(
    model: nn.Module,
    kw: dict[str, Any],
    mode: str,
    ctx: Ctx,
    sets: Sequence[tuple[Any, str, Any]],
    default_ms: float,
) -> dict[str, Any]:
    """The step with the engine constants ``sets`` (``probe_layer.parse_set``'s
    (module, name, value)) set and without, alternated twice
    after the row's own timing (``default_ms``), on the same model in the same process —
    one path against another without the host-to-host spread of separate runs (v35:
    eager steps of one commit 132-229 ms in different processes). CUDA-graph mode
    captures a new graph each way (the constants are read while the step is traced).
    A constant of ``svdquant.lora`` (``lora.RANK_MULTIPLE``) is read where a LoRA's rows
    are stacked into a layer: the loaded LoRAs are stacked again each way."""
    olds = [(m, n, getattr(m, n)) for m, n, _ in sets]
    restack = any(m.__name__ == "svdquant.lora" for m, _, _ in sets)
    out: dict[str, Any] = {"default_ms": [round(default_ms, 3)], "set_ms": []}
    try:
        for _ in range(2):
            for way in ("set_ms", "default_ms"):
                for (m, n, v), (_, _, old) in zip(sets, olds, strict=True):
                    setattr(m, n, v if way == "set_ms" else old)
                if restack:
                    _restack_loras(model)
                with torch.inference_mode():
                    if mode == "cudagraph":
                        model(**kw)  # eager warm-up of this path (autotuning) before capture
                        ctx.sync()
                        step = _graph_step(model, kw)
                    else:
                        step = lambda kw=kw: model(**kw)  # noqa: E731
                    out[way].append(round(time_steps(step, ctx)["median_ms"], 3))
                del step
                _free()
    finally:
        for m, n, old in olds:
            setattr(m, n, old)
        if restack:
            _restack_loras(model)
    out["set_vs_default"] = round(min(out["default_ms"]) / min(out["set_ms"]), 4)
    return out


def _restack_loras(model: nn.Module) -> None:
    """Stack each loaded LoRA into its layers again, as the ``svdquant.lora`` constants now
    say: its strength set to what it is (a fused model is unfused for it and fused again)."""
    import svdquant

    for info in svdquant.list_loras(model):
        svdquant.set_lora_strength(model, info.name, info.strength)


def run_isolated(
    method: Method, modes: Sequence[str], args: argparse.Namespace, time_left: float
) -> list[dict[str, Any]]:
    """``run_method`` in a child process (this script with ``--rows NAME --no-isolate``);
    its rows are read back from the JSON it writes. A child that crashes or runs out of
    time gives rows with the error, and the parent goes on."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rows", method.name]
        cmd += ["--no-isolate", "--out", tmp, "--budget-s", "inf", "--batches", args.batches]
        cmd += ["--warmup", str(args.warmup), "--profile-rows", args.profile_rows]
        cmd += ["--steps", str(args.steps)] if args.steps else []
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--no-cuda-graphs"] if "cudagraph" not in modes else []
        cmd += [f"--set={spec}" for spec in args.sets]
        cmd += [f"--ab={spec}" for spec in args.ab_sets]
        cmd += [f"--lora-rank={args.lora_rank}"]
        if args.fp8_weights_gib is not None:
            cmd += [f"--fp8-weights-gib={args.fp8_weights_gib}"]
        try:
            limit = max(time_left, 1.0) if math.isfinite(time_left) else None
            subprocess.run(cmd, timeout=limit, check=False)
            rows = json.loads(next(Path(tmp).glob("*.json")).read_text())["rows"]
        except Exception as e:  # a crash, a time-out, no JSON
            rows = [_row_base(method, m, args.compile_mode) for m in modes]
            for row in rows:
                _record_error(row, e)
    return rows


def _record_error(row: dict[str, Any], e: BaseException) -> None:
    msg = f"{type(e).__name__}: {e}"
    row.update(status="error", error=msg[:2000], traceback=traceback.format_exc()[-4000:])
    print(f"  {row['name']}: error: {msg.splitlines()[0][:300]}", file=sys.stderr)


def _svdq_backend(model: nn.Module, ctx: Ctx) -> str | None:
    try:
        from svdquant import kernels
        from svdquant.nn import SVDQLinear
    except Exception:
        return None
    for m in model.modules():
        if isinstance(m, SVDQLinear):
            return kernels.resolve_backend(m.backend, torch.device(ctx.device))
    return None


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Speedups against the eager BF16 and eager NF4 rows of the same run, and against the
    BF16 and NF4 rows of the same mode (CUDA graph / compiled) where they exist: the fair
    comparison, since a user who runs us with CUDA graphs would run BF16 with them too."""
    ok = {r["name"]: r for r in rows if r["status"] == "ok"}
    bf16, nf4 = ok.get("bf16"), ok.get("nf4")
    for r in rows:
        if r["status"] != "ok":
            continue
        same = ok.get("bf16" if r["mode"] == "eager" else f"bf16+{r['mode']}")
        same_nf4 = ok.get("nf4" if r["mode"] == "eager" else f"nf4+{r['mode']}")
        for key, ref in (
            ("vs_bf16", bf16),
            ("vs_nf4", nf4),
            ("vs_bf16_same_mode", same),
            ("vs_nf4_same_mode", same_nf4),
        ):
            r[f"speedup_{key}"] = {
                b: round(ref["latency_ms"][b] / t, 3)
                for b, t in r["latency_ms"].items()
                if ref is not None and b in ref["latency_ms"] and t > 0
            }
        if bf16 is not None and r.get("state_bytes"):
            r["bf16_over_state_bytes"] = round(bf16["state_bytes"] / r["state_bytes"], 3)
        if bf16 is not None and r.get("weights_bytes") and bf16.get("weights_bytes"):
            r["bf16_over_weights_bytes"] = round(bf16["weights_bytes"] / r["weights_bytes"], 3)


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 6's goals for our W4A4 int4 rows: >= 1.4x BF16 per step at batch 1, weights
    <= 1/3.5 of BF16's, >= 3x NF4 — against BF16 / NF4 run the same way (CUDA graph vs
    CUDA graph, compiled vs compiled); None where that baseline row was not run."""
    out = []
    for r in rows:
        if r["method"] not in ("svdq-int4", "svdq-int4-fused") or r["status"] != "ok":
            continue
        x_bf16 = r.get("speedup_vs_bf16_same_mode", {}).get("b1")
        x_nf4 = r.get("speedup_vs_nf4_same_mode", {}).get("b1")
        # the weights: parameters and buffers. The allocator's figure after the build
        # also holds ~52 MiB of library workspace that is no tensor of the model (NF4's
        # row has the same; v10), reported beside it.
        mem = r.get("bf16_over_state_bytes")
        out.append(
            {
                "row": r["name"],
                "x_bf16_b1": x_bf16,
                "x_bf16_b1_met": None if x_bf16 is None else x_bf16 >= 1.4,
                "bf16_over_weights": mem,
                "weights_met": None if mem is None else mem >= 3.5,
                "bf16_over_allocated_after_build": r.get("bf16_over_weights_bytes"),
                "x_nf4_b1": x_nf4,
                "x_nf4_b1_met": None if x_nf4 is None else x_nf4 >= 3.0,
            }
        )
    return out


# --------------------------------------------------------------------------- output


def _commit() -> str | None:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:  # the device's copy of the tree has no .git: the caller passes GIT_COMMIT
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE, check=False
        )
    except OSError:
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _device_name(ctx: Ctx) -> str:
    if ctx.cuda:
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def _device_tag(ctx: Ctx) -> str:
    if not ctx.cuda:
        return "tiny-cpu" if ctx.tiny else "cpu"
    m = re.search(r"\b([A-Z]+\d{2,4}[A-Z]?)\b", torch.cuda.get_device_name())
    tag = (m.group(1) if m else "gpu").lower()
    return f"tiny-{tag}" if ctx.tiny else tag


def _gib(b: int | None) -> str:
    if b is None:
        return "–"
    return f"{b / GiB:.2f}" if b >= GiB / 100 else f"{b / GiB:.2g}"


def _ms(r: dict[str, Any], b: str) -> str:
    t = r["latency_ms"].get(b)
    return "–" if t is None else f"{t:.1f}" if t >= 10 else f"{t:.2f}"


def _x(r: dict[str, Any], key: str, b: str) -> str:
    v = r.get(f"speedup_{key}", {}).get(b)
    return "–" if v is None else f"{v:.2f}x"


def markdown_table(res: dict[str, Any]) -> str:
    bs = [f"b{b}" for b in res["batches"]]
    head = ["row", "mode"]
    head += [f"ms/step {b}" for b in bs]
    head += [f"x BF16 {b}" for b in bs] + [f"x NF4 {bs[0]}", f"x eager BF16 {bs[0]}"]
    head += ["weights GiB", "allocated GiB", *(f"step peak GiB {b}" for b in bs), "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        w = r.get("state_bytes")
        status = r["status"]
        if status != "ok":
            why = r.get("reason") or r.get("error") or ""
            status = f"{status}: {why[:70]}"
        cells = [r["label"], r["mode"] + (f" ({r['compile_mode']})" if r["compiled"] else "")]
        cells += [_ms(r, b) for b in bs]
        cells += [_x(r, "vs_bf16_same_mode", b) for b in bs]
        cells += [_x(r, "vs_nf4_same_mode", bs[0]), _x(r, "vs_bf16", bs[0])]
        cells += [_gib(w) if r["status"] == "ok" else "–"]
        cells += [_gib(r.get("weights_bytes")) if r["status"] == "ok" else "–"]
        cells += [_gib(r["step_peak_bytes"].get(b)) for b in bs]
        cells += [status.replace("|", "/").replace("\n", " ")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """Latency per step (each batch size) and memory (weights, step peak) per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if r["status"] == "ok"]
    bs = [f"b{b}" for b in res["batches"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.45 * max(len(rows), 3)))
    labels = [f"{r['label']} [{r['mode']}]" for r in rows]
    ys = range(len(rows))
    h = 0.8 / max(len(bs), 1)
    for i, b in enumerate(bs):
        vals = [r["latency_ms"].get(b, 0.0) for r in rows]
        ax1.barh([y + i * h for y in ys], vals, height=h, label=f"batch {b[1:]}")
    ax1.set_xlabel("denoiser ms / step (median)")
    mem = [("weights", lambda r: r.get("state_bytes") or 0)]
    if res["device_type"] == "cuda":
        mem += [(f"step peak {b}", lambda r, b=b: r["step_peak_bytes"].get(b) or 0) for b in bs]
    h2 = 0.8 / len(mem)
    for i, (name, get) in enumerate(mem):
        ax2.barh([y + i * h2 for y in ys], [get(r) / GiB for r in rows], height=h2, label=name)
    ax2.set_xlabel("GPU memory GiB" if res["device_type"] == "cuda" else "weights GiB (CPU)")
    for ax, hh, n in ((ax1, h, len(bs)), (ax2, h2, len(mem))):
        ax.set_yticks([y + (n - 1) * hh / 2 for y in ys], labels if ax is ax1 else [""] * len(rows))
        ax.invert_yaxis()
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(axis="x", alpha=0.3)
    if not rows:
        ax1.text(0.5, 0.5, "no row measured", ha="center", transform=ax1.transAxes)
    fig.suptitle(f"FLUX.1-dev denoiser step ({res['config']}), {res['device']}, {res['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res: dict[str, Any], json_path: Path) -> None:
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(json_path)  # a kill mid-write leaves the previous, complete file


def write_run(
    bench: str, ctx: Ctx, date: datetime.datetime, out: str, body: dict[str, Any]
) -> tuple[dict[str, Any], Path]:
    """A smaller benchmark's result (``bench/models.py``, ``bench/offload.py``): the run's
    head (device, date, commit, torch) and ``body``, written atomically as
    ``<out>/<bench>-<device>-<date>.json``."""
    res = {
        "bench": bench,
        "device": _device_name(ctx),
        "date": date.isoformat(timespec="seconds"),
        "commit": _commit(),
        "torch": torch.__version__,
        **body,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / f"{bench}-{_device_tag(ctx)}-{date:%Y-%m-%d-%H%M}.json"
    write(res, path)
    return res, path


def _plot_and_write(res: dict[str, Any], json_path: Path, png_path: Path, t0: float) -> None:
    try:
        plot(res, png_path)
        res["plot"], res["plot_error"] = png_path.name, None
    except Exception as e:
        res["plot"], res["plot_error"] = None, f"{type(e).__name__}: {e}"
        print(f"e2e: no plot: {res['plot_error']}", file=sys.stderr)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    write(res, json_path)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results"))
    p.add_argument("--tiny", action="store_true", help="1-block model, few tokens (CPU check)")
    p.add_argument("--rows", default=None, help=f"comma-separated subset of {', '.join(ORDER)}")
    p.add_argument("--compile", action="store_true", help="also run torch.compile'd variants")
    p.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode (default, max-autotune-no-cudagraphs, reduce-overhead)",
    )
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument(
        "--compile-rows", default=None, help="rows to compile (default: the same as --rows)"
    )
    p.add_argument(
        "--no-cuda-graphs", action="store_true", help="skip the CUDA-graph replay of each eager row"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip the remaining rows when less wall time is left than a row needs "
        "(default 540 for the full-size model, none with --tiny; 'inf': no limit)",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; tiny 2)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1)")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--tag", default=None, help="added to the output file names")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="sets",
        metavar="MOD.NAME=VALUE",
        help="set an engine constant of svdquant.kernels.MOD for every row (repeatable)",
    )
    p.add_argument(
        "--ab",
        action="append",
        default=[],
        dest="ab_sets",
        metavar="MOD.NAME=VALUE",
        help="also time each eager / CUDA-graph row with these engine constants set, on the "
        "same model in the same process, alternated with the default (repeatable: all set "
        "together)",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=LORA_RANK,
        help="rank of the random LoRA the svdq-int4-lora / svdq-int4-fused-lora rows load on "
        f"every quantized layer (default {LORA_RANK})",
    )
    p.add_argument(
        "--fp8-weights-gib",
        type=float,
        default=None,
        help="the svdq-int4-fused-fp8w row keeps the fp8 weights of its smallest layers "
        "within this many GiB (default: every layer)",
    )
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each row in its own process (default on the GPU: a failed CUDA-graph "
        "capture leaves the CUDA RNG unusable for every later row of the process)",
    )
    p.add_argument(
        "--profile-rows",
        default="bf16,svdq-int4,svdq-int4-fused",
        help="eager rows whose first batch size gets a per-op profile of one step ('' = none)",
    )
    return p.parse_args(argv)


def _select(spec: str | None) -> list[str]:
    if not spec:
        return list(ORDER)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ORDER)}")
    return [n for n in ORDER if n in names]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.lora_rank < 1:
        raise SystemExit(f"--lora-rank must be at least 1, got {args.lora_rank}")
    if args.fp8_weights_gib is not None and args.fp8_weights_gib < 0:
        raise SystemExit(f"--fp8-weights-gib must be >= 0, got {args.fp8_weights_gib}")
    global LORA_RANK, FP8_WEIGHTS_GIB
    LORA_RANK, FP8_WEIGHTS_GIB = args.lora_rank, args.fp8_weights_gib
    args.ab_parsed = []
    if args.sets or args.ab_sets:  # both read before any model is built: a typo fails now
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from probe_layer import merge_sets, parse_set

        for module, name, value in merge_sets([parse_set(s) for s in args.sets]):
            setattr(module, name, value)
        args.ab_parsed = merge_sets([parse_set(s) for s in args.ab_sets])
    cuda = torch.cuda.is_available() and not args.tiny
    dev = "cuda" if cuda else "cpu"
    if args.tiny and torch.cuda.is_available():
        dev = "cuda"  # a tiny model on a GPU machine still runs there
    ctx = Ctx(
        device=dev,
        tiny=args.tiny,
        cfg=TINY if args.tiny else FLUX_DEV,
        img_tokens=64 if args.tiny else 4096,
        txt_tokens=16 if args.tiny else 512,
        batches=tuple(int(b) for b in args.batches.split(",")),
        steps=args.steps or (2 if args.tiny else 5),
        warmup=max(1, args.warmup),
        profile_rows=tuple(r for r in args.profile_rows.split(",") if r),
    )
    if args.budget_s is None and not args.tiny:
        args.budget_s = DEFAULT_BUDGET_S
    if not args.tiny and not ctx.cuda:
        raise SystemExit(
            "e2e: no CUDA device: the full-size model (24 GB in bf16) needs a GPU; "
            "--tiny runs a 1-block model on the CPU"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = datetime.datetime.now(datetime.UTC)
    stem = f"e2e-{_device_tag(ctx)}-{date:%Y-%m-%d-%H%M}" + (f"-{args.tag}" if args.tag else "")
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    try:
        import triton

        triton_v = triton.__version__
    except Exception:
        triton_v = None
    res: dict[str, Any] = {
        "bench": "e2e",
        "device": _device_name(ctx),
        "device_type": ctx.device,
        "date": date.isoformat(timespec="seconds"),
        "commit": _commit(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton_v,
            "diffusers": _version("diffusers"),
            "svdquant": _version("svdquant"),
            "bitsandbytes": _version("bitsandbytes"),
            "torchao": _version("torchao"),
        },
        "config": "tiny" if args.tiny else "FLUX.1-dev",
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in ctx.cfg.items()},
        "image_tokens": ctx.img_tokens,
        "text_tokens": ctx.txt_tokens,
        "batches": list(ctx.batches),
        "steps": ctx.steps,
        "warmup": ctx.warmup,
        "timer": "cuda events" if ctx.cuda else "time.perf_counter",
        "budget_s": args.budget_s,
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "sets": list(args.sets),
        "lora_rank": args.lora_rank,
        "fp8_weights_gib": args.fp8_weights_gib,
        "notes": (
            "random weights (speed and memory only); quantized rows quantize every linear "
            "inside the transformer blocks, embedders and proj_out stay bf16; ours: "
            "alpha 0.5, rank 32, one synthetic calibration run; weights_bytes: allocator "
            "bytes of the model after the method was applied (garbage, cached blocks and "
            "cuBLAS workspaces freed first); state_bytes: its parameters and buffers; "
            "step_peak_bytes: max_memory_allocated during one step above the pre-build "
            "baseline (weights included); speedup_vs_*_same_mode: against the bf16 / nf4 "
            "row of this run timed the same way (eager, CUDA graph or compiled)"
        ),
        "rows": [],
    }
    plan: list[tuple[Method, tuple[str, ...]]] = []
    eager_modes = ("eager",) if args.no_cuda_graphs else ("eager", "cudagraph")
    plan += [(METHODS[n], eager_modes) for n in _select(args.rows)]
    if args.compile:
        plan += [(METHODS[n], ("compile",)) for n in _select(args.compile_rows or args.rows)]
    measured_wall: dict[str, float] = {}
    isolate = ctx.cuda if args.isolate is None else args.isolate
    if isolate and args.budget_s is None:
        args.budget_s = float("inf")
    for b in ctx.batches:  # made once, before any memory is measured
        ctx.inputs(b)
    for method, modes in plan:
        if "cudagraph" in modes and not ctx.cuda:
            modes = ("eager",)
        reason = method.missing(ctx)
        elapsed = time.perf_counter() - t_start
        est = measured_wall.get(
            method.name, measured_wall.get(method.library, 0.0 if args.tiny else method.est_s)
        )
        if "compile" in modes and not args.tiny:
            est += COMPILE_EST_S * len(ctx.batches)
        if reason is None and args.budget_s is not None and elapsed + est > args.budget_s:
            reason = (
                f"budget: {args.budget_s - elapsed:.0f} s of --budget-s {args.budget_s:.0f} "
                f"left, the row needs about {est:.0f} s"
            )
        print(f"[{elapsed:6.1f} s] {method.name} {'/'.join(modes)}", flush=True)
        if reason is not None:
            rows = [_row_base(method, m, args.compile_mode) for m in modes]
            for r in rows:
                r.update(status="skipped", reason=reason)
            print(f"  skipped: {reason}", flush=True)
        elif isolate and "compile" not in modes:
            rows = run_isolated(method, modes, args, args.budget_s - elapsed)
        else:
            rows = run_method(method, ctx, modes, args)
            if "compile" not in modes:
                measured_wall[method.name] = rows[0]["row_wall_s"]
                measured_wall.setdefault(method.library, rows[0]["row_wall_s"])
            for r in rows:
                if r["status"] == "ok":
                    lat = ", ".join(f"{b} {t:.2f} ms" for b, t in r["latency_ms"].items())
                    print(f"  {r['name']}: {lat}", flush=True)
        res["rows"] += rows
        add_speedups(res["rows"])
        res["goals"] = goals(res["rows"])
        # after every row: a run killed at its time limit keeps what it had measured
        _plot_and_write(res, json_path, png_path, t_start)
    res["json"] = str(json_path)
    if not plan:
        _plot_and_write(res, json_path, png_path, t_start)
    print(f"\nwrote {json_path}" + (f" and {png_path.name}" if res["plot"] else ""))
    print(f"\n{res['config']} denoiser step, {res['device']}, {res['date']}, "
          f"commit {(res['commit'] or '?')[:10]}\n")  # fmt: skip
    for g in res.get("goals", []):
        print(
            f"goals ({g['row']}): x BF16 b1 {g['x_bf16_b1']} [>= 1.4], BF16/weights "
            f"{g['bf16_over_weights']} [>= 3.5], x NF4 b1 {g['x_nf4_b1']} [>= 3]"
        )
    for r in res["rows"]:
        prof = next((v for k, v in r.items() if k.startswith("profile_b")), None)
        if prof:
            ops = ", ".join(f"{o['name'][:40]} {o['self_ms']:.1f}" for o in prof["ops"][:6])
            print(f"profile {r['name']} ({prof['time']}, ms): total {prof['total_ms']:.1f}: {ops}")
    for r in res["rows"]:
        for b, ab in (r.get("ab") or {}).items():
            if b != "set":
                sets = "; ".join(r["ab"]["set"])
                print(f"A/B {r['name']} {r['mode']} {b} ({sets}): default "
                      f"{ab['default_ms']} ms, set {ab['set_ms']} ms: set "
                      f"{ab['set_vs_default']:.3f}x as fast")  # fmt: skip
    print()
    print(markdown_table(res))
    return res


if __name__ == "__main__":
    main()
