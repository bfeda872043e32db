"""Compute backends of the quantized linear layer.

``reference``: plain PyTorch (``kernels/reference.py``), exact and device-agnostic.
``triton``: the Hopper engine — the paper's 4-bit formats in memory, computed on fp8
tensor cores (``quantize.py``, ``widen.py``, ``gemm.py``, ``gemv.py``; custom ops in
``ops.py``; ``docs/engine.md``). It runs on CUDA, or on the CPU in triton's interpreter
(``TRITON_INTERPRET=1`` set before the first kernel call), which is how CI tests it.
``auto``: ``triton`` on CUDA tensors when triton imports, ``reference`` otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from svdquant.kernels.ops import (
    check_cat_inputs,
    splits_in_gemm,
    svdq_linear_cat_triton,
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
    "quantize_activations",
    "resolve_backend",
    "splits_in_gemm",
    "svdq_linear",
    "svdq_linear_cat_triton",
    "svdq_linear_split_triton",
    "svdq_linear_triton",
    "svdq_mlp_triton",
]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend (``"reference"`` or ``"triton"``) that a layer set to ``backend`` uses
    for inputs on ``device``."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and _HAS_TRITON else "reference"
    if backend == "triton" and not _HAS_TRITON:
        raise RuntimeError("backend 'triton' needs the triton package (pip install triton)")
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if backend == "triton" and device.type != "cuda" and not interpret:
        raise RuntimeError(
            f"backend 'triton' runs on CUDA tensors, got {device.type}; on the CPU use "
            "'reference' (or set TRITON_INTERPRET=1 before importing triton, for tests)"
        )
    return backend
