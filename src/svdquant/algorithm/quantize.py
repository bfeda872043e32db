"""SVDQuant on one linear layer: smooth, absorb outliers with a low-rank branch, quantize
the residual to 4 bits, choosing the migration strength α by the layer's output error."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from svdquant import formats, kernels
from svdquant.algorithm.calibration import ActivationStats
from svdquant.algorithm.gptq import gptq_quantize
from svdquant.algorithm.lowrank import low_rank
from svdquant.algorithm.smooth import smooth_scales
from svdquant.nn import SVDQLinear

__all__ = ["ALPHA_GRID", "METHODS", "quantize_from_stats", "quantize_linear"]

#: The methods, as (smoothing, low-rank): each a baseline of the paper's comparison.
METHODS: dict[str, tuple[bool, bool]] = {
    "naive": (False, False),  # plain W4A4
    "smoothquant": (True, False),  # smoothing only
    "lowrank": (False, True),  # low-rank branch only
    "svdquant": (True, True),  # both (the default)
}

#: The α grid searched when ``alpha=None``.
ALPHA_GRID: tuple[float, ...] = tuple(i / 10 for i in range(11))


def _lowrank_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def _check_linear(linear: nn.Module) -> None:
    w = getattr(linear, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"expected an nn.Linear with a weight, got {type(linear).__name__}")
    if w.dim() != 2:
        raise ValueError(f"a linear layer's weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    if 0 in w.shape:
        raise ValueError(
            f"cannot quantize a layer with an empty weight {tuple(w.shape)} (K or N = 0)"
        )
    if not torch.is_floating_point(w):
        raise ValueError(f"the weight must be floating point, got {w.dtype}")
    if not torch.isfinite(w).all():
        raise ValueError("the weight contains NaN or Inf")


def _build(
    w: torch.Tensor,
    bias: torch.Tensor | None,
    stats: ActivationStats,
    alpha: float,
    *,
    fmt: str,
    act_fmt: str | None,
    rank: int,
    gptq: bool,
    dtype: torch.dtype,
) -> SVDQLinear:
    n, k = w.shape
    s = smooth_scales(stats.amax, w.abs().amax(0), alpha)
    w_hat = w * s
    down, up = low_rank(w_hat, rank, dtype)
    resid = w_hat - up.float() @ down.float() if rank else w_hat
    if gptq:
        if stats.hessian is None:
            raise ValueError("gptq=True needs statistics collected with hessian=True")
        q = gptq_quantize(resid, stats.hessian / torch.outer(s, s), fmt)
    else:
        q = formats.quantize(resid, fmt)
    layer = SVDQLinear(
        k, n, bias is not None, fmt=fmt, act_fmt=act_fmt, rank=rank, dtype=dtype, device=w.device
    )
    layer.qweight.copy_(q.packed)
    layer.wscales.copy_(q.scales)
    layer.wtensor_scale.copy_(q.tensor_scale)
    layer.smooth.copy_(s)
    layer.act_amax.copy_((stats.amax / s).max())
    layer.lowrank_down.copy_(down)
    layer.lowrank_up.copy_(up)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def _output_error(layer: SVDQLinear, x: torch.Tensor, y: torch.Tensor) -> float:
    yq = kernels.svdq_linear(
        x, layer.qweight, layer.wscales, layer.wtensor_scale, layer.smooth,
        layer.lowrank_down, layer.lowrank_up, None, layer.fmt, layer.act_fmt,
    )  # fmt: skip
    return ((yq - y).norm() / y.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def quantize_from_stats(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: ActivationStats,
    *,
    fmt: str = "int4",
    act_fmt: str | None = None,
    rank: int = 32,
    alpha: float | None = None,
    gptq: bool = False,
    method: str = "svdquant",
    alpha_grid: Sequence[float] = ALPHA_GRID,
) -> SVDQLinear:
    """Quantize the layer ``(weight, bias)`` from calibration statistics of its inputs.

    The model-level quantizer calls this per layer; ``quantize_linear`` is the one-layer
    front end. Arguments are those of ``quantize_linear``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; supported: {sorted(METHODS)}")
    formats.get_format(fmt)
    use_smooth, use_lowrank = METHODS[method]
    stats.check_ready()
    if stats.in_features != weight.shape[1]:
        raise ValueError(
            f"statistics are for K = {stats.in_features} but the weight has K = {weight.shape[1]}"
        )
    n, k = weight.shape
    rank = rank if use_lowrank else 0
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if rank > min(n, k):
        raise ValueError(
            f"rank {rank} is larger than this layer allows: min(N, K) = min({n}, {k}) = "
            f"{min(n, k)}; use a smaller rank"
        )
    if alpha is not None and not use_smooth:
        raise ValueError(f"method={method!r} does not smooth: alpha must be None")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    alphas = [alpha] if alpha is not None else list(alpha_grid) if use_smooth else [0.0]
    dtype = _lowrank_dtype(weight.dtype)
    w = weight.detach().float()
    b = None if bias is None else bias.detach().to(dtype)
    opts = dict(fmt=fmt, act_fmt=act_fmt, rank=rank, dtype=dtype)

    best_alpha = alphas[0]
    if len(alphas) > 1:
        x = stats.samples
        y = x @ w.t()
        errors = [
            _output_error(_build(w, None, stats, a, gptq=False, **opts), x, y) for a in alphas
        ]
        best_alpha = alphas[min(range(len(alphas)), key=errors.__getitem__)]
    layer = _build(w, b, stats, best_alpha, gptq=gptq, **opts)
    layer.alpha = best_alpha
    return layer


