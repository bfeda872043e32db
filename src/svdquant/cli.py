"""The ``svdquant`` command line.

    svdquant quantize --model <diffusers dir> --out <dir> [--format int4|nvfp4] [--rank 32]
                      [--prompts file] [--gptq]
    svdquant generate --model <diffusers dir | quantized dir> --prompt "..." --out image.png
                      [--steps N] [--seed S]

Each subcommand is a ``register_*(subparsers)`` function that adds its parser and sets
``func``; add new ones to ``COMMANDS``. ``main(argv)`` returns the exit status.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "CLIError", "main"]

_DTYPES = ("float32", "float16", "bfloat16")


class CLIError(Exception):
    """An error to report in one line, without a traceback."""


def to_device(obj: Any, device: str, what: str) -> Any:
    from svdquant.resources import to_device as move

    return move(obj, device, what)


def _dtype(name: str | None) -> Any:
    import torch

    return None if name is None else getattr(torch, name)


def _device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_base_pipeline(path: str, dtype: Any) -> Any:
    from diffusers import DiffusionPipeline

    from svdquant.pipeline import dtype_kwargs, is_pipeline_dir

    p = Path(path)
    if not p.exists():
        raise CLIError(f"model directory not found: {p}")
    if not is_pipeline_dir(p):
        raise CLIError(
            f"{p} is not a diffusers pipeline directory (no model_index.json); pass the "
            "folder written by `pipe.save_pretrained(...)` or downloaded from the hub"
        )
    return DiffusionPipeline.from_pretrained(str(p), **dtype_kwargs(dtype))


def _size_kwargs(pipe: Any, height: int | None, width: int | None) -> dict[str, Any]:
    """``height``/``width`` for ``pipe(...)``; an explicit size is what the user wants, so
    pipelines that snap sizes to their aspect-ratio bins (PixArt, SANA) are told not to."""
    import inspect

    kw = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    if kw and "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
        kw["use_resolution_binning"] = False
    return kw


# --------------------------------------------------------------------------- quantize


def register_quantize(sub: Any) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize the denoiser of a diffusers pipeline to 4 bits",
        description="Calibrate on prompts, quantize the pipeline's transformer/UNet with "
        "SVDQuant and save it (svdquant.safetensors + config.json + svdquant.json).",
    )
    p.add_argument("--model", required=True, help="diffusers pipeline directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="int4", choices=("int4", "nvfp4"), help="weight format")
    p.add_argument(
        "--act-format",
        default=None,
        choices=("int4", "nvfp4", "fp8", "none"),
        help="activation format of the W4A4 layers (default: same as --format)",
    )
    p.add_argument("--rank", type=int, default=32, help="rank of the low-rank branch")
    p.add_argument("--alpha", type=float, default=None, help="smoothing α (default: search)")
    p.add_argument("--gptq", action="store_true", help="quantize the residual with GPTQ")
    p.add_argument(
        "--method",
        default="svdquant",
        choices=("svdquant", "naive", "smoothquant", "lowrank"),
        help="svdquant or a baseline",
    )
    p.add_argument("--skip", action="append", default=[], help="regex of layers to keep 16-bit")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--num-prompts", type=int, default=128, help="calibration prompts (128)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per prompt")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--max-samples", type=int, default=1024, help="tokens kept per layer")
    p.add_argument("--dtype", default="bfloat16", choices=_DTYPES)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    from svdquant import distributed
    from svdquant.pipeline import (
        denoiser,
        pipeline_calibration,
        save_pretrained_quantized,
    )
    from svdquant.prompts import load_prompts
    from svdquant.quantize_model import QuantizeConfig, quantize_model

    # under torchrun: join the group, one GPU per rank; prompts are sharded in calibration
    device = distributed.init_from_env(args.device)
    prompts = load_prompts(args.prompts, args.num_prompts, seed=args.seed)
    pipe = _load_base_pipeline(args.model, _dtype(args.dtype))
    component, model = denoiser(pipe)
    from svdquant.models import get_adapter

    get_adapter(model)  # fail early, naming the supported architectures
    to_device(pipe, _device(device), "the pipeline")
    cfg = QuantizeConfig(
        fmt=args.format,
        act_fmt=args.act_format,
        rank=args.rank,
        alpha=args.alpha,
        gptq=args.gptq,
        method=args.method,
        skip=tuple(args.skip),
        max_samples=args.max_samples,
        progress=distributed.is_main(),
    )
    extra = _size_kwargs(pipe, args.height, args.width)
    calib = pipeline_calibration(
        pipe,
        prompts,
        num_inference_steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        **extra,
    )
    t0 = time.perf_counter()
    # finished layers go to <out>/.partial as they are done: a rerun of the same command
    # after an interruption resumes there
    partial = Path(args.out) / ".partial"
    quantize_model(model, calib, cfg, resume_dir=partial)
    secs = time.perf_counter() - t0
    if distributed.is_main():  # every rank holds the same model: one writes it
        out = save_pretrained_quantized(model, args.out, base_model=args.model, component=component)
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        shutil.rmtree(partial, ignore_errors=True)
        ranks = f" on {distributed.world_size()} ranks" if distributed.world_size() > 1 else ""
        print(
            f"quantized {type(model).__name__} in {secs:.1f} s on {len(prompts)} prompts"
            f"{ranks} -> {out} ({size / 2**20:.1f} MiB)"
        )
    distributed.barrier()
    return 0


# --------------------------------------------------------------------------- generate


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that run a pipeline to make images."""
    p.add_argument("--steps", type=int, default=None, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=_DTYPES)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--cpu-offload",
        action="store_true",
        help="keep each model of the pipeline on the CPU until it runs (diffusers' "
        "enable_model_cpu_offload), for a GPU that cannot hold the whole pipeline",
    )


