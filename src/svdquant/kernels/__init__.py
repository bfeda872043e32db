"""Compute backends of the quantized linear layer.

``reference``: plain PyTorch (``kernels/reference.py``), exact and device-agnostic.
``triton``: the Hopper engine — the paper's 4-bit formats in memory, computed on fp8
tensor cores (``quantize.py``, ``widen.py``, ``gemm.py``, ``gemm_gated.py``, ``gemv.py``;
custom ops in ``ops.py``; ``docs/engine.md``). It runs on CUDA, or on the CPU in
triton's interpreter (``TRITON_INTERPRET=1`` set before the first kernel call), which is
how CI tests it.
``auto``: ``triton`` on CUDA GPUs that have fp8 E4M3 (compute capability 8.9 or later:
Ada, Hopper, Blackwell) when triton imports, ``reference`` otherwise (with a warning once
per older GPU: the same outputs within rounding, not the speed).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from svdquant.kernels.ops import (
    check_cat_inputs,
    check_gated_inputs,
    gate_residual,
    gate_residual_modulate,
    gated_in_quantize,
    layer_norm_modulate,
    rms_norm_rope,
    splits_in_gemm,
    svdq_geglu_triton,
    svdq_linear_cat_triton,
    svdq_linear_gated_triton,
    svdq_linear_split_triton,
    svdq_linear_triton,
    svdq_mlp_triton,
)
from svdquant.kernels.reference import ACT_FORMATS, quantize_activations, svdq_linear

BACKENDS = ("auto", "reference", "triton")

_HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = [
    "ACT_FORMATS",
    "BACKENDS",
    "check_cat_inputs",
    "check_gated_inputs",
    "gate_residual",
    "gate_residual_modulate",
    "gated_in_quantize",
    "layer_norm_modulate",
    "quantize_activations",
    "resolve_backend",
    "rms_norm_rope",
    "splits_in_gemm",
    "svdq_geglu_triton",
    "svdq_linear",
    "svdq_linear_cat_triton",
    "svdq_linear_gated_triton",
    "svdq_linear_split_triton",
    "svdq_linear_triton",
    "svdq_mlp_triton",
]


#: The engine's kernels hold activations and weights as fp8 E4M3 (Triton's ``fp8e4nv``),
#: which Triton compiles only for GPUs of this compute capability or later.
MIN_CAPABILITY = (8, 9)
_warned: set[int] = set()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@torch.compiler.assume_constant_result
def _gpu_has_fp8(index: int) -> bool:
    """Whether CUDA GPU ``index`` can run the engine (``MIN_CAPABILITY``). A constant to
    ``torch.compile``: it runs at trace time, not in the graph."""
    return _capability(index) >= MIN_CAPABILITY


def _gpu_name(index: int) -> str:
    major, minor = _capability(index)
    return f"{torch.cuda.get_device_name(index)} (compute capability {major}.{minor})"


@torch.compiler.assume_constant_result
def _auto_on_cuda(index: int) -> str:
    """``auto``'s choice on CUDA GPU ``index``, warning once per GPU that falls back."""
    if _gpu_has_fp8(index):
        return "triton"
    if index not in _warned:
        _warned.add(index)
        warnings.warn(
            f"svdquant's fp8 engine needs compute capability 8.9 or later (Ada, Hopper, "
            f"Blackwell); {_gpu_name(index)} runs the exact PyTorch reference instead: the "
            "same layer outputs within rounding, without the engine's speed",
            stacklevel=3,
        )
    return "reference"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend (``"reference"`` or ``"triton"``) that a layer set to ``backend`` uses
    for inputs on ``device``."""
    cuda = device.type == "cuda"
    index = (
        (device.index if device.index is not None else torch.cuda.current_device()) if cuda else 0
    )
    if backend == "auto":
        return _auto_on_cuda(index) if cuda and _HAS_TRITON else "reference"
    if backend == "triton" and not _HAS_TRITON:
        raise RuntimeError("backend 'triton' needs the triton package (pip install triton)")
    if backend == "triton" and cuda and not _gpu_has_fp8(index):
        raise RuntimeError(
            f"backend 'triton' needs fp8 E4M3 support, compute capability 8.9 or later "
            f"(Ada, Hopper, Blackwell); {_gpu_name(index)} has none: use backend='auto' or "
            "'reference' (the exact PyTorch path, slower)"
        )
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if backend == "triton" and device.type != "cuda" and not interpret:
        raise RuntimeError(
            f"backend 'triton' runs on CUDA tensors, got {device.type}; on the CPU use "
            "'reference' (or set TRITON_INTERPRET=1 before importing triton, for tests)"
        )
    return backend
