"""A denoiser step of PixArt-Σ, SDXL and SANA: svdquant W4A4 against BF16.

    PYTHONPATH=src python bench/models.py [--models pixart,sdxl,sana] [--batches 1]
                                          [--steps 5] [--profile] [--out DIR] [--tiny]
                                          [--ab 'ops.GEGLU_EPILOGUE=False' ...]
                                          [--fp8-weights [GIB,...]] [--no-eager]
                                          [--lora-rank R] [--dtype float16]

``bench/e2e.py`` measures FLUX.1; this is the same question for the other architectures
``svdquant quantize`` takes. Each denoiser is built at its real size (random bf16 weights;
configs below) on the GPU and called at 1024 × 1024 (PixArt-Σ and SDXL: 128 × 128
latents; SANA: 32 × 32 from its 32× autoencoder) with a prompt's worth of text tokens
(300 for PixArt-Σ and SANA, 77 for SDXL). Timed on that one model, in this order: BF16
eagerly and through ``svdquant.cuda_graphed`` (what ``svdquant generate`` runs), then the
same model quantized in place (``quantize_model``: the architecture's adapter, rank 32,
α = 0.5, a synthetic calibration on the same inputs; speed does not depend on it),
eagerly and graphed, unfused (``svdq-int4-unfused``) and then fused as ``generate`` does
(``svdq-int4``: since v39 the attention projections and PixArt's MLPs). Reports the
median step of each (CUDA events), the weights' GiB and the step's peak, and ours × BF16
of the same run
(``--profile``: also the top ops of one eager step of each way, by GPU time; ``--ab``:
the fused model (or the LoRA'd one) timed once more with engine constants set,
``probe_layer.parse_set``'s ``module.NAME=VALUE`` under ``svdquant.kernels``, then both
ways alternated twice on the same model (``e2e.ab_times``; the row's ``ab``, printed
as an ``A/B`` line — the eager steps' host spread between rows is tens of percent);
``--fp8-weights``: then once more with ``svdquant.keep_fp8_weights`` — no per-step
widen, more memory — or once per byte budget, ``--fp8-weights 0.25,1,all`` GiB
(``max_bytes``: the smallest layers first); ``--no-eager``: the graphed rows only;
``--lora-rank R``: then once more with a random rank-R LoRA on every quantized layer,
loaded as a user's would be; ``--dtype float16``: the model, its baseline included, in
fp16 — SDXL's usual dtype);
writes ``models-<device>-<date>.json`` under ``--out`` (default ``bench/results``, or
``$OUT``) and prints a table last. ``--tiny``: the test pipelines' denoisers on the CPU
(what ``tests/test_bench.py`` runs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e

#: The denoisers at their published sizes. SANA: diffusers' defaults are Sana-1.6B at
#: 1024 px (20 layers of 2240 = 70 heads of 32, cross-attention 20 heads of 112).
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "pixart": (  # PixArt-Σ XL/2 at 1024 px
        "PixArtTransformer2DModel",
        dict(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            cross_attention_dim=1152,
            attention_bias=True,
            sample_size=128,
            patch_size=2,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            upcast_attention=False,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            interpolation_scale=2,
            use_additional_conditions=False,
            caption_channels=4096,
        ),
    ),
    "sdxl": (  # SDXL base 1.0's UNet
        "UNet2DConditionModel",
        dict(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
    ),
    "sana": ("SanaTransformer2DModel", {}),
}
#: text tokens of a prompt at each architecture's usual maximum length
TEXT_TOKENS = {"pixart": 300, "sdxl": 77, "sana": 300}


def build(arch: str, tiny: bool, device: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The denoiser of ``arch`` in ``dtype`` on ``device``: real size, or the test pipeline's."""
    import diffusers

    if tiny:
        from svdquant.models.tiny import tiny_pipeline

        pipe = tiny_pipeline(arch)
        model = getattr(pipe, "transformer", None) or pipe.unet
        return model.to(device, dtype).eval().requires_grad_(False)
    cls_name, cfg = CONFIGS[arch]
    return e2e.build_bf16(lambda: getattr(diffusers, cls_name)(**cfg), device).to(dtype)


def inputs(arch: str, model: nn.Module, batch: int, tiny: bool, device: str) -> dict[str, Any]:
    """One step's call arguments for ``model`` at ``batch`` (fixed seed), in its dtype."""
    cfg = model.config
    g = torch.Generator(device).manual_seed(batch)
    dtype = next(model.parameters()).dtype

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    side = cfg.sample_size
    text = 8 if tiny else TEXT_TOKENS[arch]
    t = torch.full((batch,), 500.0, device=device)
    if arch == "sdxl":
        time_dims = 6 * cfg.addition_time_embed_dim
        return dict(
            sample=rnd(batch, cfg.in_channels, side, side),
            timestep=t,
            encoder_hidden_states=rnd(batch, text, cfg.cross_attention_dim),
            added_cond_kwargs={
                "text_embeds": rnd(batch, cfg.projection_class_embeddings_input_dim - time_dims),
                "time_ids": rnd(batch, 6),
            },
            return_dict=False,
        )
    kw = dict(
        hidden_states=rnd(batch, cfg.in_channels, side, side),
        encoder_hidden_states=rnd(batch, text, cfg.caption_channels),
        timestep=t,
        return_dict=False,
    )
    if arch == "pixart":
        kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return kw


