"""Compute backends of the quantized linear layer.

``reference``: plain PyTorch (``kernels/reference.py``), exact and device-agnostic.
"""

from svdquant.kernels.reference import ACT_FORMATS, quantize_activations, svdq_linear

BACKENDS = ("auto", "reference")

__all__ = ["ACT_FORMATS", "BACKENDS", "quantize_activations", "svdq_linear"]