def register_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="generate an image with a diffusers pipeline or a quantized model",
        description="Generate images. --model is a diffusers pipeline directory (16-bit) "
        "or a directory written by `svdquant quantize`.",
    )
    p.add_argument("--model", required=True, help="diffusers pipeline or quantized directory")
    p.add_argument(
        "--base",
        default=None,
        help="pipeline providing the other components of a quantized "
        "model (default: the one recorded at quantization)",
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument(
        "--out",
        required=True,
        help="image file (.png/.jpg); with --num-images > 1, an index is added before the suffix",
    )
    _add_sampling_args(p)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the denoiser with CUDA graphs (mode='reduce-overhead') instead "
        "of replaying our own (on an H200 a quantized FLUX.1-dev step took 97.7 ms compiled "
        "against 95.5 replayed, one run); the first image pays a one-time compilation "
        "(140 s on an H100) per resolution",
    )
    p.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="run the denoiser eagerly; by default, on a GPU without --compile (with "
        "--cpu-offload too: one capture an image), its steps are replayed from a CUDA "
        "graph captured on the second step (svdquant.cuda_graphed: a quantized FLUX.1-dev "
        "step 95 ms instead of 129-180 eager on an H200, no compilation)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="a LoRA safetensors file (diffusers/PEFT or kohya), optionally :strength; repeatable",
    )
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="run diffusers' own blocks (by default a quantized FLUX runs q/k/v — and in "
        "its single blocks the MLP's up projection — as one layer, its MLPs fused, and "
        "attention's q/k and the blocks' norms and residuals in one pass each: the same "
        "images up to rounding; on an H200 a FLUX.1 step took 95 ms, 140 before the one-pass "
        "kernels)",
    )
    p.add_argument(
        "--fp8-weights",
        action="store_true",
        help="speed for memory: keep each 4-bit weight's fp8 copy on the GPU instead of "
        "widening the weights at every step, the 4-bit codes moved to host memory "
        "(svdquant.keep_fp8_weights: the same images; "
        "on an H200 a FLUX.1-dev step 1.87x BF16 instead of 1.78x, its weights on the GPU "
        "10.3 GiB instead of 6.3 — BF16 22.2; SDXL 1.05x BF16 instead of 0.98x at batch 1), for as "
        "many layers, smallest first, as fit in the free GPU memory less 4 GiB; not with "
        "--cpu-offload",
    )
    p.set_defaults(func=cmd_generate)


