"""The engine's kernels as ``torch.library`` custom ops, and the layer built from them.

Each kernel is one op (``svdquant::quantize_act``, ``::quantize_act_cat``,
``::quantize_act_gated``, ``::widen_weight``, ``::quantize_and_widen``, ``::fp8_gemm``,
``::fp8_gemm_split``, ``::w4a16_linear``; beside the layer, FLUX's ``::rms_norm_rope``,
``::layer_norm_modulate``, ``::gate_residual`` and ``::gate_residual_modulate``) with a
fake (meta) implementation that only computes output shapes, so
``torch.compile(fullgraph=True)`` traces a layer into three opaque nodes with no graph
break and no host sync, and Inductor fuses the elementwise work around them. Eager
calls skip PyTorch's dispatcher and run the implementations directly (``_ops``). Triton
is imported on the first real call, not here.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable

import torch

from svdquant.kernels import reference

__all__ = [
    "check_cat_inputs",
    "check_gated_inputs",
    "gate_residual",
    "gate_residual_modulate",
    "layer_norm_modulate",
    "rms_norm_rope",
    "splits_in_gemm",
    "svdq_geglu_triton",
    "svdq_linear_cat_triton",
    "svdq_linear_gated_triton",
    "svdq_linear_split_triton",
    "svdq_linear_triton",
    "svdq_mlp_triton",
]

_FP8 = torch.float8_e4m3fn

#: The ops' Python implementations, by op name: what an eager call runs directly.
_EAGER = types.SimpleNamespace()


def _op(name: str) -> Callable[[Callable], torch.library.CustomOpDef]:
    """Register the decorated function as the custom op ``svdquant::name`` (no mutated
    arguments) and keep it in ``_EAGER`` for ``_ops``."""

    def register(fn: Callable) -> torch.library.CustomOpDef:
        setattr(_EAGER, name, fn)
        return torch.library.custom_op(f"svdquant::{name}", mutates_args=())(fn)

    return register


def _ops(x: torch.Tensor):
    """The engine's ops for a layer call on ``x``: ``torch.ops.svdquant`` while
    ``torch.compile`` or ``torch.export`` traces (or ``x`` is a fake or other tensor
    subclass), so the graph holds opaque nodes with fake implementations; otherwise the
    implementations themselves. An eager call through the dispatcher costs ~50 µs of host
    time an op (H200, ``bench/probe_launch.py``) — a FLUX step runs ~1000 of them, and
    without CUDA graphs the step is bound by the host."""
    if torch.compiler.is_compiling() or type(x) is not torch.Tensor:
        return torch.ops.svdquant
    global _EAGER_CALLS
    _EAGER_CALLS += 1
    if _EAGER_CALLS == EAGER_HINT_AFTER and _on_gpu_eagerly(x):
        warnings.warn(EAGER_HINT, stacklevel=4)
    return _EAGER


#: After this many eager op calls on a GPU (~13 FLUX.1 steps, ~10 SDXL steps; a
#: ``cuda_graphed`` model's first call and capture per input signature run ~3,000 for
#: FLUX), one hint that the steps should be replayed: our layers launch their kernels from
#: Python, which bounds a step's speed on the smaller models (v40: PixArt-Σ, SDXL, SANA
#: 2.3–4× slower eagerly than replayed).
EAGER_HINT_AFTER = 20_000
EAGER_HINT = (
    "svdquant: the quantized layers keep running eagerly on the GPU, where launching their "
    "kernels from Python bounds the speed (smaller models: 2-4x slower than replayed). "
    "Replay the steps: pipe.transformer = svdquant.cuda_graphed(pipe.transformer) (or "
    "pipe.unet), or torch.compile(..., mode='reduce-overhead'); `svdquant generate` does."
)
_EAGER_CALLS = 0


def _on_gpu_eagerly(x: torch.Tensor) -> bool:
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()


#: on a layer's ``act_amax`` tensor: (its version counter, the scale S computed from it)
_SCALE_ATTR = "_svdquant_act_scale"


def _act_scale(act_amax: torch.Tensor) -> torch.Tensor:
    """``reference.act_scale_from_amax(act_amax)``, computed once per value of the buffer.

    Computing S is four tiny kernels (compare, divide, fill, select); per FLUX step that
    is ~1100 launches, each a node of a CUDA graph. The result is kept on the tensor
    itself with its version counter: an in-place update (``load_state_dict``) or a new
    tensor computes it again. Traced by ``torch.compile`` it is computed in the graph
    (Inductor fuses it); while a CUDA graph is being captured nothing new is kept (a
    tensor made during capture holds its value only when the graph replays); a graph
    captured with a kept S goes on using it (capture again after changing ``act_amax``).
    """
    if torch.compiler.is_compiling():
        return reference.act_scale_from_amax(act_amax)
    try:
        version = act_amax._version
    except RuntimeError:  # an inference-mode tensor has no version counter
        return reference.act_scale_from_amax(act_amax)
    cached = getattr(act_amax, _SCALE_ATTR, None)
    if cached is not None and cached[0] == version:
        return cached[1]
    s = reference.act_scale_from_amax(act_amax)
    capturing = act_amax.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing:
        setattr(act_amax, _SCALE_ATTR, (version, s))
    return s


@_op("quantize_act")
def quantize_act(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    act_scale: torch.Tensor,
    k_out: int,
    act_fmt: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.quantize.quantize_act`` as a custom op."""
    from svdquant.kernels.quantize import quantize_act as impl

    return impl(x, smooth, lowrank_down, act_scale, k_out, act_fmt)


