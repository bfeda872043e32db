"""The out-of-the-box demo: SVDQuant on a small diffusion transformer trained by us.

No real diffusion weights can be downloaded everywhere, so the package ships a small
class-conditional DiT (diffusers' ``DiTTransformer2DModel``: patch embedding, adaLN-Zero
modulation, self-attention, GELU MLP — the layer types of PixArt and FLUX) trained on
5,000 real MNIST digits (``bench/train_demo.py``). ``run_demo`` loads it, quantizes its
linear layers with SVDQuant (W4A4), samples the same seeds from the 16-bit and the 4-bit
model, writes a comparison grid and reports PSNR / SSIM and the memory of both.

Which layers become 4-bit (the paper's choice, scaled down):

* attention ``to_q/to_k/to_v/to_out.0`` and MLP ``ff.net.0.proj/ff.net.2``: W4A4,
* the adaLN-Zero modulation ``norm1.linear``: 4-bit weights, 16-bit activations (W4A16,
  as the paper keeps the modulation's activations 16-bit),
* 16-bit: the patch embedding (a conv), the timestep and class embedders, and the final
  ``proj_out_1/proj_out_2``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from svdquant.algorithm import observe, quantize_from_stats
from svdquant.nn import SVDQLinear

__all__ = [
    "DEMO_CONFIG",
    "NUM_CLASSES",
    "SCHEDULER_CONFIG",
    "WEIGHTS",
    "DemoResult",
    "build_model",
    "demo_layers",
    "load_model",
    "make_grid",
    "model_bytes",
    "quantize_demo_model",
    "run_demo",
    "sample",
]

NUM_CLASSES = 10
#: The DiT's configuration (diffusers ``DiTTransformer2DModel``), 28×28 grey digits.
DEMO_CONFIG: dict[str, object] = {
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 6,
    "sample_size": 28,
    "patch_size": 2,
    "num_embeds_ada_norm": NUM_CLASSES,  # the number of classes (+1 null class for CFG)
    "norm_type": "ada_norm_zero",
    "activation_fn": "gelu-approximate",
}
#: The noise schedule it was trained with (diffusers ``DDPMScheduler`` config).
SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
}
#: The shipped weights (fp16 safetensors, written by ``bench/train_demo.py``).
WEIGHTS = Path(__file__).resolve().parent / "weights" / "dit_mnist.safetensors"

# Layer-name suffixes inside each transformer block, and their activation format.
_W4A4 = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
_W4A16 = ("norm1.linear",)


def build_model() -> nn.Module:
    """An untrained DiT of the demo's configuration (fp32)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(**DEMO_CONFIG)


