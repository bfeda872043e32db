"""diffusers integration: calibrate on a pipeline, save a quantized denoiser beside its
diffusers config, and load it back into a pipeline without ever building its 16-bit
weights.

A quantized directory holds:

* ``svdquant.safetensors``: every tensor of the denoiser (4-bit layers and 16-bit rest),
* ``config.json``: the denoiser's diffusers config (so the architecture is known),
* ``svdquant.json``: the diffusers class, the pipeline component it replaces
  (``transformer`` / ``unet``), the base pipeline it came from and the quantization config.

Loading builds the model from ``config.json`` on the meta device (parameters only;
buffers such as positional tables are small and built for real), swaps the quantized
layers for ``SVDQLinear`` shells and fills everything from the safetensors file, so peak
memory stays near the checkpoint size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from svdquant import distributed
from svdquant.checkpoint import (
    FILENAME,
    CheckpointError,
    _read_header,
    load_quantized,
    save_quantized,
)
from svdquant.models import ADAPTERS, UnsupportedModelError, get_adapter, supported
from svdquant.prompts import load_prompts
from svdquant.quantize_model import QuantizeConfig, quantize_model

__all__ = [
    "INFO_FILENAME",
    "NotADiffusersModelError",
    "denoiser",
    "dtype_kwargs",
    "is_pipeline_dir",
    "is_quantized_dir",
    "load_pipeline",
    "load_quantized_model",
    "pipeline_calibration",
    "quantize_pipeline",
    "save_pretrained_quantized",
]

INFO_FILENAME = "svdquant.json"
INFO_VERSION = 1

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


class NotADiffusersModelError(ValueError):
    """A path that is neither a diffusers pipeline nor an svdquant quantized directory."""


def is_quantized_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory written by ``save_pretrained_quantized``."""
    return (Path(path) / FILENAME).is_file()


def is_pipeline_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a local diffusers pipeline (it has a ``model_index.json``)."""
    return (Path(path) / "model_index.json").is_file()


def denoiser(pipe: Any) -> tuple[str, nn.Module]:
    """``(component name, module)`` of the pipeline's denoiser (``transformer`` or ``unet``)."""
    for component in ("transformer", "unet"):
        m = getattr(pipe, component, None)
        if isinstance(m, nn.Module):
            return component, m
    raise UnsupportedModelError(
        f"{type(pipe).__name__} has no `transformer` or `unet` component; svdquant supports "
        f"pipelines whose denoiser is one of: {supported()}"
    )


def pipeline_calibration(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    *,
    num_inference_steps: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    progress: bool = True,
    **call_kwargs: Any,
) -> Callable[[nn.Module], None]:
    """A ``calibration`` callable for ``quantize_model``: runs ``pipe`` over ``prompts``
    (default: the shipped set) through all denoising steps, with ``model`` installed as
    the pipeline's denoiser (the original is put back afterwards).

    Latents are not decoded (``output_type="latent"``); each batch gets a seeded CPU
    generator, so calibration is reproducible. Under ``torchrun`` the batches are sharded
    across ranks (``svdquant.distributed``). ``call_kwargs`` go to ``pipe(...)``
    (e.g. ``height``, ``width``, ``guidance_scale``).
    """
    prompts = list(prompts) if prompts is not None else load_prompts()
    if not prompts:
        raise ValueError("calibration needs at least one prompt")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    component, _ = denoiser(pipe)
    kwargs = dict(call_kwargs)
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    kwargs.setdefault("output_type", "latent")

    def run(model: nn.Module) -> None:
        old = getattr(pipe, component)
        old_bar = dict(getattr(pipe, "_progress_bar_config", {}))
        setattr(pipe, component, model)
        pipe.set_progress_bar_config(disable=True)
        try:
            # under torchrun each rank runs its share of the batches; a batch keeps its
            # seed, so the ranks together see exactly what one process would
            starts = distributed.shard(range(0, len(prompts), batch_size))
            bar = progress and distributed.is_main()
            for i in tqdm(starts, desc="svdquant: calibration", disable=not bar):
                gen = torch.Generator("cpu").manual_seed(seed + i)
                pipe(prompt=prompts[i : i + batch_size], generator=gen, **kwargs)
        finally:
            setattr(pipe, component, old)
            pipe._progress_bar_config = old_bar

    return run


def quantize_pipeline(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    config: QuantizeConfig | None = None,
    **calibration_kwargs: Any,
) -> nn.Module:
    """Quantize the denoiser of ``pipe`` in place, calibrating on ``prompts``; returns it."""
    _, model = denoiser(pipe)
    cfg = config or QuantizeConfig()
    calib = pipeline_calibration(pipe, prompts, progress=cfg.progress, **calibration_kwargs)
    return quantize_model(model, calib, cfg)


def save_pretrained_quantized(
    model: nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    base_model: str | os.PathLike[str] | None = None,
    component: str | None = None,
) -> Path:
    """Save a quantized diffusers denoiser to ``out_dir``: ``svdquant.safetensors``,
    its diffusers ``config.json`` and ``svdquant.json``.

    ``base_model``: the pipeline it belongs to (a local directory, stored as an absolute
    path, or a hub id); ``load_pipeline`` takes the other components from there.
    """
    adapter = get_adapter(model)
    if not hasattr(model, "save_config"):
        raise TypeError(f"{type(model).__name__} is not a diffusers model (no save_config)")
    out = Path(out_dir)
    save_quantized(model, out)
    model.save_config(out)
    if base_model is not None and Path(base_model).exists():
        base_model = str(Path(base_model).resolve())
    info = {
        "format": "svdquant-diffusers",
        "version": INFO_VERSION,
        "class_name": adapter.class_name,
        "adapter": adapter.name,
        "component": component or adapter.component,
        "base_model": None if base_model is None else str(base_model),
        "quantize_config": getattr(model, "_svdquant_config", None),
    }
    (out / INFO_FILENAME).write_text(json.dumps(info, indent=2) + "\n")
    return out


