"""``SVDQLinear``: the quantized replacement of ``nn.Linear``."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from svdquant import formats, kernels
from svdquant.kernels import kept, replay

__all__ = ["SVDQLinear", "keep_fp8_weights"]

# Buffers whose dtype is part of the format: ``module.to(dtype)`` / ``.half()`` must not
# cast them (a pipeline's ``.to(torch.bfloat16)`` would otherwise round fp16 scales); the
# kept fp8 operands (``keep_fp8_weights``) neither.
_FIXED_DTYPE = (
    "qweight", "wscales", "wtensor_scale", "smooth", "act_amax", "fp8_weight", "fp8_scale"
)  # fmt: skip


class SVDQLinear(nn.Module):
    """A linear layer with a 4-bit residual weight and a 16-bit low-rank branch.

    ``y = Q(x / s) · Q(R)ᵀ + ((x / s) · L_downᵀ) · L_upᵀ + b``

    Buffers (the checkpoint's tensors):

    * ``qweight`` uint8 [N, K_pad / 2]: the residual's packed 4-bit codes,
    * ``wscales`` [N, K_pad / group]: its group scales (fp16 for int4, fp8 E4M3 for nvfp4),
    * ``wtensor_scale`` fp32 []: its tensor scale (1 for int4),
    * ``smooth`` fp32 [K]: the smoothing vector s,
    * ``act_amax`` fp32 []: the calibration max of |x / s| (the fused engine derives its
      static activation scale from it; the reference backend does not use it),
    * ``lowrank_down`` [r, K] and ``lowrank_up`` [N, r]: the 16-bit low-rank branch,
    * ``bias`` [N] (optional).

    ``K_pad`` is K rounded up to the format's group size: the residual is zero-padded
    along K, and the activations are zero-padded the same way when quantized, so any K
    works. ``fmt`` is the weight format, ``act_fmt`` the activation format (one of
    ``kernels.ACT_FORMATS``; by default the same as ``fmt``: W4A4).

    Build one with ``svdquant.quantize_linear`` (= ``SVDQLinear.from_linear``); the
    constructor makes an empty shell of the right shapes (e.g. on the meta device, to be
    filled from a checkpoint).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        fmt: str = "int4",
        act_fmt: str | None = None,
        rank: int = 32,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        f = formats.get_format(fmt)
        act_fmt = act_fmt or f.name
        if act_fmt not in kernels.ACT_FORMATS:
            raise ValueError(
                f"unknown activation format {act_fmt!r}; supported: {kernels.ACT_FORMATS}"
            )
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"in_features and out_features must be positive, got {in_features}, {out_features}"
            )
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if backend not in kernels.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; supported: {kernels.BACKENDS}")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.act_fmt, self.rank, self.backend = f.name, act_fmt, rank, backend
        self.alpha: float | None = None  # the smoothing strength chosen (informational)
        kp = f.padded(in_features)
        new = dict(device=device)
        self.register_buffer(
            "qweight", torch.zeros(out_features, kp // 2, dtype=torch.uint8, **new)
        )
        self.register_buffer(
            "wscales", torch.zeros(out_features, kp // f.group_size, dtype=f.scale_dtype, **new)
        )
        self.register_buffer("wtensor_scale", torch.ones((), dtype=torch.float32, **new))
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, **new))
        self.register_buffer("act_amax", torch.ones((), dtype=torch.float32, **new))
        self.register_buffer("lowrank_down", torch.zeros(rank, in_features, dtype=dtype, **new))
        self.register_buffer("lowrank_up", torch.zeros(out_features, rank, dtype=dtype, **new))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=dtype, **new) if bias else None
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, calib_inputs: torch.Tensor | Iterable[torch.Tensor], **kwargs: Any
    ) -> SVDQLinear:
        """Quantize ``linear`` with SVDQuant; same arguments as ``svdquant.quantize_linear``."""
        from svdquant.algorithm import quantize_linear

        return quantize_linear(linear, calib_inputs, **kwargs)

    def config(self) -> dict[str, Any]:
        """What it takes to rebuild an empty shell of this layer (saved in checkpoints)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "fmt": self.fmt,
            "act_fmt": self.act_fmt,
            "rank": self.rank,
            "dtype": str(self.lowrank_down.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], **kwargs: Any) -> SVDQLinear:
        """An empty shell from ``config()`` (kwargs: ``device``, ``backend``)."""
        cfg = dict(config)
        cfg["dtype"] = getattr(torch, cfg["dtype"])
        return cls(**cfg, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if value is None or isinstance(value, torch.Tensor):  # a tensor replaced
            replay.forget(self)  # (its replays would keep the old one alive)
        super().__setattr__(name, value)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"SVDQLinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}"
            )
        self._check_kind(x)

    def _check_kind(self, x: torch.Tensor) -> None:
        if not torch.is_floating_point(x):
            raise ValueError(f"SVDQLinear expects floating-point inputs, got {x.dtype}")
        if x.device != self.wscales.device:
            raise ValueError(
                f"input is on {x.device} but the layer is on {self.wscales.device}; "
                "move one of them (e.g. layer.to(x.device))"
            )

    def keep_fp8_weights(self, enabled: bool = True, codes_on_host: bool = False) -> bool:
        """Keep the fp8 tensor-core operand of the 4-bit weight (1 byte a weight, beside
        the 4-bit codes) instead of widening the codes into it at every call: speed for
        memory (``svdquant.keep_fp8_weights``). Only where the fp8 engine runs this layer
        (int4/fp8 activations, backend ``"triton"`` on its device); returns whether it is
        kept (a copy kept and still current is not widened again). ``codes_on_host``: the
        4-bit codes (``qweight``), which the kept copy replaces in every call, wait in host
        memory — 1 byte a weight on the GPU instead of 1.5 — for the state dict and for a
        new copy should the weight change (``codes_on_host()``). ``enabled=False``
        releases the copy and brings the codes back to the layer's device."""
        replay.forget(self)  # (the tensors it swaps: replays would keep the old ones)
        if enabled and self.fp8_weights() is not None:
            self._place_codes(codes_on_host)
            return True
        self._buffers.pop("fp8_weight", None)
        self._buffers.pop("fp8_scale", None)
        self.__dict__.pop("_fp8_source", None)
        if not enabled or not self.on_fp8_engine():
            self._place_codes(False)
            return False
        from svdquant.kernels.widen import widen_weight

        codes = self.qweight.to(self.wscales.device)  # (from the host: a new copy's source)
        wq, s_channel = widen_weight(codes, self.wscales, self.wtensor_scale, self.fmt)
        self.register_buffer("fp8_weight", wq, persistent=False)
        self.register_buffer("fp8_scale", s_channel, persistent=False)
        self._place_codes(codes_on_host)
        return True

    def codes_on_host(self) -> bool:
        """Whether the 4-bit codes wait in host memory while the layer runs on a GPU from
        its kept fp8 copy (``keep_fp8_weights(codes_on_host=True)``)."""
        return self.qweight.device.type == "cpu" and self.wscales.device.type != "cpu"

    def _place_codes(self, on_host: bool) -> None:
        """The codes to the host or to the layer's device, and kept there through moves
        (``_apply``) while ``on_host``; the kept copy's source noted anew (moving the codes
        does not change them)."""
        home = torch.device("cpu") if on_host else self.wscales.device
        if self.qweight.device != home:
            self._buffers["qweight"] = self.qweight.to(home)
        self._codes_stay_on_host = on_host
        if "fp8_weight" in self._buffers:
            self._fp8_source = self._weight_source()

    def on_fp8_engine(self) -> bool:
        """Whether this layer runs on the fp8 engine where it is: int4/fp8 activations,
        real (not meta) weights, backend ``"triton"`` on their device."""
        return (
            self.act_fmt in ("int4", "fp8")
            and not self.wscales.is_meta
            and kernels.resolve_backend(self.backend, self.wscales.device) == "triton"
        )

    def _weight_source(self) -> list[tuple[weakref.ref, int]]:
        """The 4-bit weight's tensors (weakly: a freed one's address may be reused) and
        their versions (in-place writes), to tell whether a kept copy is still theirs."""
        return [
            (weakref.ref(t), t._version) for t in (self.qweight, self.wscales, self.wtensor_scale)
        ]

    def _source_unchanged(self) -> bool:
        source = self.__dict__.get("_fp8_source")
        tensors = (self.qweight, self.wscales, self.wtensor_scale)
        return source is not None and all(
            ref() is t and v == t._version for (ref, v), t in zip(source, tensors, strict=True)
        )

    def fp8_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept fp8 operand and per-channel scale (``keep_fp8_weights``) if they are
        still the 4-bit weight's — a weight loaded or replaced since is widened again
        per call (as if not kept: it never runs stale) — else None. With the codes on the
        host (``codes_on_host``) a stale copy is made anew from them here: the engine
        cannot widen host memory per call."""
        wq = self._buffers.get("fp8_weight")
        if wq is None:
            return None
        if not torch.compiler.is_compiling() and (
            wq.device != self.wscales.device or not self._source_unchanged()
        ):
            if self.codes_on_host() and self.on_fp8_engine():
                del self._buffers["fp8_weight"], self._buffers["fp8_scale"]  # stale
                self.keep_fp8_weights(codes_on_host=True)
                return self._buffers["fp8_weight"], self._buffers["fp8_scale"]
            return None
        if not torch.compiler.is_compiling():  # (a CUDA graph replaying it re-captures on a change)
            kept.used(self.qweight, self.wscales, self.wtensor_scale)
        return wq, self._buffers["fp8_scale"]

    def __getstate__(self) -> dict[str, Any]:
        # weak references do not pickle; a copy's kept operand counts as stale (widened
        # per call) until it is kept again
        state = dict(self.__dict__)
        state.pop("_fp8_source", None)
        replay.forget_state(state)  # (compiled launchers: recorded again by a copy)
        return state

    def _whole_lowrank_up(self) -> torch.Tensor:
        """``lowrank_up`` against the whole ``lowrank_down``: a fused group's compact one
        (``svdquant.fuse``, stacked past ``lora.MAX_RANK`` and kept by parts alone)
        expanded, for the paths that do not read it by parts."""
        sizes = getattr(self, "_compact_sizes", None)
        if sizes is None:
            return self.lowrank_up
        return kernels.reference.expand_lowrank_parts(self.lowrank_up, self.lora_parts, sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if kernels.resolve_backend(self.backend, x.device) == "triton":
            return replay.call(self, ("forward",), (x,), self._forward_triton, self._replay_state)
        return kernels.svdq_linear(
            x,
            self.qweight,
            self.wscales,
            self.wtensor_scale,
            self.smooth,
            self.lowrank_down,
            self._whole_lowrank_up(),
            self.bias,
            self.fmt,
            self.act_fmt,
        )

    def _forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.svdq_linear_triton(
            x,
            self.qweight,
            self.wscales,
            self.wtensor_scale,
            self.smooth,
            self.act_amax,
            self.lowrank_down,
            self._whole_lowrank_up(),
            self.bias,
            self.fmt,
            self.act_fmt,
            self.fp8_weights(),
        )

    def _replay_state(self) -> tuple:
        """What an engine call's launches depend on besides its inputs (``kernels.replay``):
        the layer's tensors (a kept fp8 copy counted while current), its settings, a fused
        group's parts."""
        return (
            *self._buffers.values(),
            *self._parameters.values(),
            "fp8_weight" in self._buffers and self._source_unchanged(),
            self.fmt,
            self.act_fmt,
            self.backend,
            getattr(self, "lora_parts", None),
            getattr(self, "_compact_sizes", None),
        )

    def forward_split(
        self, x: torch.Tensor, sizes: list[int], contiguous: bool = True, last_act: str = "none"
    ) -> tuple[torch.Tensor, ...]:
        """``forward(x)`` split along N into parts of widths ``sizes`` — for a fused
        projection (``svdquant.fuse_projections``): on the fp8 engine the GEMM writes each
        part to its own contiguous tensor, so the split costs no copy. Where it cannot
        (parts meeting off its tile bounds, other formats) the parts are copied out
        contiguous, or with ``contiguous=False`` returned as views of one output (for
        consumers that take strided rows, like attention). ``last_act`` (``"gelu_tanh"``,
        ``"silu"``, ...): the last part as that activation of it, rounded to x's dtype
        (on the fp8 engine, in the GEMM's epilogue: FLUX's single blocks' MLP)."""
        if sum(sizes) != self.out_features:
            raise ValueError(f"sizes {list(sizes)} do not add up to {self.out_features}")
        self._check_input(x)
        sizes = list(sizes)
        if kernels.resolve_backend(self.backend, x.device) == "triton" and (
            kernels.splits_in_gemm(self.act_fmt, sizes)
        ):
            return replay.call(
                self,
                ("split", tuple(sizes), last_act),
                (x,),
                lambda x: kernels.svdq_linear_split_triton(self, x, sizes, last_act),
                self._replay_state,
            )
        parts = list(self.forward(x).split(sizes, dim=-1))
        if last_act != "none":
            parts[-1] = kernels.reference.activation_like(parts[-1], last_act)
        return tuple(t.contiguous() for t in parts) if contiguous else tuple(parts)

    def forward_cat(
        self, x: torch.Tensor, tail: torch.Tensor, tail_act: str = "none"
    ) -> torch.Tensor:
        """``forward(cat([x, tail_act(tail)], -1))`` — FLUX's single-block ``proj_out``
        reads the attention output next to the MLP's GELU. On the fp8 engine the quantize
        reads both tensors where they are (no concatenated copy, no activation pass);
        ``tail_act``: ``"none"``, ``"gelu_tanh"`` or ``"silu"``, rounded to x's dtype."""
        kernels.check_cat_inputs(x, tail, self.in_features)
        if self._reads_two_inputs_fused(x, tail):
            return replay.call(
                self,
                ("cat", tail_act),
                (x, tail),
                lambda x, tail: kernels.svdq_linear_cat_triton(self, x, tail, tail_act),
                self._replay_state,
            )
        h = kernels.reference.activation_ref(tail, tail_act).to(x.dtype)  # fp32, as fused
        return self.forward(torch.cat([x, h], dim=-1))

    def forward_gated(
        self, x: torch.Tensor, gate: torch.Tensor, gate_act: str = "gelu"
    ) -> torch.Tensor:
        """``forward(x · gate_act(gate))`` — a gated linear unit's down projection (SDXL's
        GEGLU feed-forwards: ``x, gate = up(h).chunk(2, -1)``). On the fp8 engine the
        quantize reads both halves where they lie (no activation, product or copy pass);
        the activation (``"gelu"``, ``"gelu_tanh"``, ``"silu"``, ``"none"``) and the
        product are rounded to x's dtype, as the unfused modules write them."""
        kernels.check_gated_inputs(x, gate, self.in_features)
        if self._reads_two_inputs_fused(x, gate) and kernels.gated_in_quantize(x):
            return replay.call(
                self,
                ("gated", gate_act),
                (x, gate),
                lambda x, gate: kernels.svdq_linear_gated_triton(self, x, gate, gate_act),
                self._replay_state,
            )
        return self.forward(x * kernels.reference.activation_ref(gate, gate_act).to(x.dtype))

    def _reads_two_inputs_fused(self, x: torch.Tensor, other: torch.Tensor) -> bool:
        """Check both inputs' kind; whether the fp8 engine's quantize reads them itself."""
        self._check_kind(x)
        self._check_kind(other)
        backend = kernels.resolve_backend(self.backend, x.device)
        return backend == "triton" and self.act_fmt in ("int4", "fp8")

    def quantized_residual(self) -> formats.QuantizedTensor:
        """The 4-bit residual R as a ``QuantizedTensor``."""
        shape = torch.Size((self.out_features, self.in_features))
        codes = self.qweight.to(self.wscales.device)  # (on the host: ``codes_on_host``)
        return formats.QuantizedTensor(codes, self.wscales, self.wtensor_scale, self.fmt, shape)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The effective weight ``(Q(R) + L_up · L_down) / s`` [N, K], for debugging.

        Returned in the layer's 16-bit dtype (the dtype of its low-rank branch). It leaves
        out activation quantization, so ``x @ W.T + b`` is the layer with 16-bit
        activations.
        """
        w = formats.dequantize(self.quantized_residual())
        if self.rank:
            w = w + self._whole_lowrank_up().float() @ self.lowrank_down.float()
        return (w / self.smooth.float()).to(self.lowrank_down.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> SVDQLinear:
        replay.forget(self)  # (its held tensors would keep the old copies alive)
        kept = self.fp8_weights() is not None
        # codes put on the host stay there on every move to a GPU, also after a trip of
        # the whole layer through the CPU (``keep_fp8_weights(codes_on_host=True)``)
        stay = kept and self.__dict__.get("_codes_stay_on_host", False)
        on_cpu = self.qweight.device.type == "cpu"
        host_codes = self._buffers.pop("qweight") if stay and on_cpu else None
        fixed = {n: self._buffers[n] for n in _FIXED_DTYPE if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in fixed.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # a dtype cast: keep the format's dtype, take the device
                self._buffers[name] = old.to(device=new.device)
        if host_codes is not None:  # they stay on the host while the layer is on a GPU
            self._buffers["qweight"] = (
                host_codes if self.wscales.device.type != "cpu" else fn(host_codes)
            )
        if kept:  # the weight and its kept copy moved together: still each other's
            self._fp8_source = self._weight_source()
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fmt={self.fmt}, act_fmt={self.act_fmt}, "
            f"rank={self.rank}"
        )


def keep_fp8_weights(
    model: nn.Module,
    enabled: bool = True,
    max_bytes: int | None = None,
    codes_on_host: bool = False,
) -> int:
    """Trade memory for speed: every ``SVDQLinear`` of ``model`` on the fp8 engine keeps
    its weight's fp8 tensor-core operand (1 byte a weight, kept beside the 4-bit codes,
    outside the state dict) instead of widening the 4-bit codes into it at every call.

    The widen is a memory-bound pass per layer per step, with a latency floor that weighs
    most on small layers. H200, replayed steps at 1024², batch 1 (README): FLUX.1-dev
    95.9 → 91.5 ms (v43), SDXL 0.96 → 1.02× BF16, SANA 0.96 → 1.10×, PixArt-Σ 1.09 →
    1.13× (v44).
    The quantized layers' weights then take 1.5 bytes a weight instead of 0.5 (BF16: 2):
    FLUX.1-dev's transformer 14.3 GiB instead of 6.3 (BF16 22.2). ``codes_on_host``: the
    4-bit codes, which the kept copies replace in every call, wait in host memory (for
    the state dict, and for a new copy should a weight change): 1 byte a weight on the
    GPU — FLUX.1-dev 10.3 GiB, the same step time (v47, H200). The outputs are the same
    bit for bit. ``max_bytes``: keep them only for the smallest layers whose copies add
    at most that many bytes to the GPU together (the widen's floor costs the small layers
    most; layers kept before and not chosen now are released). Call it with the model on
    its GPU, after ``fuse_projections`` (fusing and unfusing keep it); given a
    ``cuda_graphed`` wrapper, its graphs (which replay the widens) are dropped, to be
    captured anew. ``enabled=False`` releases the kept
    operands (and brings the codes back). Returns the number of layers that keep them
    (layers on the reference backend or with 16-bit activations have none).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"keep_fp8_weights takes a torch.nn.Module, got {type(model).__name__}")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
    from svdquant.fuse import _drop_graphs

    _drop_graphs(model)
    layers = [m for m in model.modules() if isinstance(m, SVDQLinear)]
    if not enabled or max_bytes is None:
        return sum(m.keep_fp8_weights(enabled, codes_on_host) for m in layers)
    chosen, used = [], 0
    for m in sorted((m for m in layers if m.on_fp8_engine()), key=fp8_weight_bytes):
        used += fp8_weight_bytes(m, codes_on_host)
        if used > max_bytes:
            break
        chosen.append(m)
    chosen_ids = {id(m) for m in chosen}
    for m in layers:  # the others released first: shrinking a budget never needs both
        if id(m) not in chosen_ids:
            m.keep_fp8_weights(False)
    return sum(m.keep_fp8_weights(codes_on_host=codes_on_host) for m in chosen)


def fp8_weight_bytes(layer: SVDQLinear, codes_on_host: bool = False) -> int:
    """Bytes ``layer.keep_fp8_weights(codes_on_host=...)`` adds on the GPU: the fp8
    [N, K_pad] operand and the fp32 [N] scale, less the 4-bit codes where they leave."""
    codes = layer.qweight.numel()
    return codes * (1 if codes_on_host else 2) + layer.out_features * 4