def _make_ready(
    pipe: Any,
    device: str,
    *,
    offload: bool,
    fuse: bool,
    graph: bool,
    compile: bool = False,
    fp8_weights: bool = False,
) -> None:
    """Put ``pipe`` where it runs and its denoiser in the form it runs fastest: on
    ``device`` (or under model CPU offload: asked for, or where only one model at a time
    fits), projections fused (``fuse``), the fp8 weights kept (``fp8_weights``, on a GPU
    without offload), steps compiled (``compile``) or replayed from CUDA graphs (``graph``,
    on a GPU). Under offload the wrapper goes in first, so that the
    offload hook moves it: each image captures once, and the graph leaves with the
    weights; and on a GPU its models move from page-locked host memory and back without
    copies (``keep_host_copy``; v40, H200, FLUX.1-dev's denoiser and a T5-XXL-sized
    encoder: 5.3 s for the first image against 12.7, 3.6 s for the next against 12.1)."""
    import torch

    if not offload:
        offload = _to_device_or_offload(pipe, device, compiling=compile)
    denoiser = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    if fuse:
        from svdquant.fuse import fuse_projections

        n = fuse_projections(getattr(pipe, denoiser))
        if n:
            print(f"fused the projections of {n} attention modules")
    if fp8_weights:
        _keep_fp8_weights(getattr(pipe, denoiser), device, offload)
    if compile:
        print(f"compiling the {denoiser} (mode='reduce-overhead'; the first image waits for it)")
        setattr(pipe, denoiser, torch.compile(getattr(pipe, denoiser), mode="reduce-overhead"))
    elif torch.device(device).type == "cuda" and graph:
        from svdquant.cuda_graph import cuda_graphed

        # our layers launch their kernels from Python: replaying the steps removes that
        setattr(pipe, denoiser, cuda_graphed(getattr(pipe, denoiser)))
    if offload and torch.device(device).type == "cuda":
        from svdquant.offload import keep_host_copy

        models = [m for m in pipe.components.values() if isinstance(m, torch.nn.Module)]
        for m in models:
            keep_host_copy(m)
        print(
            f"{len(models)} models move between page-locked host memory and the GPU under "
            "the offload (no copies of unchanged weights)"
        )
    if offload:
        pipe.enable_model_cpu_offload(device=device)


#: GPU memory ``generate --fp8-weights`` leaves free for the step, the text encoders' and
#: the VAE's work (FLUX.1-dev at 1024²: the step's peak is ~0.2 GiB over the weights;
#: decoding the image takes a few GiB).
FP8_RESERVE_BYTES = 4 * 2**30


def _keep_fp8_weights(model: Any, device: str, offload: bool) -> None:
    """``svdquant.keep_fp8_weights`` on the denoiser where it can pay (on a GPU, without
    offload), for as many layers (the smallest first) as fit in the free memory less
    ``FP8_RESERVE_BYTES``, their 4-bit codes moved to host memory (the kept copies
    replace them in every step: 1 byte a weight on the GPU instead of 1.5); else said on
    stdout, and the run goes on without them."""
    import torch

    from svdquant.nn import SVDQLinear, keep_fp8_weights

    if offload or torch.device(device).type != "cuda":
        where = "under CPU offload" if offload else f"on {device}"
        print(f"--fp8-weights: not {where} (the fp8 engine keeps them on the GPU); skipped")
        return
    able = sum(isinstance(m, SVDQLinear) and m.on_fp8_engine() for m in model.modules())
    if not able:
        print("--fp8-weights: no layer of the denoiser runs on the fp8 engine here (it needs "
              "compute capability 8.9+ and int4/fp8 activations); nothing to keep")  # fmt: skip
        return
    before = torch.cuda.memory_allocated(device)
    free, _ = torch.cuda.mem_get_info(device)
    budget = max(0, free - FP8_RESERVE_BYTES)
    try:
        n = keep_fp8_weights(model, max_bytes=budget, codes_on_host=True)
    except torch.cuda.OutOfMemoryError:
        keep_fp8_weights(model, enabled=False)
        torch.cuda.empty_cache()
        print("--fp8-weights: the fp8 copies do not fit on the GPU; running without them")
        return
    grown = (torch.cuda.memory_allocated(device) - before) / 2**30
    host = sum(
        m.qweight.numel()
        for m in model.modules()
        if isinstance(m, SVDQLinear) and m.codes_on_host()
    )
    print(
        f"kept the fp8 weights of {n} of {able} layers on the GPU (+{grown:.1f} GiB; their "
        f"4-bit codes, {host / 2**30:.1f} GiB, wait in host memory)"
    )
    if n < able:
        print(
            f"  the other {able - n} widen at each step: {free / 2**30:.1f} GiB were free, "
            f"{FP8_RESERVE_BYTES / 2**30:.0f} GiB of it left for the step and the decoder"
        )


