"""The whole layer (or one of its kernels) with engine constants set two ways, on the GPU.

    PYTHONPATH=src python bench/probe_layer.py --set 'widen.TILE=(32, 512, 4)' \\
        [--set ...] [--what layer|quantize|widen|gemv|kept] [--ms 512,1024,4608] \\
        [--shapes 3072x3072,...] [--rank R] [--mlp [--rank2 R2]] [--out DIR]

Each ``--set module.NAME=VALUE`` names a constant of a module under
``svdquant.kernels`` (or one entry of a dict constant: ``gemv.TILES['dp4a']``) and a
Python literal. The layer (quantize + widen + GEMM + low-rank +
bias, ``ops.svdq_linear_triton``) is replayed from a CUDA graph with today's constants
("default") and with the overrides ("set"), alternated twice, against BF16 ``F.linear``
of the same run, at each M and (N, K) of ``bench/gemm.py`` (``--rank``: the low-rank
branch's rank instead of the model's 32, e.g. a loaded LoRA's); ``--mlp`` adds the fused MLP
pair (fc1 3072 -> 12288, GELU-tanh, fc2; ``--rank`` for both, ``--rank2`` fc2's apart: fc1's
epilogue sums fc2's low-rank down, so a LoRA on fc1 alone is ``--rank 96 --rank2 32``).
``--what quantize`` times
the activation quantize alone (x [M, K], rank 32 or ``--rank``: e.g. ``--rank 96 --set
quantize.SPLIT_RANK=True``), ``--what widen`` the weight widen alone (M unused;
BF16 is then the layer's ``F.linear``, for scale) and ``--what gemv`` the W4A16 path
(``w4a16_linear``: 16-bit activations, the modulation linears; e.g. ``--ms 1,4 --shapes
18432x3072``); ``--what kept`` the layer with its widened weight kept (quantize + GEMM,
``keep_fp8_weights``). Outputs are compared between the two ways (the
low-rank sums meet through atomics: equal to rounding, not bit for bit). A probe of
constants read at launch time; the GEMM's autotuned tiles are kept per shape (its key
includes ``TMA`` and the tail, not the other constants).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gemm import NKS, Layer, bench_graph, mlp_bf16, run_info, write_result

from svdquant.kernels.ops import _act_scale, svdq_mlp_triton
from svdquant.kernels.quantize import quantize_act
from svdquant.kernels.widen import widen_weight

WHAT = ("layer", "quantize", "widen", "gemv", "kept")


def _first(out):
    """A comparable tensor from an op's output (its first, viewed as numbers)."""
    t = out[0] if isinstance(out, tuple) else out
    return t.float()


def _with_rank(layer: Layer, rank: int) -> Layer:
    """``layer`` with a random low-rank branch of ``rank`` (a merged LoRA's total)."""
    g = torch.Generator(device="cuda").manual_seed(rank)
    n, k = layer.out_features, layer.in_features
    layer.down = (torch.randn(rank, k, device="cuda", generator=g) / k**0.5).bfloat16()
    layer.up = (torch.randn(n, rank, device="cuda", generator=g) * 0.02).bfloat16()
    layer.lowrank_down, layer.lowrank_up = layer.down, layer.up
    return layer


def _case(what: str, layer: Layer, x: torch.Tensor):
    """The function ``--what`` times on ``layer`` and input ``x``."""
    if what == "quantize":
        s = _act_scale(layer.act_amax)  # S as the engine computes it
        kp = layer.qweight.shape[1] * 2
        return lambda: quantize_act(x, layer.smooth, layer.down, s, kp, layer.act_fmt)
    if what == "widen":
        return lambda: widen_weight(layer.qweight, layer.wscales, layer.wtensor_scale, layer.fmt)
    if what == "gemv":
        return lambda: layer.w4a16(x)
    if what == "kept":  # the layer with its widened weight kept (``keep_fp8_weights``)
        kept = widen_weight(layer.qweight, layer.wscales, layer.wtensor_scale, layer.fmt)
        return lambda: layer(x, kept=kept)
    return lambda: layer(x)


def _engine_module(name: str) -> Any:
    """``svdquant.kernels.<name>`` (``widen``), else ``svdquant.<name>`` (``fuse``)."""
    try:
        return importlib.import_module(f"svdquant.kernels.{name}")
    except ModuleNotFoundError:
        try:
            return importlib.import_module(f"svdquant.{name}")
        except ModuleNotFoundError:
            raise SystemExit(f"no module svdquant.kernels.{name} or svdquant.{name}") from None


def parse_set(spec: str) -> tuple[Any, str, Any]:
    """``"widen.TILE=(8, 512, 2)"`` -> (the module, ``"TILE"``, the value); an entry of a
    dict constant, ``"gemv.TILES['dp4a']=(16, 512, 2)"``, -> (the module, ``"TILES"``, a
    copy of the dict with that entry replaced). Modules of ``svdquant.kernels`` first,
    then of ``svdquant`` (``"fuse.GENERIC_CONTIGUOUS=True"``)."""
    target, sep, literal = spec.partition("=")
    mod_name, _, name = target.strip().rpartition(".")
    if not sep or not mod_name:
        raise SystemExit(f"--set wants module.NAME=VALUE, got {spec!r}")
    name, bracket, key = name.partition("[")
    module = _engine_module(mod_name)
    if not hasattr(module, name):
        raise SystemExit(f"{module.__name__} has no constant {name!r}")
    try:
        value = ast.literal_eval(literal.strip())
        if bracket:
            key = ast.literal_eval(key.removesuffix("]"))
    except (ValueError, SyntaxError) as e:
        raise SystemExit(f"--set {target}: {literal!r} is not a Python literal ({e})") from e
    if bracket:
        table = getattr(module, name)
        if not isinstance(table, dict) or key not in table:
            raise SystemExit(f"{module.__name__}.{name} has no entry {key!r}")
        value = {**table, key: value}
    return module, name, value