def _read_info(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise NotADiffusersModelError(f"{path} is not a directory")
    if not is_quantized_dir(path):
        raise NotADiffusersModelError(
            f"{path} is not an svdquant quantized model (no {FILENAME}); quantize one with "
            "`svdquant quantize --model <diffusers dir> --out <dir>`"
        )
    info_file = path / INFO_FILENAME
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: no config.json beside {FILENAME}: the architecture is unknown "
            "(save with svdquant.save_pretrained_quantized)"
        )
    return info


def _inspect(p: Path) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Check a quantized directory: ``(svdquant.json info, class name, tensor header)``."""
    info = _read_info(p)
    config = json.loads((p / "config.json").read_text())
    class_name = config.get("_class_name") or info.get("class_name")
    if class_name not in ADAPTERS:
        raise UnsupportedModelError(
            f"{p}: unsupported architecture {class_name!r}; svdquant supports: {supported()}"
        )
    header, ckpt = _read_header(p / FILENAME)
    if ckpt.get("root") != class_name:
        raise CheckpointError(
            f"{p}: the checkpoint was made for {ckpt.get('root')!r} but config.json "
            f"describes {class_name!r}"
        )
    return info, class_name, header


def dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained``'s dtype argument: ``dtype=`` on recent diffusers (which
    deprecate ``torch_dtype=``), ``torch_dtype=`` on older ones."""
    if dtype is None:
        return {}
    from diffusers.utils import deprecation_utils

    new = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype" if new else "torch_dtype": dtype}


def _match_dtypes(model: nn.Module, header: dict[str, Any]) -> None:
    """Give each parameter/buffer of ``model`` the dtype it has in the checkpoint."""
    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                info = header.get(prefix + name)
                if t is None or info is None:
                    continue
                dt = _ST_DTYPES.get(info.get("dtype"))
                if dt is None or dt == t.dtype:
                    continue
                new = torch.empty(t.shape, dtype=dt, device="meta") if t.is_meta else t.to(dt)
                table[name] = (
                    nn.Parameter(new, requires_grad=False) if table is mod._parameters else new
                )


def load_quantized_model(
    path: str | os.PathLike[str],
    *,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a quantized denoiser saved by ``save_pretrained_quantized``.

    The model is built from ``config.json`` with its parameters on the meta device, the
    quantized layers become ``SVDQLinear`` shells, and every tensor is read from the
    safetensors file onto ``device``: no 16-bit copy of a quantized layer ever exists.
    ``torch_dtype`` casts the 16-bit tensors afterwards (the 4-bit codes and their scales
    keep their dtype).
    """
    import diffusers
    from accelerate import init_empty_weights

    p = Path(path)
    _, class_name, header = _inspect(p)
    cls = getattr(diffusers, class_name)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(cls.load_config(p))
    ADAPTERS[class_name].prepare(model)
    _match_dtypes(model, header)
    load_quantized(p, model, device=device)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise CheckpointError(f"{p}: tensor {on_meta[0]!r} was not filled by the checkpoint")
    model.eval()
    model.to(device)  # buffers built outside the checkpoint (e.g. positional tables)
    if torch_dtype is not None:
        model.to(torch_dtype)
    return model


def _pipeline_class_of(base: Path, component: str) -> str | None:
    index = json.loads((base / "model_index.json").read_text())
    entry = index.get(component)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def load_pipeline(
    path: str | os.PathLike[str],
    *,
    base_model: str | os.PathLike[str] | None = None,
    torch_dtype: torch.dtype | None = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """A diffusers pipeline whose denoiser is the quantized model in ``path``.

    The other components (text encoders, VAE, scheduler) come from ``base_model``
    (default: the pipeline recorded at quantization time) via
    ``DiffusionPipeline.from_pretrained``; the 16-bit denoiser there is never loaded.
    The result is an ordinary pipeline: ``.to()``, ``enable_model_cpu_offload()``,
    generators and batches work as usual.
    """
    from diffusers import DiffusionPipeline

    p = Path(path)
    info, class_name, _ = _inspect(p)
    base = base_model if base_model is not None else info.get("base_model")
    if base is None:
        raise ValueError(
            f"{p} does not record the pipeline it was made from: pass base_model= (the "
            "diffusers pipeline directory providing text encoders, VAE and scheduler)"
        )
    component = info.get("component") or get_adapter(class_name).component
    base_path = Path(base)
    if base_path.exists():
        if not is_pipeline_dir(base_path):
            raise NotADiffusersModelError(
                f"{base_path} is not a diffusers pipeline directory (no model_index.json)"
            )
        theirs = _pipeline_class_of(base_path, component)
        if theirs != class_name:
            raise CheckpointError(
                f"{p}: the checkpoint is for a {class_name}, but the pipeline at {base_path} "
                f"has {theirs or 'no'} {component!r}: it was made for another architecture"
            )
    model = load_quantized_model(p, torch_dtype=torch_dtype)
    return DiffusionPipeline.from_pretrained(
        str(base), **dtype_kwargs(torch_dtype), **{component: model}, **from_pretrained_kwargs
    )
