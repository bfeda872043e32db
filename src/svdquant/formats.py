"""The 4-bit number formats: quantize, dequantize, pack and unpack, in plain PyTorch.

Two formats, both quantized in groups along the last dimension (K):

``int4``
    Signed integer codes in [-7, 7] (symmetric), one fp16 scale per group of 64:
    ``x ≈ code * scale`` with ``scale = max|x_group| / 7``.
``nvfp4``
    FP4 E2M1 codes (values 0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6), one FP8 E4M3 scale per
    group of 16 times one FP32 scale per tensor:
    ``x ≈ e2m1(code) * scale_group * scale_tensor`` with
    ``scale_tensor = max|x| / (6 * 448)`` (so the largest group scale lands at 448, the
    top of E4M3) and ``scale_group = fp8(max|x_group| / 6 / scale_tensor)``.

Layout (the one on-disk layout; kernels may re-lay it out once at load time):

* ``K`` is padded with zeros up to a multiple of the group size. ``QuantizedTensor.shape``
  remembers the unpadded shape.
* Codes are packed two per byte along K: byte ``j`` holds element ``2j`` in its low
  nibble and element ``2j + 1`` in its high nibble. ``int4`` codes are two's complement
  nibbles; ``nvfp4`` codes are E2M1 bit patterns (bit 3 the sign, bits 0-2 the index of
  the magnitude in the value table above).
* Scales have shape ``[..., K_padded // group]``; the tensor scale is an fp32 tensor that
  broadcasts against ``[..., 1]`` (a scalar for weights, one per row for activations).

Group scales are rounded to their storage type first and the codes are computed against
the rounded scale, so ``dequantize(quantize(x))`` is exactly what a kernel reading the
stored tensors computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "FORMATS",
    "Format",
    "QuantizedTensor",
    "code_values",
    "dequantize",
    "fake_quantize",
    "get_format",
    "group_scales",
    "pack",
    "quantize",
    "quantize_with_scales",
    "round_codes",
    "unpack",
]

FP16_MAX = torch.finfo(torch.float16).max
FP8_E4M3_MAX = 448.0
E2M1_MAX = 6.0
# The 8 non-negative E2M1 magnitudes, indexed by the 3 low bits of the code.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class Format:
    """A 4-bit format: its name, group size along K and group-scale storage dtype."""

    name: str
    group_size: int
    scale_dtype: torch.dtype
    qmax: float  # the largest representable code magnitude

    def padded(self, k: int) -> int:
        """K rounded up to a whole number of groups."""
        return math.ceil(k / self.group_size) * self.group_size


FORMATS: dict[str, Format] = {
    "int4": Format("int4", 64, torch.float16, 7.0),
    "nvfp4": Format("nvfp4", 16, torch.float8_e4m3fn, E2M1_MAX),
}


def get_format(fmt: str | Format) -> Format:
    """Look a format up by name, with an error that lists the supported ones."""
    if isinstance(fmt, Format):
        return fmt
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown 4-bit format {fmt!r}; supported: {sorted(FORMATS)}") from None


@dataclass
class QuantizedTensor:
    """A tensor in a 4-bit format: packed codes, group scales and the tensor scale."""

    packed: torch.Tensor  # uint8 [..., K_padded // 2]
    scales: torch.Tensor  # [..., K_padded // group], fp16 (int4) or float8_e4m3fn (nvfp4)
    tensor_scale: torch.Tensor  # fp32, broadcasts against [..., 1]; ones for int4
    fmt: str
    shape: torch.Size  # the unpadded shape

    def codes(self) -> torch.Tensor:
        """The unpacked int8 codes, padded along K."""
        return unpack(self.packed, signed=self.fmt == "int4")


def _check_input(x: torch.Tensor) -> None:
    if not torch.is_floating_point(x):
        raise ValueError(f"can only quantize floating-point tensors, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("can only quantize tensors with at least one dimension (K)")


def _grouped(x: torch.Tensor, f: Format) -> torch.Tensor:
    """x as fp32 [..., K_padded // group, group], zero-padded along K."""
    k = x.shape[-1]
    x = x.float()
    if f.padded(k) != k:
        x = F.pad(x, (0, f.padded(k) - k))
    return x.reshape(*x.shape[:-1], x.shape[-1] // f.group_size, f.group_size)


def _nvfp4_tensor_scale(x: torch.Tensor) -> torch.Tensor:
    amax = x.detach().abs().amax().float()
    return torch.where(amax > 0, amax / (E2M1_MAX * FP8_E4M3_MAX), torch.ones_like(amax))


def group_scales(
    x: torch.Tensor,
    fmt: str | Format,
    tensor_scale: torch.Tensor | None = None,
    saturate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored group scales (and the fp32 tensor scale) that ``quantize`` would use.

    For ``nvfp4`` the tensor scale defaults to ``max|x| / (6 * 448)`` over the whole
    tensor; pass one (e.g. per row, shape ``[..., 1]``) to override. For ``int4`` it is 1.
    An ``int4`` group whose scale overflows fp16 raises, or with ``saturate`` (the run-time
    path for activations: no host sync, no data-dependent branch) is clipped to fp16's max.
    """
    f = get_format(fmt)
    _check_input(x)
    amax = _grouped(x, f).abs().amax(-1)
    if f.name == "int4":
        raw = amax / f.qmax
        if saturate:
            raw = raw.clamp(max=FP16_MAX)
        elif torch.isfinite(raw).all() and (raw > FP16_MAX).any():
            raise ValueError(
                f"a group's max |x| = {amax.max().item():.3g} exceeds what int4 with fp16 "
                f"scales can hold ({FP16_MAX * f.qmax:.3g})"
            )
        return raw.to(f.scale_dtype), torch.ones((), dtype=torch.float32, device=x.device)
    if tensor_scale is None:
        tensor_scale = _nvfp4_tensor_scale(x)
    tensor_scale = tensor_scale.float()
    raw = amax / f.qmax / tensor_scale
    return raw.clamp(max=FP8_E4M3_MAX).to(f.scale_dtype), tensor_scale


def round_codes(v: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """Codes (int8) of values ``v`` already divided by their scale: nearest grid point."""
    f = get_format(fmt)
    if f.name == "int4":
        return torch.round(v).clamp(-f.qmax, f.qmax).to(torch.int8)
    return _round_e2m1(v)


def code_values(codes: torch.Tensor, fmt: str | Format) -> torch.Tensor:
    """The grid values (fp32, before scaling) that codes stand for."""
    if get_format(fmt).name == "int4":
        return codes.float()
    values = torch.tensor(E2M1_VALUES, device=codes.device)
    mag = values[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -mag, mag)


def _round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (ties to even code), returning 4-bit codes."""
    mag = v.abs().clamp(max=E2M1_MAX)
    values = torch.tensor(E2M1_VALUES, device=v.device)
    mids = (values[1:] + values[:-1]) / 2
    idx = torch.bucketize(mag, mids)  # a tie goes to the lower neighbour here...
    tie = (idx < len(mids)) & (mag == mids[idx.clamp(max=len(mids) - 1)])
    idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)  # ...and to the even code here
    sign = ((v < 0) & (idx > 0)).to(torch.int8) << 3
    return idx.to(torch.int8) | sign


def quantize_with_scales(
    x: torch.Tensor, fmt: str | Format, scales: torch.Tensor, tensor_scale: torch.Tensor
) -> torch.Tensor:
    """Codes (int8, padded along K, unpacked) of ``x`` against given stored scales."""
    f = get_format(fmt)
    _check_input(x)
    xg = _grouped(x, f)
    step = scales.float().unsqueeze(-1)
    if f.name == "nvfp4":
        step = step * tensor_scale.float().unsqueeze(-1)
    v = torch.where(step > 0, xg / step, torch.zeros_like(xg))
    codes = round_codes(v, f)
    return codes.flatten(-2)


def quantize(
    x: torch.Tensor,
    fmt: str | Format = "int4",
    tensor_scale: torch.Tensor | None = None,
    saturate: bool = False,
) -> QuantizedTensor:
    """Quantize ``x`` along its last dimension into ``fmt``.

    ``tensor_scale`` and ``saturate`` are as in ``group_scales``.
    """
    f = get_format(fmt)
    scales, ts = group_scales(x, f, tensor_scale, saturate)
    codes = quantize_with_scales(x, f, scales, ts)
    return QuantizedTensor(pack(codes), scales, ts, f.name, x.shape)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``q`` stands for, in its original (unpadded) shape."""
    f = get_format(q.fmt)
    v = code_values(q.codes(), f)
    v = v.unflatten(-1, (v.shape[-1] // f.group_size, f.group_size))
    step = q.scales.float().unsqueeze(-1)
    if f.name == "nvfp4":
        step = step * q.tensor_scale.float().unsqueeze(-1)
    out = (v * step).flatten(-2)
    return out[..., : q.shape[-1]].to(dtype)


def fake_quantize(
    x: torch.Tensor,
    fmt: str | Format = "int4",
    tensor_scale: torch.Tensor | None = None,
    saturate: bool = False,
) -> torch.Tensor:
    """``dequantize(quantize(x))`` in fp32: what the quantized tensor stands for."""
    return dequantize(quantize(x, fmt, tensor_scale, saturate))


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (int8 in [-8, 15]) two per byte along the last dimension."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing needs an even last dimension, got {codes.shape[-1]}")
    if codes.dtype not in (torch.int8, torch.uint8):
        raise ValueError(f"codes must be int8 or uint8, got {codes.dtype}")
    u = codes.to(torch.uint8) & 0xF  # two's complement of int8 -> low nibble
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Unpack bytes into int8 codes: sign-extended nibbles if ``signed`` else 0..15."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    if signed:
        lo = (lo ^ 8) - 8
        hi = (hi ^ 8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)