def _to_device_or_offload(pipe: Any, device: str, compiling: bool) -> bool:
    """Move ``pipe`` to ``device``; where it does not fit but each of its models does,
    leave it on the CPU and return True: run with model CPU offload (said on stdout)."""
    from svdquant.resources import InsufficientMemoryError, fits_one_at_a_time

    try:
        to_device(pipe, device, "the pipeline")
        return False
    except InsufficientMemoryError:  # raised on a CUDA device only
        if compiling:
            raise
        fits, total, largest = fits_one_at_a_time(pipe, device)
        if not fits:
            raise
        pipe.to("cpu")  # whatever an out-of-memory error left on the device
        print(
            f"the pipeline needs {total / 2**30:.1f} GiB, more than {device} has free: each "
            f"model goes to the GPU only while it runs (--cpu-offload; the largest, "
            f"{largest / 2**30:.1f} GiB, fits)"
        )
        return True


def _call_kwargs(pipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    import inspect

    params = inspect.signature(pipe.__call__).parameters
    kw: dict[str, Any] = {"prompt": args.prompt, "num_images_per_prompt": args.num_images}
    opt = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt,
    }
    kw.update({k: v for k, v in opt.items() if v is not None})
    kw.update(_size_kwargs(pipe, args.height, args.width))
    unknown = [k for k in kw if k not in params]
    if unknown:
        raise CLIError(f"{type(pipe).__name__} does not take {', '.join(unknown)}")
    return kw


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from svdquant.pipeline import is_pipeline_dir, is_quantized_dir, load_pipeline

    dtype = _dtype(args.dtype)
    if args.fp8_weights and args.cpu_offload:
        raise CLIError(
            "--fp8-weights and --cpu-offload do not mix: the fp8 copies save time only on a "
            "GPU that keeps the weights (under offload they would move with them every image)"
        )
    if args.compile and args.cpu_offload:
        raise CLIError(
            "--compile and --cpu-offload do not mix: torch.compile's CUDA graphs need the "
            "denoiser's weights to stay on the GPU (without --compile, --cpu-offload replays "
            "svdquant's own graphs)"
        )
    path = Path(args.model)
    if is_quantized_dir(path):
        pipe = load_pipeline(path, base_model=args.base, torch_dtype=dtype)
    elif is_pipeline_dir(path):
        pipe = _load_base_pipeline(args.model, dtype)
    elif not path.exists():
        raise CLIError(f"model directory not found: {path}")
    else:
        raise CLIError(
            f"{path} is neither a diffusers pipeline directory (model_index.json) nor an "
            "svdquant quantized model (svdquant.safetensors)"
        )
    for spec in args.lora:
        from svdquant.lora import load_lora

        path, _, strength = spec.rpartition(":") if ":" in spec else (spec, "", "")
        try:
            value = float(strength) if strength else 1.0
        except ValueError:
            path, value = spec, 1.0  # a ':' that is part of the path
        load_lora(pipe, path, strength=value)
    device = _device(args.device)
    _make_ready(  # after the LoRAs: the fused layers carry them
        pipe,
        device,
        offload=args.cpu_offload,
        fuse=not args.no_fuse,
        graph=not args.no_cuda_graph,
        compile=args.compile,
        fp8_weights=args.fp8_weights,
    )
    if torch.device(device).type == "cuda" and is_quantized_dir(Path(args.model)):
        from svdquant.kernels import tile_cache

        cache = tile_cache.path()
        if cache is not None and not cache.exists():
            print(
                "first run of this engine version on this machine: the fp8 GEMM times its "
                "tiles for each layer shape (about a minute for FLUX.1 on an H200); the picks "
                f"are kept in {cache.parent} for the next runs"
            )
    gen = torch.Generator("cpu").manual_seed(args.seed)
    t0 = time.perf_counter()
    images = pipe(generator=gen, **_call_kwargs(pipe, args)).images
    secs = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = (
        [out]
        if len(images) == 1
        else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    )
    for img, p in zip(images, paths, strict=True):
        img.save(p)
    print(f"generated {len(images)} image(s) in {secs:.1f} s -> {', '.join(map(str, paths))}")
    return 0