def _time(model: nn.Module, kw: dict[str, Any], mode: str, ctx: e2e.Ctx) -> dict[str, Any]:
    step = e2e._graph_step(model, kw) if mode == "cudagraph" else (lambda: model(**kw))
    return e2e.time_steps(step, ctx)


def run(
    arch: str,
    ctx: e2e.Ctx,
    modes: Sequence[str],
    ab: Sequence[str] = (),
    fp8_budgets: Sequence[float | None] = (),
    lora_rank: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict[str, Any]]:
    from probe_layer import constants, parse_set

    import svdquant

    model = build(arch, ctx.tiny, ctx.device, dtype)
    rows = []
    fused = 0
    lora_way = f"svdq-int4 + LoRA r{lora_rank}"
    last = lora_way if lora_rank else "svdq-int4"  # what --ab times again
    ab_way = f"{last} {' '.join(ab)}"
    ways = (
        [BASELINE[dtype], "svdq-int4-unfused", "svdq-int4"]
        + ([lora_way] if lora_rank else [])
        + ([ab_way] if ab else [])
        + [_fp8_way(gib) for gib in fp8_budgets]
    )
    budgets = {_fp8_way(gib): gib for gib in fp8_budgets}
    for way in ways:
        if way in budgets:  # last: they change the model
            e2e.keep_fp8_weights(model, budgets[way])
        if way == lora_way:  # on every quantized layer, then fused again (as generate does)
            svdquant.unfuse_projections(model)
            e2e._load_random_lora(model, lora_rank, keep=lambda name: True, dtype=dtype)
            fused = svdquant.fuse_projections(model)
        if way == "svdq-int4-unfused":
            kw1 = inputs(arch, model, 1, ctx.tiny, ctx.device)
            cfg = svdquant.QuantizeConfig(alpha=0.5, max_samples=256, progress=False)
            svdquant.quantize_model(model, lambda m, kw=kw1: m(**kw), cfg)
        elif way == "svdq-int4":  # as generate runs it
            fused = svdquant.fuse_projections(model)
        e2e._free()
        weights = e2e.state_bytes(model)
        sets = [parse_set(spec) for spec in ab] if ab and way == ab_way else []
        for b in ctx.batches:
            kw = inputs(arch, model, b, ctx.tiny, ctx.device)
            for mode in modes:
                with constants(sets):
                    res = _time(model, kw, mode, ctx)
                row = {"model": arch, "way": way, "mode": mode, "batch": b, **res}
                if sets:  # and alternated with the default on the same model (e2e's A/B)
                    default = next(r for r in rows if r["way"] == last and r["mode"] == mode
                                   and r["batch"] == b)  # fmt: skip
                    row["ab"] = e2e.ab_times(model, kw, mode, ctx, sets, default["median_ms"])
                if ctx.profile_rows and mode == "eager" and b == ctx.batches[0]:
                    row["profile"] = e2e.profile_step(lambda kw=kw, m=model: m(**kw), ctx, top=25)
                row["weights_bytes"] = weights
                if way.startswith("svdq"):
                    row["fused_modules"] = fused
                rows.append(row)
    del model
    e2e._free()
    return rows


def _fp8_way(gib: float | None) -> str:
    return "svdq-int4 keep_fp8_weights" + ("" if gib is None else f" {gib:g} GiB")


def _fp8_budgets(spec: str | None) -> list[float | None]:
    """``--fp8-weights``' budgets in GiB, smallest first (None: all layers, last)."""
    if spec is None:
        return []
    out: list[float | None] = []
    for part in spec.split(","):
        part = part.strip().lower()
        try:
            out.append(None if part == "all" else float(part))
        except ValueError as e:
            raise SystemExit(f"--fp8-weights wants GiB numbers or 'all', got {part!r}") from e
        if out[-1] is not None and out[-1] < 0:
            raise SystemExit(f"--fp8-weights: a budget cannot be negative, got {part!r}")
    return sorted(out, key=lambda g: float("inf") if g is None else g)