def _as_batches(calib_inputs: torch.Tensor | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    if isinstance(calib_inputs, torch.Tensor):
        return (calib_inputs,)
    return calib_inputs


def quantize_linear(
    linear: nn.Linear,
    calib_inputs: torch.Tensor | Iterable[torch.Tensor],
    *,
    fmt: str = "int4",
    act_fmt: str | None = None,
    rank: int = 32,
    alpha: float | None = None,
    gptq: bool = False,
    method: str = "svdquant",
    alpha_grid: Sequence[float] = ALPHA_GRID,
    max_samples: int = 2048,
) -> SVDQLinear:
    """Quantize one ``nn.Linear`` with SVDQuant (or a baseline) into an ``SVDQLinear``.

    Args:
        linear: the layer; left unchanged.
        calib_inputs: inputs of the layer, ``[..., K]``: one tensor or an iterable of
            batches (streamed: only running statistics and a subsample are kept).
        fmt: weight format, ``"int4"`` or ``"nvfp4"``.
        act_fmt: activation format (``kernels.ACT_FORMATS``); default: ``fmt`` (W4A4).
        rank: rank of the 16-bit low-rank branch (0 disables it).
        alpha: smoothing strength in [0, 1]; ``None`` searches ``alpha_grid`` for the
            lowest output error on the calibration samples.
        gptq: quantize the residual with GPTQ (uses the inputs' Hessian).
        method: ``"svdquant"`` (smoothing + low-rank), ``"smoothquant"``, ``"lowrank"``
            or ``"naive"`` — the paper's baselines, one flag apart.
        max_samples: calibration tokens kept for the α search.

    The chosen α is kept as ``layer.alpha``.
    """
    _check_linear(linear)
    k = linear.weight.shape[1]
    stats = ActivationStats(k, hessian=gptq, max_samples=max_samples)
    for batch in _as_batches(calib_inputs):
        stats.update(batch.to(linear.weight.device))
    stats.check_ready()
    return quantize_from_stats(
        linear.weight, linear.bias, stats, fmt=fmt, act_fmt=act_fmt, rank=rank, alpha=alpha,
        gptq=gptq, method=method, alpha_grid=alpha_grid,
    )  # fmt: skip