# --------------------------------------------------------------------------- eval


def register_eval(sub: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="compare a quantized model's images with the 16-bit model's",
        description="Generate the same prompts with the same seeds from the 16-bit pipeline "
        "and the quantized one; report PSNR, SSIM (and LPIPS, FID, CLIP score where their "
        "weights are on disk); write a side-by-side grid and a table. Works under torchrun.",
    )
    p.add_argument("--model", required=True, help="the 16-bit diffusers pipeline directory")
    p.add_argument("--quantized", required=True, help="directory written by svdquant quantize")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--out", default="svdquant-eval", help="output directory")
    p.add_argument("--clip-model", default=None, help="local CLIP model directory (CLIP score)")
    _add_sampling_args(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from svdquant import distributed
    from svdquant.eval.harness import run_eval
    from svdquant.pipeline import is_quantized_dir, load_pipeline
    from svdquant.prompts import load_prompts

    device = _device(distributed.init_from_env(args.device))
    if not is_quantized_dir(Path(args.quantized)):
        raise CLIError(f"{args.quantized} is not a directory written by `svdquant quantize`")
    if args.num_images <= 0:
        raise CLIError("--num-images must be positive")
    prompts = load_prompts(args.prompts, args.num_images, seed=args.seed)
    dtype = _dtype(args.dtype)

    def ready(pipe: Any, fuse: bool) -> Any:  # as `svdquant generate` runs each
        _make_ready(pipe, device, offload=args.cpu_offload, fuse=fuse, graph=True)
        return pipe

    reference = lambda: ready(_load_base_pipeline(args.model, dtype), fuse=False)  # noqa: E731
    quantized = lambda: ready(  # noqa: E731
        load_pipeline(args.quantized, base_model=args.model, torch_dtype=dtype), fuse=True
    )
    kw = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "height": args.height,
        "width": args.width,
    }
    kw = {k: v for k, v in kw.items() if v is not None}
    meta = {"model": args.model, "quantized": args.quantized, "ranks": distributed.world_size()}
    metrics = run_eval(
        reference,
        quantized,
        prompts,
        args.out,
        seed=args.seed,
        clip_model=args.clip_model,
        meta=meta,
        **kw,
    )
    if metrics is not None:
        print((Path(args.out) / "metrics.md").read_text(), end="")
        print(f"grid and tables in {args.out}/")
    return 0


# --------------------------------------------------------------------------- demo