def _quantized_like(x: torch.Tensor, lowrank_down: torch.Tensor, k_out: int):
    """Empty tensors shaped like a quantize's outputs (the fake implementations', and the
    buffers the widen-first overlap allocates before both launches)."""
    m = x.shape[0]
    return (
        x.new_empty(m, k_out, dtype=_FP8),
        x.new_empty(m, lowrank_down.shape[0], dtype=torch.float32),
    )


@quantize_act.register_fake
def _(x, smooth, lowrank_down, act_scale, k_out, act_fmt):
    return _quantized_like(x, lowrank_down, k_out)


@_op("quantize_act_cat")
def quantize_act_cat(
    x: torch.Tensor,
    tail: torch.Tensor,
    tail_act: str,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    act_scale: torch.Tensor,
    k_out: int,
    act_fmt: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.quantize.quantize_act`` of ``cat([x, tail_act(tail)], -1)`` as a custom op."""
    from svdquant.kernels.quantize import quantize_act as impl

    return impl(x, smooth, lowrank_down, act_scale, k_out, act_fmt, tail, tail_act)


@quantize_act_cat.register_fake
def _(x, tail, tail_act, smooth, lowrank_down, act_scale, k_out, act_fmt):
    return _quantized_like(x, lowrank_down, k_out)


@_op("quantize_act_gated")
def quantize_act_gated(
    x: torch.Tensor,
    gate: torch.Tensor,
    gate_act: str,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    act_scale: torch.Tensor,
    k_out: int,
    act_fmt: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.quantize.quantize_act`` of ``x · gate_act(gate)`` as a custom op."""
    from svdquant.kernels.quantize import quantize_act as impl

    return impl(x, smooth, lowrank_down, act_scale, k_out, act_fmt, gate, gate_act, gated=True)


@quantize_act_gated.register_fake
def _(x, gate, gate_act, smooth, lowrank_down, act_scale, k_out, act_fmt):
    return _quantized_like(x, lowrank_down, k_out)


@_op("widen_weight")
def widen_weight(
    qweight: torch.Tensor, wscales: torch.Tensor, wtensor_scale: torch.Tensor, fmt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.widen.widen_weight`` as a custom op."""
    from svdquant.kernels.widen import widen_weight as impl

    return impl(qweight, wscales, wtensor_scale, fmt)


@widen_weight.register_fake
def _(qweight, wscales, wtensor_scale, fmt):
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    return qweight.new_empty(n, kp, dtype=_FP8), qweight.new_empty(n, dtype=torch.float32)


#: Overlap a layer's two memory-bound passes in ``quantize_and_widen`` (sm_90+) for inputs
#: of at least ``OVERLAP_MIN_M`` rows and weights of at most ``OVERLAP_MAX_WEIGHTS``
#: entries (None: any). Two orders:
#:
#: * ``WIDEN_FIRST`` (the default): the widen first, triggering at once, the quantize as
#:   its programmatic dependent — the widen's few programs (under half a wave) run beside
#:   the whole quantize. H200, the layer in a CUDA graph, the three ways in one run
#:   (``bench/probe_overlap.py``, ``probe_overlap-h200-2026-11-29.json``): against the
#:   launches in sequence 0.99-1.02x at M = 4608, 1.00-1.03x at M = 4096, 1.01-1.06x at
#:   M = 1024, 21504 x 3072 included; against the other order
#:   1.00-1.02x, 1.00-1.03x, 1.04-1.07x; at M = 512 (v29) 1.02-1.10x against the launches
#:   in sequence, 1.07-1.11x against the other order; at M = 256 and 384 (v30,
#:   ``bench/probe_layer.py``) 1.04-1.11x against the launches in sequence, all six shapes,
#:   and 1.05-1.10x at M = 64 and 128 (3072 x 3072, 12288 x 3072, 3072 x 12288).
#: * else the widen as the quantize's programmatic dependent: it starts with the
#:   quantize's last wave. It paid only from M = 2048 (v22/v23: M = 4096 -3.8% / -1.7%,
#:   M = 4608 -0.6% / -1.0%, M = 512 and 1024 +2-3%) and slowed 21504 x 3072 by 22-25 µs
#:   (v22): set ``OVERLAP_MIN_M = 2048``, ``OVERLAP_MAX_WEIGHTS = 3072 * 15360`` with it.
OVERLAP_WIDEN = True
WIDEN_FIRST = True
OVERLAP_MIN_M = 64
OVERLAP_MAX_WEIGHTS: int | None = None


@_op("quantize_and_widen")
def quantize_and_widen(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    act_scale: torch.Tensor,
    k_out: int,
    act_fmt: str,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    fmt: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_act`` and ``widen_weight`` in one op — ``(xq, lora_act, wq,
    s_channel)`` — so the two launches are adjacent and, independent of each other,
    overlap (``OVERLAP_WIDEN``): the quantize as the widen's programmatic dependent
    (``WIDEN_FIRST``) or the other way round. The weights' conversions come first, so no
    copy kernel sits between."""
    from svdquant.kernels.quantize import quantize_act as quantize
    from svdquant.kernels.quantize import sums_accumulate
    from svdquant.kernels.widen import widen_weight as widen

    qweight, wscales, wtensor_scale = (
        qweight.contiguous(),
        wscales.contiguous(),
        wtensor_scale.float(),
    )
    overlap = (
        OVERLAP_WIDEN
        and x.shape[0] >= OVERLAP_MIN_M
        and (OVERLAP_MAX_WEIGHTS is None or qweight.numel() * 2 <= OVERLAP_MAX_WEIGHTS)
    )
    if overlap and WIDEN_FIRST:
        # the quantize's input conversions and outputs (zeroed) first: no kernel between
        # the two launches
        x, smooth = x.contiguous(), smooth.float().contiguous()
        lowrank_down = lowrank_down.contiguous()
        out = _quantized_like(x, lowrank_down, k_out)
        if sums_accumulate(x, lowrank_down, k_out):
            out[1].zero_()  # the K splits' low-rank partial sums meet in it
        wq, s_channel = widen(qweight, wscales, wtensor_scale, fmt, trigger=True)
        xq, lora = quantize(x, smooth, lowrank_down, act_scale, k_out, act_fmt, pdl=True, out=out)
        return xq, lora, wq, s_channel
    xq, lora = quantize(x, smooth, lowrank_down, act_scale, k_out, act_fmt, trigger=overlap)
    wq, s_channel = widen(qweight, wscales, wtensor_scale, fmt, pdl=overlap)
    return xq, lora, wq, s_channel


@quantize_and_widen.register_fake
def _(x, smooth, lowrank_down, act_scale, k_out, act_fmt, qweight, wscales, wtensor_scale, fmt):
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    return (
        *_quantized_like(x, lowrank_down, k_out),
        qweight.new_empty(n, kp, dtype=_FP8),
        qweight.new_empty(n, dtype=torch.float32),
    )


@_op("dequantize_weight")
def dequantize_weight(
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    fmt: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``kernels.widen.dequantize_weight`` as a custom op."""
    from svdquant.kernels.widen import dequantize_weight as impl

    return impl(qweight, wscales, wtensor_scale, fmt, dtype)


@dequantize_weight.register_fake
def _(qweight, wscales, wtensor_scale, fmt, dtype):
    return qweight.new_empty(qweight.shape[0], qweight.shape[1] * 2, dtype=dtype)


@_op("fp8_gemm")
def fp8_gemm(
    xq: torch.Tensor,
    wq: torch.Tensor,
    s_channel: torch.Tensor,
    act_scale: torch.Tensor,
    lora_act: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str = "none",
) -> torch.Tensor:
    """``kernels.gemm.fp8_gemm`` as a custom op."""
    from svdquant.kernels.gemm import fp8_gemm as impl

    return impl(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out_dtype, activation)


@fp8_gemm.register_fake
def _(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out_dtype, activation="none"):
    return xq.new_empty(xq.shape[0], wq.shape[0], dtype=out_dtype)


@_op("fp8_gemm_split")
def fp8_gemm_split(
    xq: torch.Tensor,
    wq: torch.Tensor,
    s_channel: torch.Tensor,
    act_scale: torch.Tensor,
    lora_act: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    sizes: list[int],
    parts: list[int] | None = None,
    last_act: str = "none",
) -> torch.Tensor:
    """``kernels.gemm.fp8_gemm_split`` as a custom op (the flat buffer; the caller views
    the segments: a custom op may not return aliasing outputs)."""
    from svdquant.kernels.gemm import fp8_gemm_split as impl

    return impl(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out_dtype, sizes,
                parts, last_act)  # fmt: skip


@fp8_gemm_split.register_fake
def _(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out_dtype, sizes, parts=None,
      last_act="none"):  # fmt: skip
    return xq.new_empty(xq.shape[0] * wq.shape[0], dtype=out_dtype)


@_op("fp8_gemm_quantize_next")
def fp8_gemm_quantize_next(
    xq: torch.Tensor,
    wq: torch.Tensor,
    s_channel: torch.Tensor,
    act_scale: torch.Tensor,
    lora_act: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str,
    smooth2: torch.Tensor,
    lowrank_down2: torch.Tensor,
    act_scale2: torch.Tensor,
    k_out2: int,
    act_fmt2: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.gemm.fp8_gemm_quantize_next`` as a custom op."""
    from svdquant.kernels.gemm import fp8_gemm_quantize_next as impl

    return impl(
        xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out_dtype, activation,
        smooth2, lowrank_down2, act_scale2, k_out2, act_fmt2,
    )  # fmt: skip


@fp8_gemm_quantize_next.register_fake
def _next_input_like(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out_dtype,
                     activation, smooth2, lowrank_down2, act_scale2, k_out2, act_fmt2):  # fmt: skip
    """The fake of an epilogue that writes the next layer's input: (xq2, lora_act2)."""
    m = xq.shape[0]
    return (
        xq.new_empty(m, k_out2, dtype=_FP8),
        xq.new_empty(m, lowrank_down2.shape[0], dtype=torch.float32),
    )


@_op("fp8_gemm_gated_next")
def fp8_gemm_gated_next(
    xq: torch.Tensor,
    wq: torch.Tensor,
    s_channel: torch.Tensor,
    act_scale: torch.Tensor,
    lora_act: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    activation: str,
    smooth2: torch.Tensor,
    lowrank_down2: torch.Tensor,
    act_scale2: torch.Tensor,
    k_out2: int,
    act_fmt2: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.gemm_gated.fp8_gemm_gated_next`` as a custom op."""
    from svdquant.kernels.gemm_gated import fp8_gemm_gated_next as impl

    return impl(
        xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out_dtype, activation,
        smooth2, lowrank_down2, act_scale2, k_out2, act_fmt2,
    )  # fmt: skip


fp8_gemm_gated_next.register_fake(_next_input_like)


@_op("w4a16_linear")
def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    """``kernels.gemv.w4a16_linear`` as a custom op."""
    from svdquant.kernels.gemv import w4a16_linear as impl

    return impl(x, qweight, wscales, wtensor_scale, smooth, lowrank_down, lowrank_up, bias, fmt)


@w4a16_linear.register_fake
def _(x, qweight, wscales, wtensor_scale, smooth, lowrank_down, lowrank_up, bias, fmt):
    return x.new_empty(x.shape[0], qweight.shape[0])


#: Largest M that the W4A16 path sends to the GEMV kernel (``kernels.gemv.MAX_GEMV_M``).
MAX_GEMV_M = 16


def _fp8_operands(x2, qweight, wscales, wtensor_scale, smooth, act_amax, lowrank_down, fmt,
                  act_fmt, fp8_weights=None):  # fmt: skip
    """One layer's fp8 GEMM operands from its two memory-bound passes: the activation
    quantize (with the low-rank down projection) and the weight widen — or the quantize
    alone where the layer keeps its widened weight (``fp8_weights``: ``(wq, s_channel)``,
    ``SVDQLinear.keep_fp8_weights``). Returns ``(xq, lora_act, wq, s_channel, S)``."""
    s = _act_scale(act_amax)
    ops, kp = _ops(x2), qweight.shape[1] * 2
    if fp8_weights is not None:
        xq, lora = ops.quantize_act(x2, smooth, lowrank_down, s, kp, act_fmt)
        return xq, lora, *fp8_weights, s
    xq, lora, wq, s_channel = ops.quantize_and_widen(
        x2, smooth, lowrank_down, s, kp, act_fmt, qweight, wscales, wtensor_scale, fmt
    )
    return xq, lora, wq, s_channel, s


def _layer_operands(layer: torch.nn.Module, x2: torch.Tensor):
    """``_fp8_operands`` of an ``SVDQLinear`` on ``x2`` [M, K]."""
    return _fp8_operands(
        x2, layer.qweight, layer.wscales, layer.wtensor_scale, layer.smooth, layer.act_amax,
        layer.lowrank_down, layer.fmt, layer.act_fmt, layer.fp8_weights(),
    )  # fmt: skip


def _widened(layer: torch.nn.Module, ops) -> tuple[torch.Tensor, torch.Tensor]:
    """An ``SVDQLinear``'s fp8 weight operand and per-channel scale: kept, or widened."""
    kept = layer.fp8_weights()
    if kept is not None:
        return kept
    return ops.widen_weight(layer.qweight, layer.wscales, layer.wtensor_scale, layer.fmt)


def svdq_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    smooth: torch.Tensor,
    act_amax: torch.Tensor,
    lowrank_down: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
    act_fmt: str,
    fp8_weights: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The quantized layer on the fp8 engine: ``x`` [..., K] -> [..., N] in ``x.dtype``.

    ``act_fmt`` ``"int4"`` (the paper's codes in fp8 containers) or ``"fp8"`` (W4A8):
    quantize + widen + fp8 GEMM against the static scale ``S = act_amax / 224``;
    ``"none"``: the W4A16 GEMV for M ≤ 16, above that the weight dequantized to 16 bits
    (a memory-bound kernel) and cuBLAS; ``"nvfp4"``
    activations (a per-token scale, a row-wide reduction) stay on the torch reference.
    Computes what ``reference.svdq_linear_fp8_ref`` computes. ``fp8_weights``: the
    weight already widened (``SVDQLinear.keep_fp8_weights``), for int4/fp8 activations.
    """
    k, n = smooth.shape[0], qweight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if act_fmt == "none" and x2.shape[0] <= MAX_GEMV_M:
        y = _ops(x2).w4a16_linear(
            x2, qweight, wscales, wtensor_scale, smooth, lowrank_down, lowrank_up, bias, fmt
        )
    elif act_fmt == "none" and x.dtype in (torch.bfloat16, torch.float16):
        w = _ops(x2).dequantize_weight(qweight, wscales, wtensor_scale, fmt, x.dtype)
        xh = (x2.float() * (1.0 / smooth.float())).to(x.dtype)
        y = torch.nn.functional.linear(xh, w[:, :k], bias)
        if lowrank_down.shape[0]:
            y = y + (xh @ lowrank_down.t().to(x.dtype)) @ lowrank_up.t().to(x.dtype)
    elif act_fmt in ("int4", "fp8"):
        xq, lora, wq, s_channel, s = _fp8_operands(
            x2, qweight, wscales, wtensor_scale, smooth, act_amax, lowrank_down, fmt, act_fmt,
            fp8_weights,
        )  # fmt: skip
        y = _ops(x2).fp8_gemm(xq, wq, s_channel, s, lora, lowrank_up, bias, x.dtype)
    else:
        y = reference.svdq_linear(
            x2,
            qweight,
            wscales,
            wtensor_scale,
            smooth,
            lowrank_down,
            lowrank_up,
            bias,
            fmt,
            act_fmt,
        )
    return y.reshape(*lead, n)


def splits_in_gemm(act_fmt: str, sizes: list[int]) -> bool:
    """Whether ``svdq_linear_split_triton`` takes a layer of ``act_fmt`` split into
    ``sizes``: the fp8 engine's activations, bounds ``kernels.gemm.split_supported``."""
    from svdquant.kernels.gemm import split_supported

    return act_fmt in ("int4", "fp8") and split_supported(list(sizes))


def svdq_linear_split_triton(
    layer: torch.nn.Module, x: torch.Tensor, sizes: list[int], last_act: str = "none"
):
    """An ``SVDQLinear``'s output split along N into ``len(sizes)`` contiguous tensors
    [..., sizes[i]], the GEMM writing each part to its own tensor — for a fused projection
    (q/k/v in one layer) whose consumers want each part contiguous; the last part as
    ``last_act(part)`` (rounded as written). Needs ``splits_in_gemm(layer.act_fmt, sizes)``."""
    if not splits_in_gemm(layer.act_fmt, sizes):
        raise ValueError(
            f"the GEMM splits only int4/fp8 activations into 2-4 parts meeting at multiples "
            f"of 256 columns; got act_fmt={layer.act_fmt!r}, sizes {list(sizes)} "
            "(SVDQLinear.forward_split splits any layer)"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    m = x2.shape[0]
    xq, lora, wq, s_channel, s = _layer_operands(layer, x2)
    parts, up = _lora_parts(layer, sizes, x2)
    flat = _ops(x2).fp8_gemm_split(
        xq, wq, s_channel, s, lora, up, layer.bias, x.dtype, list(sizes), parts, last_act
    )
    out, start = [], 0
    for w in sizes:
        out.append(flat[m * start : m * (start + w)].view(*lead, w))
        start += w
    return tuple(out)


def _lora_parts(layer: torch.nn.Module, sizes: list[int], x: torch.Tensor):
    """(``parts``, L_up) for a fused layer's split GEMM: a fused group's own LoRAs with
    each part reading its own columns under ``gemm.LORA_PARTS`` (the compact L_up made at
    the first eager call that wants it: not while tracing or capturing a CUDA graph,
    which then run the stacked L_up), else (None, the stacked L_up). A group fused past
    ``lora.MAX_RANK`` keeps the compact L_up alone: read by parts whatever the switch."""
    from svdquant.kernels import gemm

    if getattr(layer, "_compact_sizes", None) is not None:  # its only L_up (``fuse``)
        return layer.lora_parts, layer.lowrank_up
    parts = getattr(layer, "lora_parts", None) if gemm.LORA_PARTS else None
    if parts is None:
        return None, layer.lowrank_up
    up = getattr(layer, "lowrank_up_parts", None)
    if up is None:
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if torch.compiler.is_compiling() or capturing:
            return None, layer.lowrank_up
        from svdquant.fuse import keep_compact_up

        up = keep_compact_up(layer, list(sizes))
    return parts, up


def check_cat_inputs(x: torch.Tensor, tail: torch.Tensor, in_features: int) -> None:
    """Refuse a concatenated input (``forward_cat``) that is not [..., K1] next to
    [..., in_features - K1] of the same leading dimensions and dtype."""
    if x.shape[:-1] != tail.shape[:-1] or x.shape[-1] + tail.shape[-1] != in_features:
        raise ValueError(
            f"x {tuple(x.shape)} and tail {tuple(tail.shape)} must share their leading "
            f"dimensions and together have {in_features} features"
        )
    if x.dtype != tail.dtype:
        raise ValueError(f"x and tail must share a dtype, got {x.dtype} and {tail.dtype}")


def svdq_linear_cat_triton(
    layer: torch.nn.Module, x: torch.Tensor, tail: torch.Tensor, tail_act: str = "none"
) -> torch.Tensor:
    """``layer(cat([x, tail_act(tail)], -1))`` for an ``SVDQLinear`` on the fp8 engine, with
    the quantize reading ``x`` and ``tail`` where they are: no concatenated copy, no
    separate activation pass (FLUX's single-block ``proj_out``). ``x`` [..., K1] and
    ``tail`` [..., K - K1] in the same dtype; the activation (``"none"``, ``"gelu_tanh"``,
    ``"silu"``, ``"gelu"``) is rounded to that dtype, as the unfused modules' output would
    be."""
    _check_fused_input_format(layer, "the fused concatenation")
    check_cat_inputs(x, tail, layer.in_features)
    return _svdq_linear_two_inputs(layer, x, tail, tail_act, gated=False)


def check_gated_inputs(x: torch.Tensor, gate: torch.Tensor, in_features: int) -> None:
    """Refuse a gated input (``forward_gated``) that is not two [..., in_features] tensors
    of one shape and dtype."""
    if x.shape != gate.shape or x.shape[-1] != in_features:
        raise ValueError(
            f"x {tuple(x.shape)} and gate {tuple(gate.shape)} must both be [..., {in_features}]"
        )
    if x.dtype != gate.dtype:
        raise ValueError(f"x and gate must share a dtype, got {x.dtype} and {gate.dtype}")


#: Fewer rows than this: ``svdq_linear_gated_triton`` applies the gate with PyTorch and
#: runs the plain layer. The gated quantize is bound by its instructions (v40,
#: ``bench/probe_gated.py``, H200, SDXL's shapes): 8-19% faster than the GELU, product
#: and quantize it replaces from 2048 rows, 5% slower at 1024.
GATED_MIN_ROWS = 2048


def gated_in_quantize(x: torch.Tensor) -> bool:
    """Whether ``svdq_linear_gated_triton`` reads x and the gate in the quantize
    (``GATED_MIN_ROWS``) rather than applying the gate with PyTorch first."""
    return x.numel() >= GATED_MIN_ROWS * x.shape[-1]


def svdq_linear_gated_triton(
    layer: torch.nn.Module, x: torch.Tensor, gate: torch.Tensor, gate_act: str = "gelu"
) -> torch.Tensor:
    """``layer(x · gate_act(gate))`` for an ``SVDQLinear`` on the fp8 engine, the quantize
    reading both halves of a gated linear unit (SDXL's GEGLU) where the up projection wrote
    them: no activation, product or copy pass. The activation and the product are rounded
    to x's dtype, as the unfused modules' outputs would be."""
    _check_fused_input_format(layer, "the fused gated input")
    check_gated_inputs(x, gate, layer.in_features)
    if not gated_in_quantize(x):  # the unfused passes are as fast there
        return layer(x * reference.activation_ref(gate, gate_act).to(x.dtype))
    return _svdq_linear_two_inputs(layer, x, gate, gate_act, gated=True)


def _check_fused_input_format(layer: torch.nn.Module, what: str) -> None:
    if layer.act_fmt not in ("int4", "fp8"):
        raise ValueError(f"{what} needs act_fmt int4 or fp8, got {layer.act_fmt!r}")


def _svdq_linear_two_inputs(
    layer: torch.nn.Module, x: torch.Tensor, tail: torch.Tensor, act: str, gated: bool
) -> torch.Tensor:
    lead = x.shape[:-1]
    x2, t2 = x.reshape(-1, x.shape[-1]), tail.reshape(-1, tail.shape[-1])
    s = _act_scale(layer.act_amax)
    ops = _ops(x2)
    quantize = ops.quantize_act_gated if gated else ops.quantize_act_cat
    xq, lora = quantize(
        x2, t2, act, layer.smooth, layer.lowrank_down, s, layer.qweight.shape[1] * 2,
        layer.act_fmt,
    )  # fmt: skip
    wq, s_channel = _widened(layer, ops)
    y = ops.fp8_gemm(xq, wq, s_channel, s, lora, layer.lowrank_up, layer.bias, x.dtype)
    return y.reshape(*lead, layer.out_features)


#: fc2's rank (its LoRAs stacked on the base branch) above which ``svdq_mlp_triton`` runs
#: the two layers apart (fc1, the activation written out, fc2) instead of fc1's epilogue
#: summing fc2's low-rank down projection: that epilogue's [BM, r2] sums (a power of two:
#: 256 for a rank-128 LoRA's 160) meet through atomics from every fc1 tile. None: always
#: fused. v56: a rank-128 LoRA added 8.9 ms to the FLUX step's 76 Triton GEMMs, the double
#: blocks' fc1 with that epilogue among them. Measured (v57, H200, ``bench/e2e.py --rows
#: svdq-int4-fused-lora --ab ops.MLP_NEXT_MAX_RANK=64``, through ``cuda_graphed``, with
#: ``quantize.WIDE_BY_MM`` taking fc2's wide rank apart): a rank-128 LoRA's step 122.9 ->
#: 118.6 ms (1.037x); rank 64 (fc2 rank 96) 1.003x, equal; the plain step (rank 32, fused
#: as ever) 0.996x.
MLP_NEXT_MAX_RANK: int | None = 64
#: Apply an activation that only the next layer reads in the GEMM's epilogue of the layer
#: before, instead of a pass of torch's over its output: a fused MLP's fc1 run apart from
#: fc2 (``MLP_NEXT_MAX_RANK``) and FLUX's single blocks' MLP up projection (the last part
#: of their fused q/k/v/MLP GEMM, whose GELU ``proj_out`` reads). The same numbers (the
#: activation of the output as written, rounded again). v58 (H200, ``bench/e2e.py --ab
#: ops.ACT_IN_GEMM=False``, through ``cuda_graphed``): the FLUX step with a rank-128 LoRA
#: 108.8 -> 106.3 ms (1.023x: the torch GELU passes over the apart fc1's output and, for
#: ``quantize.WIDE_TAIL_BY_MM``'s cuBLAS sums, over the MLP part); the plain step equal
#: (93.8 against 93.4-94.0: the GELU moved from proj_out's quantize to the GEMM).
ACT_IN_GEMM = True


def svdq_mlp_triton(
    x: torch.Tensor, fc1: torch.nn.Module, fc2: torch.nn.Module, activation: str = "gelu_tanh"
) -> torch.Tensor:
    """``fc2(activation(fc1(x)))`` for two ``SVDQLinear`` layers on the fp8 engine, fused.

    fc1's GEMM epilogue applies the activation and writes fc2's quantized input and fc2's
    low-rank down projection (``fp8_gemm_quantize_next``): no standalone quantize pass and
    no 16-bit intermediate in memory. Both layers need ``act_fmt`` ``"int4"`` or ``"fp8"``.
    Computes what the two layers compute unfused (``reference.svdq_linear_fp8_ref`` twice,
    the activation in between), up to the activation's fp32 rounding.
    """
    if fc1.act_fmt not in ("int4", "fp8") or fc2.act_fmt not in ("int4", "fp8"):
        raise ValueError("the fused MLP needs both layers' act_fmt in ('int4', 'fp8')")
    if fc2.in_features != fc1.out_features:
        raise ValueError(f"fc1 gives {fc1.out_features} features, fc2 takes {fc2.in_features}")
    if MLP_NEXT_MAX_RANK is not None and fc2.lowrank_down.shape[0] > MLP_NEXT_MAX_RANK:
        if not ACT_IN_GEMM:
            return fc2(reference.activation_like(fc1(x), activation))
        return fc2(_activated(fc1, x, activation))
    return _fused_pair(x, fc1, fc2, activation, gated=False)


def _activated(layer: torch.nn.Module, x: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation(layer(x))`` for an ``SVDQLinear`` with int4 / fp8 activations, the
    activation in the GEMM's epilogue (no pass over the output; its numbers rounded as
    written, as the two apart)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, layer.in_features)
    xq, lora, wq, s_channel, s = _layer_operands(layer, x2)
    y = _ops(x2).fp8_gemm(
        xq, wq, s_channel, s, lora, layer._whole_lowrank_up(), layer.bias, x.dtype, activation
    )
    return y.reshape(*lead, layer.out_features)


def _fused_pair(
    x: torch.Tensor, fc1: torch.nn.Module, fc2: torch.nn.Module, activation: str, gated: bool
) -> torch.Tensor:
    """fc1's GEMM writing fc2's quantized input (``fp8_gemm_quantize_next``, or with
    ``gated`` ``fp8_gemm_gated_next``), then fc2's GEMM."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, fc1.in_features)
    ops = _ops(x2)
    s2 = _act_scale(fc2.act_amax)
    xq, lora, w1, c1, s1 = _layer_operands(fc1, x2)
    first = ops.fp8_gemm_gated_next if gated else ops.fp8_gemm_quantize_next
    xq2, lora2 = first(
        xq, w1, c1, s1, lora, fc1.lowrank_up, fc1.bias, x.dtype, activation,
        fc2.smooth, fc2.lowrank_down, s2, fc2.qweight.shape[1] * 2, fc2.act_fmt,
    )  # fmt: skip
    w2, c2 = _widened(fc2, ops)
    y = ops.fp8_gemm(xq2, w2, c2, s2, lora2, fc2.lowrank_up, fc2.bias, x.dtype)
    return y.reshape(*lead, fc2.out_features)


#: Run a fused GEGLU feed-forward (``fuse_projections``) as ``svdq_geglu_triton``: the
#: gate in the up projection's GEMM epilogue; ``False``: in the down projection's quantize
#: (``svdq_linear_gated_triton``, v40).
GEGLU_EPILOGUE = True


def svdq_geglu_triton(
    x: torch.Tensor, up: torch.nn.Module, down: torch.nn.Module, activation: str = "gelu"
) -> torch.Tensor:
    """``down(v · activation(g))`` with ``v, g = up(x).chunk(2, -1)`` — a gated linear
    unit (diffusers' GEGLU: SDXL's feed-forwards) — for two ``SVDQLinear`` layers on the
    fp8 engine, fused: the up projection's epilogue writes the down projection's
    quantized input (``fp8_gemm_gated_next``): no [..., 2H] output, no activation,
    product or quantize pass. Both layers need ``act_fmt`` ``"int4"`` or ``"fp8"``; the
    numbers are the unfused modules' (each intermediate rounded to x's dtype)."""
    if up.act_fmt not in ("int4", "fp8") or down.act_fmt not in ("int4", "fp8"):
        raise ValueError("the fused gated unit needs both layers' act_fmt in ('int4', 'fp8')")
    if up.out_features != 2 * down.in_features:
        raise ValueError(
            f"the up projection gives {up.out_features} features, the down projection takes "
            f"{down.in_features}: a gated unit's up projection gives twice as many"
        )
    return _fused_pair(x, up, down, activation, gated=True)


@_op("rms_norm_rope")
def rms_norm_rope_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head: torch.Tensor | None,
    head_weight: torch.Tensor | None,
) -> torch.Tensor:
    """``kernels.rope.rms_norm_rope`` as a custom op."""
    from svdquant.kernels.rope import rms_norm_rope as impl

    return impl(x, weight, eps, cos, sin, head, head_weight)


@rms_norm_rope_op.register_fake
def _(x, weight, eps, cos, sin, head, head_weight):
    s_head = 0 if head is None else head.shape[1]
    b, s, h, d = x.shape
    return x.new_empty(b, s_head + s, h, d)


def rms_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
    backend: str = "triton",
) -> torch.Tensor:
    """Attention's q or k prepared in one pass (``kernels/rope.py``): per-head RMSNorm of
    ``head`` (the text stream's heads, optional) and ``x``, concatenated along the
    sequence and rotated by ``cos``/``sin`` — on ``backend`` ``"triton"`` where the kernel
    takes the shape, else ``reference.rms_norm_rope_ref`` (the same numbers, diffusers'
    own passes)."""
    from svdquant.kernels import rope

    if backend == "triton" and rope.supports(x.shape[-1], x.dtype):
        return _ops(x).rms_norm_rope(x, weight, eps, cos, sin, head, head_weight)
    return reference.rms_norm_rope_ref(x, weight, eps, cos, sin, head, head_weight)


@_op("layer_norm_modulate")
def layer_norm_modulate_op(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
) -> torch.Tensor:
    """``kernels.modulate.layer_norm_modulate`` as a custom op."""
    from svdquant.kernels.modulate import layer_norm_modulate as impl

    return impl(x, scale, shift, eps)


@layer_norm_modulate_op.register_fake
def _(x, scale, shift, eps):
    return x.new_empty(x.shape)


def layer_norm_modulate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    backend: str = "triton",
) -> torch.Tensor:
    """FLUX's adaptive norm ``layer_norm(x) · (1 + scale[:, None]) + shift[:, None]`` in one
    pass (``kernels/modulate.py``) on ``backend`` ``"triton"`` where the kernel takes the
    shape (``x`` [B, S, C], ``scale``/``shift`` [B, C], all one 16-bit dtype), else
    ``reference.layer_norm_modulate_ref`` (diffusers' own passes)."""
    from svdquant.kernels import modulate

    if (
        backend == "triton"
        and x.dim() == 3
        and modulate.supports(x.shape[-1], x.dtype)
        and scale.dtype == shift.dtype == x.dtype
        and scale.stride(-1) == shift.stride(-1) == x.stride(-1) == 1
    ):
        return _ops(x).layer_norm_modulate(x, scale, shift, eps)
    return reference.layer_norm_modulate_ref(x, scale, shift, eps)


@_op("gate_residual")
def gate_residual_op(
    residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, clip_fp16: bool
) -> torch.Tensor:
    """``kernels.modulate.gate_residual`` as a custom op."""
    from svdquant.kernels.modulate import gate_residual as impl

    return impl(residual, gate, x, clip_fp16)


@gate_residual_op.register_fake
def _(residual, gate, x, clip_fp16):
    return x.new_empty(x.shape)


def gate_residual(
    residual: torch.Tensor,
    gate: torch.Tensor,
    x: torch.Tensor,
    clip_fp16: bool = False,
    backend: str = "triton",
) -> torch.Tensor:
    """A gated branch joining the residual stream, ``residual + gate[:, None] · x``, in one
    pass (``kernels/modulate.py``) on ``backend`` ``"triton"`` where the kernel takes the
    tensors (all [B, S, C] / [B, C] of one 16-bit dtype), else
    ``reference.gate_residual_ref`` (diffusers' two passes)."""
    from svdquant.kernels import modulate

    if (
        backend == "triton"
        and residual.dim() == x.dim() == 3
        and residual.shape == x.shape
        and modulate.supports(x.shape[-1], x.dtype)
        and residual.dtype == gate.dtype == x.dtype
        and residual.stride(-1) == gate.stride(-1) == x.stride(-1) == 1
    ):
        return _ops(x).gate_residual(residual, gate, x, clip_fp16)
    return reference.gate_residual_ref(residual, gate, x, clip_fp16)


@_op("gate_residual_modulate")
def gate_residual_modulate_op(
    residual: torch.Tensor,
    gate: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    clip_fp16: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.modulate.gate_residual_modulate`` as a custom op."""
    from svdquant.kernels.modulate import gate_residual_modulate as impl

    return impl(residual, gate, x, scale, shift, eps, clip_fp16)


@gate_residual_modulate_op.register_fake
def _(residual, gate, x, scale, shift, eps, clip_fp16):
    return x.new_empty(x.shape), x.new_empty(x.shape)


def gate_residual_modulate(
    residual: torch.Tensor,
    gate: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    clip_fp16: bool = False,
    backend: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + gate[:, None] · x`` and the adaptive norm
    ``layer_norm(h) · (1 + scale[:, None]) + shift[:, None]`` in one pass
    (``kernels/modulate.py``) on ``backend`` ``"triton"`` where the kernel takes the
    tensors (all [B, S, C] / [B, C] of one 16-bit dtype); else
    ``reference.gate_residual_modulate_ref`` (diffusers' passes). Returns (h, normed)."""
    from svdquant.kernels import modulate

    if (
        backend == "triton"
        and residual.dim() == x.dim() == 3
        and residual.shape == x.shape
        and modulate.supports(x.shape[-1], x.dtype)
        and residual.dtype == gate.dtype == x.dtype == scale.dtype == shift.dtype
        and residual.stride(-1) == gate.stride(-1) == x.stride(-1) == 1
        and scale.stride(-1) == shift.stride(-1) == 1
    ):
        return _ops(x).gate_residual_modulate(residual, gate, x, scale, shift, eps, clip_fp16)
    return reference.gate_residual_modulate_ref(residual, gate, x, scale, shift, eps, clip_fp16)