#: The 16-bit model's way, by ``--dtype``: what every ratio of the run is against.
BASELINE = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ours × 16-bit (the 16-bit model's median / ours: ``x_bf16``, against fp16 under
    ``--dtype float16``) for each model, mode and batch of the run."""
    base = {(r["model"], r["mode"], r["batch"]): r for r in rows if r["way"] in ("bf16", "fp16")}
    for r in rows:
        b = base.get((r["model"], r["mode"], r["batch"]))
        r["x_bf16"] = round(b["median_ms"] / r["median_ms"], 3) if b else None
        r["x_weights"] = round(b["weights_bytes"] / r["weights_bytes"], 2) if b else None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="pixart,sdxl,sana")
    p.add_argument("--batches", default="1")
    p.add_argument("--steps", type=int, default=None, help="timed steps (5; --tiny 2)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="eager rows only")
    p.add_argument("--tiny", action="store_true", help="the test denoisers, on the CPU")
    p.add_argument(
        "--profile", action="store_true", help="a per-op profile of one eager step of each way"
    )
    p.add_argument(
        "--ab",
        action="append",
        default=[],
        metavar="module.NAME=VALUE",
        help="time the fused model (with --lora-rank: the LoRA'd one) once more with these "
        "engine constants set (an A/B in one run)",
    )
    p.add_argument(
        "--fp8-weights",
        nargs="?",
        const="all",
        default=None,
        metavar="GIB,...",
        help="time the fused model once more with svdquant.keep_fp8_weights (no per-step "
        "widen), or once per byte budget in GiB ('all': no budget)",
    )
    p.add_argument("--no-eager", action="store_true", help="graphed rows only")
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="time the fused model once more with a random LoRA of this rank on every "
        "quantized layer (loaded with svdquant.load_lora)",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16"],
        default="bfloat16",
        help="the model's dtype, baseline included (float16: SDXL's usual)",
    )
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args(argv)
    if args.lora_rank < 0:
        raise SystemExit(f"--lora-rank must be positive, got {args.lora_rank}")
    if args.lora_rank and args.fp8_weights is not None:
        raise SystemExit("--lora-rank and --fp8-weights change the same model: time them apart")
    dtype = getattr(torch, args.dtype)
    archs = [a for a in args.models.split(",") if a]
    unknown = sorted(set(archs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"models: unknown {unknown}; choose from {sorted(CONFIGS)}")
    cuda = torch.cuda.is_available() and not args.tiny
    if not (cuda or args.tiny):
        raise SystemExit("models: no CUDA device (--tiny runs the test denoisers on the CPU)")
    ctx = e2e.Ctx(
        device="cuda" if cuda else "cpu",
        tiny=args.tiny,
        cfg={},
        img_tokens=0,
        txt_tokens=0,
        batches=tuple(int(b) for b in args.batches.split(",")),
        steps=args.steps or (2 if args.tiny else 5),
        warmup=2,
        profile_rows=("bf16", "svdq-int4") if args.profile else (),
    )
    modes = ("eager",) if args.no_cuda_graphs or not cuda else ("eager", "cudagraph")
    if args.no_eager and cuda and not args.no_cuda_graphs:
        modes = ("cudagraph",)
    budgets = _fp8_budgets(args.fp8_weights)
    date = datetime.datetime.now(datetime.UTC)
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for arch in archs:
            rows += run(arch, ctx, modes, args.ab, budgets, args.lora_rank, dtype)
    add_ratios(rows)
    body = {"resolution": "1024x1024" if not args.tiny else "tiny", "dtype": args.dtype,
            "lora_rank": args.lora_rank, "rows": rows}  # fmt: skip
    res, path = e2e.write_run("models", ctx, date, args.out, body)
    base = BASELINE[dtype].upper()
    print(f"| model | way | mode | batch | ms/step | × {base} | weights GiB | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "–" if r["peak_abs_bytes"] is None else f"{r['peak_abs_bytes'] / 2**30:.2f}"
        print(
            f"| {r['model']} | {r['way']} | {r['mode']} | {r['batch']} | "
            f"{r['median_ms']:.1f} | {r['x_bf16']:.2f}× | {r['weights_bytes'] / 2**30:.2f} | "
            f"{peak} |"
        )
    for r in rows:
        if "ab" in r:
            a = r["ab"]
            print(f"A/B {r['model']} {r['way']} {r['mode']} b{r['batch']}: default "
                  f"{a['default_ms']} ms, set {a['set_ms']} ms: set {a['set_vs_default']}x as "
                  "fast (alternated)")  # fmt: skip
    for r in rows:
        if "profile" in r:
            ops = ", ".join(f"{o['name'][:40]} {o['self_ms']:.2f}" for o in r["profile"]["ops"][:8])
            print(
                f"profile {r['model']} {r['way']}: total {r['profile']['total_ms']:.1f} ms: {ops}"
            )
    print(f"-> {path}")
    return res


if __name__ == "__main__":
    main()