def merge_sets(sets: list[tuple[Any, str, Any]]) -> list[tuple[Any, str, Any]]:
    """Several entries of one dict constant set as one dict (each ``parse_set`` copied
    the whole dict with its own entry replaced)."""
    merged: dict[tuple[int, str], tuple[Any, str, Any]] = {}
    for module, name, value in sets:
        old = merged.get((id(module), name))
        if old is not None and isinstance(value, dict):
            original = getattr(module, name)
            value = {**old[2], **{k: v for k, v in value.items() if v != original.get(k)}}
        merged[id(module), name] = (module, name, value)
    return list(merged.values())


@contextlib.contextmanager
def constants(sets: list[tuple[Any, str, Any]]) -> Iterator[None]:
    """The engine constants ``sets`` (``parse_set``'s triples) set inside the block and
    restored after it, whatever happens inside."""
    olds = [(m, n, getattr(m, n)) for m, n, _ in sets]
    try:
        for m, n, v in sets:
            setattr(m, n, v)
        yield
    finally:
        for m, n, v in reversed(olds):
            setattr(m, n, v)


def with_constants(fn, sets: list[tuple[Any, str, Any]]):
    """``fn`` as a function that runs it with the engine constants ``sets`` (so a CUDA
    graph captured from it takes that route)."""

    def run(*args, **kwargs):
        with constants(sets):
            return fn(*args, **kwargs)

    return run


def _both(fn, sets) -> tuple[dict, dict]:
    """``fn()`` and its CUDA-graph time both ways, alternated twice."""
    defaults = [(m, n, getattr(m, n)) for m, n, _ in sets]
    outs, times = {}, {}
    try:
        for i in range(2):
            for way in ("default", "set"):
                for (m, n, v), (_, _, new) in zip(defaults, sets, strict=True):
                    setattr(m, n, new if way == "set" else v)
                outs[way] = fn()
                times[f"{way}_us_{i}"] = bench_graph(fn)
    finally:
        for m, n, v in defaults:
            setattr(m, n, v)
    return outs, times


def _row(fn, bf16, sets, **head) -> dict:
    outs, row = _both(fn, sets)
    a, b = _first(outs["default"]), _first(outs["set"])
    row.update(head, bf16_us=bench_graph(bf16), rel_diff=((b - a).norm() / a.norm()).item())
    for way in ("default", "set"):
        row[f"{way}_x"] = row["bf16_us"] / min(row[f"{way}_us_0"], row[f"{way}_us_1"])
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="MOD.NAME=VALUE")
    p.add_argument("--ms", default="512,1024,4608")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in NKS))
    p.add_argument("--what", choices=WHAT, default="layer", help="what to time")
    p.add_argument("--mlp", action="store_true", help="also the fused MLP pair")
    p.add_argument("--rank", type=int, default=None, help="the low-rank branch's rank")
    p.add_argument("--rank2", type=int, default=None, help="the MLP's fc2 rank (default --rank)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    if not a.sets:
        raise SystemExit("nothing to compare: give at least one --set module.NAME=VALUE")
    sets = merge_sets([parse_set(s) for s in a.sets])
    rank2 = a.rank if a.rank2 is None else a.rank2
    result = {**run_info(), "set": a.sets, "what": a.what, "rank": a.rank, "rank2": rank2,
              "rows": []}  # fmt: skip
    print(f"{a.what}, set:", "; ".join(a.sets))
    print(f"{'M':>5} {'N':>6} {'K':>6} | bf16 us | default x2      | set x2          | "
          "set vs default, x BF16 default -> set")  # fmt: skip
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    for m in (int(v) for v in a.ms.split(",")):
        cases = []
        for n, k in shapes:
            layer, x = Layer(n, k), torch.randn(m, k, device="cuda").bfloat16()
            layer = layer if a.rank is None else _with_rank(layer, a.rank)
            cases.append((n, k, _case(a.what, layer, x),
                          lambda la=layer, t=x: F.linear(t, la.w16, la.bias)))  # fmt: skip
        if a.mlp and a.what == "layer":
            fc1, fc2 = Layer(12288, 3072, seed=1), Layer(3072, 12288, seed=2)
            fc1 = fc1 if a.rank is None else _with_rank(fc1, a.rank)
            fc2 = fc2 if rank2 is None else _with_rank(fc2, rank2)
            x = torch.randn(m, 3072, device="cuda").bfloat16()
            cases.append(("mlp", 3072, lambda x=x, f1=fc1, f2=fc2: svdq_mlp_triton(x, f1, f2),
                          lambda x=x, f1=fc1, f2=fc2: mlp_bf16(x, f1, f2)))  # fmt: skip
        for n, k, fn, bf16 in cases:
            r = _row(fn, bf16, sets, M=m, N=n, K=k)
            result["rows"].append(r)
            best = {w: min(r[f"{w}_us_0"], r[f"{w}_us_1"]) for w in ("default", "set")}
            print(f"{m:5d} {n!s:>6} {k:6d} | {r['bf16_us']:7.1f} | "
                  f"{r['default_us_0']:7.1f} {r['default_us_1']:7.1f} | "
                  f"{r['set_us_0']:7.1f} {r['set_us_1']:7.1f} | "
                  f"{best['default'] / best['set']:.3f}x  {r['default_x']:.3f} -> "
                  f"{r['set_x']:.3f}  diff {r['rel_diff']:.1e}", flush=True)  # fmt: skip
    print("->", write_result(result, a.out, "probe_layer"))


if __name__ == "__main__":
    main()
