"""Whole images of the FLUX.1-dev denoiser under CPU offload: what ``svdquant generate
--cpu-offload`` costs (the path of a GPU too small for the whole pipeline).

    PYTHONPATH=src python bench/offload.py [--steps 28] [--images 2] [--text-encoder]
                                           [--out DIR] [--tiny]

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

With ``--text-encoder`` a T5-XXL-sized encoder (FLUX.1's, 9.5 GB: random weights)
sits before the denoiser in the offload chain, as in the pipeline: each image encodes a
512-token prompt first (the encoder moves in), and the denoiser's first step moves it out
(``keep_host_copy`` applies to both). An image's time is its steps' wall time (the
first step moves the weights in; under ``cuda_graphed`` the second captures) plus
moving the weights out again (what the pipeline does before the VAE runs), with the GPU
synchronized; one step of each layer
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

#: google/t5-v1_1-xxl's encoder (FLUX.1's second text encoder: 4.76B parameters, 9.5 GB
#: in bf16), for ``--text-encoder``
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_ff=10240,
    d_kv=64,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
)
T5_TINY = dict(vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2)


def _text_encoder(ctx: e2e.Ctx) -> tuple[nn.Module, torch.Tensor]:
    """A T5 encoder (random bf16 weights, built on the device, left on the CPU) and a
    prompt's token ids (512, FLUX's maximum; 16 with ``--tiny``)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(**(T5_TINY if ctx.tiny else T5_XXL))
    te = e2e.build_bf16(lambda: T5EncoderModel(cfg), ctx.device).to("cpu")
    ids = torch.randint(0, te.config.vocab_size, (1, 16 if ctx.tiny else 512))
    return te, ids


def _images(
    model: nn.Module, ctx: e2e.Ctx, n: int, steps: int, hook: Any, text: Any = None
) -> dict[str, Any]:
    """``n`` images of ``steps`` steps: each image's seconds, its first step's and its
    later steps' milliseconds, and the CUDA-graph captures made (``cuda_graphed``). With
    ``text`` (an offloaded text encoder and token ids) each image encodes its prompt
    first, as a pipeline does: the encoder moves in, and out at the denoiser's first
    step."""
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
        if text is not None:
            text[0](input_ids=text[1])
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


def run(ctx: e2e.Ctx, images: int, steps: int, text_encoder: bool) -> list[dict[str, Any]]:
    from accelerate import cpu_offload_with_hook

    import svdquant

    te = _text_encoder(ctx) if text_encoder else None
    model = e2e._build(ctx)
    e2e._ours("int4", None)(model, ctx)
    # the GEMM's tile picks for both layer sets, as on a machine that ran generate before
    model(**ctx.inputs(1))
    svdquant.fuse_projections(model)
    model(**ctx.inputs(1))
    svdquant.unfuse_projections(model)
    model.to("cpu")
    # an indexed device, as enable_model_cpu_offload passes it: the hook compares it with
    # the weights' device to skip its move on every later step
    device = torch.device("cuda", torch.cuda.current_device()) if ctx.cuda else "cpu"

    def offloaded_images(denoiser: nn.Module) -> dict[str, Any]:
        """The images with ``denoiser`` (and the text encoder before it) offloaded."""
        hooks, text, prev = [], None, None
        if te is not None:
            te_model, prev = cpu_offload_with_hook(te[0], device)
            hooks.append(prev)
            text = (te_model, te[1].to(device))
        wrapped, hook = cpu_offload_with_hook(denoiser, device, prev_module_hook=prev)
        hooks.append(hook)
        try:
            return _images(wrapped, ctx, images, steps, hook, text)
        finally:
            for h in hooks:
                h.offload()
                h.remove()

    rows = [{"name": "offload-eager-unfused", **offloaded_images(model)}]
    svdquant.fuse_projections(model)  # on the CPU, as generate --cpu-offload does
    graphed = svdquant.cuda_graphed(model)
    rows.append({"name": "offload-fused-graphed", **offloaded_images(graphed)})
    # pinned host copies: moved in fast, out without copies
    for m in [model] + ([te[0]] if te is not None else []):
        svdquant.keep_host_copy(m)
    rows.append({"name": "offload-fused-graphed-host-copy", **offloaded_images(graphed)})
    for m in [model] + ([te[0]] if te is not None else []):
        svdquant.keep_host_copy(m, enabled=False)
    graphed.to(ctx.device)
    rows.append({"name": "resident-fused-graphed", **_images(graphed, ctx, images, steps, None)})
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="denoiser steps an image (28)")
    p.add_argument("--images", type=int, default=2)
    p.add_argument(
        "--text-encoder",
        action="store_true",
        help="a T5-XXL-sized encoder offloaded before the denoiser, as in FLUX.1's pipeline",
    )
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
        rows = run(ctx, args.images, steps, args.text_encoder)
    body = {"steps": steps, "images": args.images, "text_encoder": args.text_encoder}
    body["rows"] = rows
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