def load_model(
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """The trained demo DiT from ``path`` (default: the shipped ``WEIGHTS``), eval mode."""
    from safetensors.torch import load_file

    model = build_model()
    model.load_state_dict(load_file(str(path or WEIGHTS)))  # fp16 on disk -> fp32
    model.to(device)
    if dtype != torch.float32:
        model.to(dtype)
    return model.eval()


def make_scheduler(kind: str = "dpm") -> object:
    """The sampling scheduler: ``"dpm"`` (DPM-Solver++ multistep, deterministic) or
    ``"ddpm"`` (the training schedule).

    DPM-Solver on the cosine schedule needs its last steps' log-SNR clipped
    (``lambda_min_clipped``, diffusers' advice for ``squaredcos_cap_v2``): without it the
    final step blows the samples up into noise.
    """
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    if kind == "ddpm":
        return DDPMScheduler(**SCHEDULER_CONFIG)
    return DPMSolverMultistepScheduler(**SCHEDULER_CONFIG, lambda_min_clipped=-5.1)


@torch.no_grad()
def sample(
    model: nn.Module,
    labels: torch.Tensor,
    *,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 2.0,
    progress: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Class-conditional samples [B, 1, 28, 28] in [0, 1], with classifier-free guidance.

    The initial noise comes from a CPU generator seeded with ``seed``, so two models given
    the same seed start from the same noise, whatever their device. ``progress`` is
    called once per denoising step.
    """
    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    size = int(DEMO_CONFIG["sample_size"])
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 1, size, size, generator=gen).to(device)
    labels = labels.to(device)
    cond = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)])  # + the null class
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        xin = torch.cat([x, x]).to(dtype)
        tt = torch.full((len(xin),), int(t), device=device, dtype=torch.long)
        eps_c, eps_u = model(xin, timestep=tt, class_labels=cond).sample.float().chunk(2)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = scheduler.step(eps, t, x).prev_sample
        if progress is not None:
            progress()
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


def demo_layers(model: nn.Module) -> dict[str, str]:
    """The linear layers the demo quantizes, by name, with their activation format
    (``None`` = the weight format, i.e. W4A4; ``"none"`` = 16-bit activations)."""
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith("transformer_blocks."):
            continue
        if name.endswith(_W4A4):
            chosen[name] = None
        elif name.endswith(_W4A16):
            chosen[name] = "none"
    return chosen


@torch.no_grad()
def quantize_demo_model(
    model: nn.Module,
    calibration: Callable[[], None],
    *,
    fmt: str = "int4",
    rank: int = 16,
    method: str = "svdquant",
    alpha_grid: Sequence[float] = (0.2, 0.35, 0.5, 0.65, 0.8),
    max_samples: int = 1024,
    progress: bool = True,
) -> dict[str, SVDQLinear]:
    """Quantize ``model``'s demo layers in place; returns the new layers by name.

    ``calibration()`` runs the 16-bit model (e.g. a few denoising runs) while forward
    hooks collect each layer's input statistics; then each layer is quantized from its
    own statistics (``quantize_from_stats``, α searched on ``alpha_grid``).
    """
    chosen = demo_layers(model)
    linears = {name: model.get_submodule(name) for name in chosen}
    with observe(linears, max_samples=max_samples) as stats:
        calibration()
    new = {}
    for name in tqdm(chosen, desc=f"quantize ({method} {fmt})", disable=not progress):
        lin = linears[name]
        layer = quantize_from_stats(
            lin.weight, lin.bias, stats[name], fmt=fmt, act_fmt=chosen[name], rank=rank,
            method=method, alpha_grid=alpha_grid,
        )  # fmt: skip
        model.set_submodule(name, layer)
        new[name] = layer
    return new


def model_bytes(model: nn.Module, float_bytes: int = 2) -> int:
    """Storage of ``model``: floating-point tensors counted at ``float_bytes`` each
    (16-bit), others (packed 4-bit codes, fp8 scales) at their own element size.

    SVDQLinear's fp32 ``smooth`` vector and scalars are counted as 16-bit too: they are
    tiny, and a 16-bit deployment stores them so.
    """
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        is_float = t.is_floating_point() and t.element_size() >= 2
        total += t.numel() * (float_bytes if is_float else t.element_size())
    return total


def make_grid(rows: Sequence[torch.Tensor], scale: int = 3, pad: int = 2) -> object:
    """A Pillow image: one row of tiles per tensor [B, 1, H, W] in [0, 1], upscaled."""
    from PIL import Image

    n = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    canvas = torch.ones(len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = img[0]
    arr = (canvas * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(arr, mode="L")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


@dataclass
class DemoResult:
    """What ``run_demo`` measured (also written as ``demo.json``)."""

    grid: str
    num_images: int
    steps: int
    device: str
    psnr_db: float  # 4-bit vs 16-bit images, mean over images
    ssim: float
    naive_psnr_db: float | None  # the naive W4A4 baseline, if run
    naive_ssim: float | None
    bytes_16bit: int
    bytes_4bit: int
    layers_quantized: int
    seconds: float


def _image_metrics(ref: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    """Mean per-image PSNR (dB) and SSIM of ``test`` against ``ref``, images in [0, 1]."""
    from svdquant.eval.images import psnr_ssim

    m = psnr_ssim(ref, test)
    return m["psnr"], m["ssim"]


def run_demo(
    out_dir: str | Path = "svdquant-demo",
    device: str | torch.device | None = None,
    num_images: int = 10,
    *,
    steps: int = 20,
    seed: int = 0,
    fmt: str = "int4",
    rank: int = 16,
    calibration_images: int = 10,
    naive_baseline: bool = True,
    weights: str | Path | None = None,
    progress: bool = True,
) -> DemoResult:
    """Load the shipped DiT, quantize it with SVDQuant, compare 16-bit and 4-bit samples.

    Writes ``out_dir/grid.png`` (rows: 16-bit, SVDQuant W4A4, and the naive W4A4
    baseline if ``naive_baseline``; same seeds and labels column by column) and
    ``out_dir/demo.json``; prints a summary; returns a ``DemoResult``. ``device``
    defaults to CUDA when available (bf16 there, fp32 on the CPU). Calibration runs the
    16-bit model on ``calibration_images`` images of other seeds than the evaluated ones.
    """
    t0 = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = torch.arange(num_images) % NUM_CLASSES
    calib_labels = torch.arange(calibration_images) % NUM_CLASSES

    runs = 3 + int(naive_baseline)  # 16-bit, calibration, 4-bit (+ naive)
    bar = tqdm(total=runs * steps, desc="denoising", disable=not progress)
    model = load_model(weights, device, dtype)
    bytes_16 = model_bytes(model)
    images = [sample(model, labels, seed=seed, steps=steps, progress=bar.update)]

    def calibrate() -> None:
        sample(model, calib_labels, seed=seed + 1, steps=steps, progress=bar.update)

    baseline = None
    if naive_baseline:  # the same model, quantized without smoothing nor low-rank branch
        naive = load_model(weights, device, dtype)
        quantize_demo_model(
            naive, lambda: sample(naive, calib_labels[:4], seed=seed + 1, steps=2), fmt=fmt,
            method="naive", progress=False,
        )  # fmt: skip
        baseline = sample(naive, labels, seed=seed, steps=steps, progress=bar.update)
        del naive
    layers = quantize_demo_model(model, calibrate, fmt=fmt, rank=rank, progress=progress)
    images.append(sample(model, labels, seed=seed, steps=steps, progress=bar.update))
    bar.close()
    if baseline is not None:
        images.append(baseline)

    psnr, ssim = _image_metrics(images[0], images[1])
    naive_psnr, naive_ssim = (
        _image_metrics(images[0], baseline) if baseline is not None else (None, None)
    )
    grid = out / "grid.png"
    make_grid(images).save(grid)
    result = DemoResult(
        grid=str(grid), num_images=num_images, steps=steps, device=str(device),
        psnr_db=round(psnr, 2), ssim=round(ssim, 4),
        naive_psnr_db=None if naive_psnr is None else round(naive_psnr, 2),
        naive_ssim=None if naive_ssim is None else round(naive_ssim, 4),
        bytes_16bit=bytes_16, bytes_4bit=model_bytes(model), layers_quantized=len(layers),
        seconds=round(time.perf_counter() - t0, 1),
    )  # fmt: skip
    (out / "demo.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(_summary(result, fmt, rank))
    return result


def _summary(r: DemoResult, fmt: str, rank: int) -> str:
    mb = 1 / 2**20
    lines = [
        f"SVDQuant demo: DiT on MNIST, {r.num_images} images, {r.steps} steps, {r.device}",
        f"  16-bit model      : {r.bytes_16bit * mb:6.2f} MiB",
        f"  4-bit model       : {r.bytes_4bit * mb:6.2f} MiB "
        f"({r.layers_quantized} linears W4 {fmt}, rank {rank}; "
        f"{r.bytes_16bit / r.bytes_4bit:.2f}x smaller)",
        f"  SVDQuant vs 16-bit: PSNR {r.psnr_db:.2f} dB, SSIM {r.ssim:.4f}",
    ]
    if r.naive_psnr_db is not None:
        lines.append(
            f"  naive W4A4 vs 16-bit: PSNR {r.naive_psnr_db:.2f} dB, SSIM {r.naive_ssim:.4f}"
        )
    lines.append(f"  grid: {r.grid}  ({r.seconds:.0f} s)")
    return "\n".join(lines)
