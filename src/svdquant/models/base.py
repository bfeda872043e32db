"""What an architecture adapter says: which linear layers become 4-bit, which stay 16-bit
(and why), which keep 16-bit activations, and which share one activation quantization."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["ModelAdapter", "PointwiseConv", "QuantGroup"]


class PointwiseConv(nn.Module):
    """A 1×1 ``nn.Conv2d`` written as an ``nn.Linear`` over the channel axis.

    SANA's feed-forward (GLUMBConv) does its two large projections with 1×1 convolutions
    on NCHW tensors: they are GEMMs over channels, so we hold them as ``self.linear``
    (which the quantizer can replace by an ``SVDQLinear``) and move channels last around it.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, **kw) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=bias, **kw)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PointwiseConv:
        """Wrap ``conv`` (1×1, stride 1, no padding, groups 1); the weight is reused, not copied."""
        if not is_pointwise(conv):
            raise ValueError(f"not a pointwise convolution: {conv!r}")
        out_c, in_c = conv.weight.shape[:2]
        new = cls(in_c, out_c, bias=conv.bias is not None, device="meta")
        new.linear.weight = nn.Parameter(
            conv.weight.detach().reshape(out_c, in_c), requires_grad=conv.weight.requires_grad
        )
        if conv.bias is not None:
            new.linear.bias = conv.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.movedim(1, -1)).movedim(-1, 1)


def is_pointwise(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and m.stride == (1, 1)
        and m.padding in ((0, 0), "valid")
        and m.dilation == (1, 1)
        and m.groups == 1
    )


@dataclass(frozen=True)
class QuantGroup:
    """Linear layers that read the same input tensor and are quantized together: one
    smoothing vector, one low-rank down projection and one activation quantization for
    all of them (the fused engine quantizes the input once). ``names[0]`` is the leader."""

    names: tuple[str, ...]
    act_fmt: str | None  # None: the config's activation format; "none": 16-bit (W4A16)


@dataclass(frozen=True)
class ModelAdapter:
    """How one diffusers architecture is quantized.

    Patterns are regular expressions matched in full against module names (as in
    ``model.named_modules()``). Every ``nn.Linear`` is 4-bit (W4A4 by default) unless it
    matches ``keep`` (16-bit, with the reason) or ``w4a16`` (4-bit weight, 16-bit
    activations). ``shared_inputs`` patterns have one capture group, the common parent:
    linears matching the same pattern with the same parent form one ``QuantGroup``.
    """

    name: str
    class_name: str
    component: str  # the pipeline attribute holding the denoiser: "transformer" or "unet"
    description: str
    keep: tuple[tuple[str, str], ...] = ()
    w4a16: tuple[tuple[str, str], ...] = ()
    shared_inputs: tuple[str, ...] = ()
    pointwise_convs: tuple[str, ...] = ()  # 1×1 convolutions treated as linear layers
    notes: tuple[str, ...] = field(default=())

    def prepare(self, model: nn.Module) -> nn.Module:
        """Rewrite ``model`` in place into the form the quantizer sees (idempotent): the
        listed 1×1 convolutions become ``PointwiseConv``. Works on the meta device."""
        if not self.pointwise_convs:
            return model
        pat = re.compile("|".join(f"(?:{p})" for p in self.pointwise_convs))
        for name, m in list(model.named_modules()):
            if pat.fullmatch(name) and is_pointwise(m):
                parent, _, child = name.rpartition(".")
                setattr(
                    model.get_submodule(parent) if parent else model,
                    child,
                    PointwiseConv.from_conv(m),
                )
        return model

    def classify(self, name: str) -> tuple[str, str]:
        """``("keep", reason)``, ``("w4a16", reason)`` or ``("w4a4", "")`` for a linear."""
        for pat, why in self.keep:
            if re.fullmatch(pat, name):
                return "keep", why
        for pat, why in self.w4a16:
            if re.fullmatch(pat, name):
                return "w4a16", why
        return "w4a4", ""

    def plan(self, model: nn.Module, skip: Sequence[str] = ()) -> list[QuantGroup]:
        """The quantization groups of ``model`` (already ``prepare``d), in model order.

        ``skip``: extra patterns of layers to keep 16-bit (matched in full, or as a
        prefix ending at a dot, so ``"transformer_blocks.0"`` skips the whole block).
        """

        def skipped(name: str) -> bool:
            return any(re.fullmatch(p, name) or re.fullmatch(rf"{p}\..*", name) for p in skip)

        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear and not skipped(n)]
        groups: dict[tuple, list[str]] = {}
        acts: dict[tuple, str | None] = {}
        for name in linears:
            kind, _ = self.classify(name)
            if kind == "keep":
                continue
            key: tuple = ("single", name)
            for i, pat in enumerate(self.shared_inputs):
                m = re.fullmatch(pat, name)
                if m:
                    key = ("shared", i, m.group(1))
                    break
            act = "none" if kind == "w4a16" else None
            if key in acts and acts[key] != act:
                raise ValueError(f"{self.name}: group {key} mixes W4A4 and W4A16 layers")
            groups.setdefault(key, []).append(name)
            acts[key] = act
        return [QuantGroup(tuple(v), acts[k]) for k, v in groups.items()]

    def describe(self) -> str:
        """A human-readable summary of the decisions (used by the docs and the CLI)."""
        lines = [f"{self.name} ({self.class_name}): {self.description}"]
        lines += [f"  16-bit   {p}: {why}" for p, why in self.keep]
        lines += [f"  W4A16    {p}: {why}" for p, why in self.w4a16]
        lines += [f"  shared   {p}" for p in self.shared_inputs]
        lines += [f"  1x1 conv {p} -> linear" for p in self.pointwise_convs]
        lines.append("  everything else that is nn.Linear: W4A4")
        return "\n".join(lines)
