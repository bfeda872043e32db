"""Whole images of the FLUX.1-dev denoiser under CPU offload: what ``svdquant generate
--cpu-offload`` costs (the path of a GPU too small for the whole pipeline).

    PYTHONPATH=src python bench/offload.py [--steps 28] [--images 2] [--out DIR] [--tiny]

Builds the full-size FLUX.1-dev transformer (real config, random bf16 weights) on the
GPU, quantizes it as ``bench/e2e.py``'s ``svdq-int4`` row does, and runs ``--images``
images of ``--steps`` denoiser steps (1024x1024: 4096 image tokens, 512 text tokens,
batch 1) four ways on that one model, in this order:

- ``offload-eager-unfused``: under accelerate's ``cpu_offload_with_hook`` (what
  ``enable_model_cpu_offload`` installs), eager, diffusers' own blocks — how ``generate
  --cpu-offload`` ran before v38;
- ``offload-fused-graphed``: fused (``svdquant.fuse_projections``, on the CPU), wrapped
  in ``svdquant.cuda_graphed``, then offloaded — how it runs since v38;
- ``offload-fused-graphed-host-copy``: the same with ``svdquant.keep_host_copy`` (pinned
  host copies: moved in at the link's speed, out without copying);
- ``resident-fused-graphed``: the same wrapper with the weights kept on the GPU (no
  offload): the floor under the others.

An image's time is its steps' wall time (the first step moves the weights in; under
``cuda_graphed`` the second captures) plus moving the weights out again (what the
pipeline does before the VAE runs), with the GPU synchronized; one step of each layer
set runs first (the GEMM's tile picks, kept on disk after a first run). Writes
``offload-<device>-<date>.json`` under ``--out`` (default ``bench/results``, or ``$OUT``)
and prints a table last. ``--tiny``: a 1-block model on the CPU, 3 steps (the hooks move
nothing): what ``tests/test_bench.py`` runs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e


def _images(model: nn.Module, ctx: e2e.Ctx, n: int, steps: int, hook: Any) -> dict[str, Any]:
    """``n`` images of ``steps`` steps: each image's seconds, its first step's and its
    later steps' milliseconds, and the CUDA-graph captures made (``cuda_graphed``)."""
    from svdquant.cuda_graph import CUDAGraphed

    kw = ctx.inputs(1)
    wrapper = next((m for m in model.modules() if isinstance(m, CUDAGraphed)), None)
    captures = []
    if wrapper is not None:
        real = wrapper._capture
        wrapper._capture = lambda *a, **k: captures.append(1) or real(*a, **k)
    images, first, later = [], [], []
    for _ in range(n):
        ctx.sync()
        t_image = time.perf_counter()
        for s in range(steps):
            t = time.perf_counter()
            model(**kw)
            ctx.sync()
            (first if s == 0 else later).append((time.perf_counter() - t) * 1e3)
        if hook is not None:
            hook.offload()  # the weights back to the CPU, as before the pipeline's VAE
            ctx.sync()
        images.append(time.perf_counter() - t_image)
    if wrapper is not None:
        del wrapper._capture  # the class's own again
    return {
        "captures": len(captures) if wrapper is not None else None,
        "image_s": [round(x, 3) for x in images],
        "first_step_ms": [round(x, 1) for x in first],
        "later_step_ms_median": round(statistics.median(later), 2) if later else None,
    }


def run(ctx: e2e.Ctx, images: int, steps: int) -> list[dict[str, Any]]:
    from accelerate import cpu_offload_with_hook

    import svdquant

    model = e2e._build(ctx)
    e2e._ours("int4", None)(model, ctx)
    # the GEMM's tile picks for both layer sets, as on a machine that ran generate before
    model(**ctx.inputs(1))
    svdquant.fuse_projections(model)
    model(**ctx.inputs(1))
    svdquant.unfuse_projections(model)
    rows = []
    model.to("cpu")
    # an indexed device, as enable_model_cpu_offload passes it: the hook compares it with
    # the weights' device to skip its move on every later step
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.cuda else "cpu"
    offloaded, hook = cpu_offload_with_hook(model, device)
    rows.append({"name": "offload-eager-unfused", **_images(offloaded, ctx, images, steps, hook)})
    hook.remove()
    svdquant.fuse_projections(model)  # on the CPU, as generate --cpu-offload does
    graphed = svdquant.cuda_graphed(model)
    offloaded, hook = cpu_offload_with_hook(graphed, device)
    rows.append({"name": "offload-fused-graphed", **_images(offloaded, ctx, images, steps, hook)})
    hook.remove()
    svdquant.keep_host_copy(model)  # pinned host copies: moved in fast, out without copies
    offloaded, hook = cpu_offload_with_hook(graphed, device)
    row = _images(offloaded, ctx, images, steps, hook)
    rows.append({"name": "offload-fused-graphed-host-copy", **row})
    hook.remove()
    svdquant.keep_host_copy(model, enabled=False)
    graphed.to(ctx.device)
    rows.append({"name": "resident-fused-graphed", **_images(graphed, ctx, images, steps, None)})
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="denoiser steps an image (28)")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a 1-block model on the CPU")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not (cuda or args.tiny):
        raise SystemExit("offload: no CUDA device (--tiny runs a 1-block model on the CPU)")
    steps = args.steps or (3 if args.tiny else 28)
    if steps < 1 or args.images < 1:
        raise SystemExit("--steps and --images must be at least 1")
    ctx = e2e.Ctx(
        device="cuda" if cuda else "cpu",
        tiny=args.tiny,
        cfg=e2e.TINY if args.tiny else e2e.FLUX_DEV,
        img_tokens=64 if args.tiny else 4096,
        txt_tokens=16 if args.tiny else 512,
        batches=(1,),
        steps=steps,
        warmup=1,
    )
    date = datetime.datetime.now(datetime.UTC)
    with torch.no_grad():  # as diffusers' pipelines call the denoiser
        rows = run(ctx, args.images, steps)
    body = {"steps": steps, "images": args.images, "rows": rows}
    res, path = e2e.write_run("offload", ctx, date, args.out, body)
    print("| way | image s | first step ms | later step ms | captures |\n|---|---|---|---|---|")
    for r in rows:
        imgs = " / ".join(f"{s:.2f}" for s in r["image_s"])
        firsts = " / ".join(f"{s:.0f}" for s in r["first_step_ms"])
        cap = "–" if r["captures"] is None else r["captures"]
        print(f"| {r['name']} | {imgs} | {firsts} | {r['later_step_ms_median']} | {cap} |")
    print(f"-> {path}")
    return res


if __name__ == "__main__":
    main()
