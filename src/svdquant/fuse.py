"""Fused projections: the quantized q/k/v of an attention run as one layer.

A ``QuantGroup`` (``models.base``) quantizes the linears that read the same input with
one smoothing vector, one low-rank down projection and one activation scale, so their
concatenation along N is itself an ``SVDQLinear``: ``fuse_projections`` builds it and
switches diffusers' attention to its fused path (``attn.to_qkv``, ``attn.to_added_qkv``,
``attn.fused_projections = True``). The fused engine then quantizes the input once
instead of three times and runs one GEMM with N = 3 · width, the wider shape at which it
is faster. The numbers are the same as unfused (each output column is computed from the
same quantized input and its own weight row).

It is a runtime transform, applied after loading and after LoRAs: ``unfuse_projections``
restores the separate layers (bit for bit), which saving and LoRA loading need.
Supported: FLUX.1's attention (``FluxAttention``).
"""

from __future__ import annotations

import torch
from torch import nn

from svdquant.nn import SVDQLinear

__all__ = ["fuse_projections", "unfuse_projections"]

#: attention classes whose processor takes ``to_qkv`` / ``to_added_qkv`` when fused
_FUSABLE = ("FluxAttention",)
#: (fused name, the separate layers) of diffusers' attention modules
_PARTS = (
    ("to_qkv", ("to_q", "to_k", "to_v")),
    ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
)
_FUSED_ATTR = "_svdquant_fused"  # on the attention: {fused name: (member names, widths)}


def _fusable(layers: list[nn.Module]) -> str | None:
    """Why ``layers`` cannot be concatenated along N (None if they can)."""
    if not all(isinstance(m, SVDQLinear) for m in layers):
        return "not all quantized"
    a = layers[0]
    for m in layers[1:]:
        if (m.in_features, m.fmt, m.act_fmt, m.rank, m.backend) != (
            a.in_features, a.fmt, a.act_fmt, a.rank, a.backend,
        ):  # fmt: skip
            return "different shapes or formats"
        if (m.bias is None) != (a.bias is None):
            return "bias on some only"
        for name in ("smooth", "lowrank_down", "act_amax", "wtensor_scale"):
            if not torch.equal(getattr(m, name), getattr(a, name)):
                return f"different {name} (not quantized as one group)"
    if any(getattr(m, "_svdquant_loras", None) for m in layers):
        return "LoRAs loaded (unload them, fuse, and load them again after unfusing)"
    return None


def _shell(like: SVDQLinear, out_features: int) -> SVDQLinear:
    """An empty layer (meta device) like ``like`` with ``out_features`` outputs."""
    return SVDQLinear.from_config(
        {**like.config(), "out_features": out_features}, device="meta", backend=like.backend
    )


def _concat(layers: list[SVDQLinear]) -> SVDQLinear:
    a = layers[0]
    fused = _shell(a, sum(m.out_features for m in layers))
    for name in ("qweight", "wscales", "lowrank_up") + (("bias",) if a.bias is not None else ()):
        setattr(fused, name, torch.cat([getattr(m, name) for m in layers]))
    for name in ("wtensor_scale", "smooth", "act_amax", "lowrank_down"):
        setattr(fused, name, getattr(a, name))
    fused.alpha = a.alpha
    return fused


def _split(fused: SVDQLinear, sizes: list[int]) -> list[SVDQLinear]:
    out = []
    start = 0
    for n in sizes:
        m = _shell(fused, n)
        rows = slice(start, start + n)
        for name in ("qweight", "wscales", "lowrank_up"):
            setattr(m, name, getattr(fused, name)[rows].clone())
        if fused.bias is not None:
            m.bias = fused.bias[rows].clone()
        for name in ("wtensor_scale", "smooth", "act_amax", "lowrank_down"):
            setattr(m, name, getattr(fused, name).clone())
        m.alpha = fused.alpha
        out.append(m)
        start += n
    return out


def fuse_projections(model: nn.Module) -> int:
    """Fuse the quantized q/k/v (and the text stream's added q/k/v) of every supported
    attention in ``model``; returns how many attention modules were fused. Modules whose
    layers cannot be fused (16-bit, separately quantized, LoRAs loaded) stay as they are."""
    count = 0
    for attn in model.modules():
        if type(attn).__name__ not in _FUSABLE or getattr(attn, "fused_projections", False):
            continue
        plan = []
        for fused_name, names in _PARTS:
            if getattr(attn, names[0], None) is None:
                continue
            layers = [getattr(attn, n) for n in names]
            if _fusable(layers) is not None:
                plan = []  # both groups or neither: diffusers' fused path takes both
                break
            plan.append((fused_name, names, layers))
        if not plan:
            continue
        for fused_name, names, layers in plan:
            setattr(attn, fused_name, _concat(layers))
            for n in names:
                delattr(attn, n)
        setattr(attn, _FUSED_ATTR, {f: ([n for n in names], [m.out_features for m in ls])
                                    for f, names, ls in plan})  # fmt: skip
        attn.fused_projections = True
        count += 1
    return count


def unfuse_projections(model: nn.Module) -> int:
    """Undo ``fuse_projections`` (the separate layers come back bit for bit); returns how
    many attention modules were unfused."""
    count = 0
    for attn in model.modules():
        parts = getattr(attn, _FUSED_ATTR, None)
        if not parts:
            continue
        for fused_name, (names, sizes) in parts.items():
            for n, m in zip(names, _split(getattr(attn, fused_name), sizes), strict=True):
                setattr(attn, n, m)
            delattr(attn, fused_name)
        delattr(attn, _FUSED_ATTR)
        attn.fused_projections = False
        count += 1
    return count


def is_fused(model: nn.Module) -> bool:
    """Whether ``fuse_projections`` fused any attention of ``model``."""
    return any(getattr(m, _FUSED_ATTR, None) for m in model.modules())
