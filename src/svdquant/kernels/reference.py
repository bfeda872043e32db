"""The PyTorch reference of the quantized linear layer: exact, slow, runs anywhere.

This is the paper's arithmetic written plainly, the ground truth the Triton kernels are
tested against:

    y = Q(x / s) · Q(R)ᵀ + ((x / s) · L_downᵀ) · L_upᵀ + b

with Q the dynamic activation quantizer (per token, per group along K) and Q(R) the
stored 4-bit residual. All arithmetic is fp32; the output takes the input's dtype.
"""

from __future__ import annotations

import torch

from svdquant import formats

__all__ = ["ACT_FORMATS", "quantize_activations", "svdq_linear"]

#: Activation formats: the two 4-bit formats (W4A4), fp8 E4M3 per token (W4A8) and
#: "none" (16-bit activations, W4A16).
ACT_FORMATS = ("int4", "nvfp4", "fp8", "none")


def _row_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    amax = x.abs().amax(-1, keepdim=True)
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


def quantize_activations(x: torch.Tensor, act_fmt: str) -> torch.Tensor:
    """What the activations ``x`` ([tokens, K], fp32) stand for after quantization.

    ``nvfp4`` and ``fp8`` take one fp32 scale per token (row), so a token's result never
    depends on the other tokens of the batch. Values that overflow a format saturate.
    NaN and Inf propagate into the output of their token.
    """
    if act_fmt in ("int4", "nvfp4"):
        ts = None
        if act_fmt == "nvfp4":
            ts = _row_scale(x, formats.E2M1_MAX * formats.FP8_E4M3_MAX)
        return formats.fake_quantize(x, act_fmt, tensor_scale=ts, saturate=True)
    if act_fmt == "fp8":
        scale = _row_scale(x, formats.FP8_E4M3_MAX)
        q = (x / scale).clamp(-formats.FP8_E4M3_MAX, formats.FP8_E4M3_MAX)
        return q.to(torch.float8_e4m3fn).float() * scale
    if act_fmt == "none":
        return x
    raise ValueError(f"unknown activation format {act_fmt!r}; supported: {ACT_FORMATS}")


def svdq_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
    act_fmt: str,
) -> torch.Tensor:
    """The quantized linear layer on ``x`` of shape ``[..., K]``; returns ``[..., N]``.

    ``qweight``/``wscales``/``wtensor_scale`` hold the residual in ``fmt`` (see
    ``svdquant.formats``), ``smooth`` is ``s`` [K], ``lowrank_down`` is [r, K] and
    ``lowrank_up`` [N, r].
    """
    k = smooth.shape[0]
    n = qweight.shape[0]
    lead = x.shape[:-1]
    xs = x.reshape(-1, k).float() / smooth.float()
    w = formats.dequantize(
        formats.QuantizedTensor(qweight, wscales, wtensor_scale, fmt, torch.Size((n, k)))
    )
    y = quantize_activations(xs, act_fmt) @ w.t()
    if lowrank_down.shape[0]:
        y = y + (xs @ lowrank_down.float().t()) @ lowrank_up.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, n).to(x.dtype)