def register_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="quantize the shipped digit-drawing DiT and compare 16-bit and 4-bit samples",
        description="Runs offline on a CPU in a few minutes: loads the small DiT trained on "
        "MNIST that ships with svdquant, quantizes it with SVDQuant (and naive W4A4 for "
        "comparison), samples both with the same seeds, writes grid.png and demo.json and "
        "prints PSNR/SSIM and the memory of both models.",
    )
    p.add_argument("--out", default="svdquant-demo", help="output directory")
    p.add_argument("--num-images", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--format", default="int4", choices=("int4", "nvfp4"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from svdquant.demo import run_demo

    if args.num_images <= 0 or args.steps <= 0:
        raise CLIError("--num-images and --steps must be positive")
    run_demo(
        args.out,
        device=args.device,
        num_images=args.num_images,
        steps=args.steps,
        seed=args.seed,
        fmt=args.format,
    )
    return 0


# --------------------------------------------------------------------------- bench


def register_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="speed and memory: the engine's layers and the whole FLUX.1-dev step",
        description="Run the benchmarks of the source checkout's bench/ folder: the layer "
        "benchmark (bench/gemm.py, needs CUDA and triton) and the end-to-end FLUX.1-dev step "
        "against BF16, bitsandbytes NF4 and torchao (bench/e2e.py). Without --layers or --e2e "
        "both run. Writes JSON and a PNG under --out and prints a table.",
    )
    p.add_argument("--layers", action="store_true", help="the layer benchmark (bench/gemm.py)")
    p.add_argument("--e2e", action="store_true", help="the end-to-end benchmark (bench/e2e.py)")
    p.add_argument("--tiny", action="store_true", help="a 1-block model on the CPU (a check)")
    p.add_argument("--out", default=None, help="output folder (default bench/results, or $OUT)")
    p.add_argument("--rows", default=None, help="end-to-end rows, comma-separated")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd rows")
    p.add_argument("--steps", type=int, default=None, help="timed steps per batch size")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-time budget of the whole command; end-to-end rows that would not fit are "
        "skipped (default 540 s for the full-size model)",
    )
    p.add_argument(
        "--full-layers", action="store_true", help="all layer shapes (default: gemm.py --quick)"
    )
    p.set_defaults(func=cmd_bench)


def _bench_dir() -> Path:
    d = Path(__file__).resolve().parents[2] / "bench"
    if not (d / "e2e.py").is_file():
        raise CLIError(
            f"the benchmarks live in the source checkout's bench/ folder, not found at {d}: "
            "run `svdquant bench` from an editable install (pip install -e .)"
        )
    return d


def _load_bench(path: Path) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_svdquant_bench_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def cmd_bench(args: argparse.Namespace) -> int:
    import os

    import torch

    t0 = time.perf_counter()
    bench = _bench_dir()
    layers = args.layers or not args.e2e
    e2e = args.e2e or not args.layers
    out = args.out or os.environ.get("OUT") or str(bench / "results")
    if e2e and not args.tiny and not torch.cuda.is_available():
        raise CLIError(
            "the end-to-end benchmark builds the full-size FLUX.1-dev transformer and needs a "
            "CUDA GPU; --tiny runs a 1-block model on the CPU"
        )
    if layers:
        gemm = bench / "gemm.py"
        if not gemm.is_file():
            print("layer benchmark skipped: bench/gemm.py is not in this checkout")
        elif not torch.cuda.is_available():
            print("layer benchmark skipped: it times CUDA kernels and no CUDA device is here")
        elif args.tiny:
            print("layer benchmark skipped with --tiny (it has no tiny mode)")
        else:
            argv = sys.argv
            sys.argv = [str(gemm), "--out", out] + ([] if args.full_layers else ["--quick"])
            try:
                _load_bench(gemm).main()
            finally:
                sys.argv = argv
    if e2e:
        argv = ["--out", out]
        argv += ["--tiny"] if args.tiny else []
        argv += ["--rows", args.rows] if args.rows else []
        argv += ["--compile"] if args.compile else []
        argv += ["--steps", str(args.steps)] if args.steps else []
        budget = args.budget_s
        if budget is None and not args.tiny:
            budget = 540.0
        if budget is not None:
            argv += ["--budget-s", str(max(budget - (time.perf_counter() - t0), 0.0))]
        _load_bench(bench / "e2e.py").main(argv)
    return 0


# --------------------------------------------------------------------------- main

#: The subcommands: each adds its parser to the subparsers and sets ``func``.
COMMANDS: list[Callable[[Any], None]] = [
    register_demo,
    register_quantize,
    register_generate,
    register_eval,
    register_bench,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="svdquant", description="4-bit diffusion models with SVDQuant"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    from svdquant.checkpoint import CheckpointError
    from svdquant.lora import LoraError
    from svdquant.models import UnsupportedModelError
    from svdquant.pipeline import NotADiffusersModelError
    from svdquant.resources import InsufficientMemoryError

    try:
        return args.func(args)
    except (
        CLIError,
        UnsupportedModelError,
        NotADiffusersModelError,
        CheckpointError,
        FileNotFoundError,
        InsufficientMemoryError,
        LoraError,
    ) as e:
        print(f"svdquant {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
