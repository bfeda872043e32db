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

__all__ = [
    "ACT_FORMATS",
    "ACT_SCALE_TARGET",
    "ENGINE_ACT_FORMATS",
    "act_scale_from_amax",
    "activation_ref",
    "fp8_gemm_gated_next_ref",
    "fp8_gemm_quantize_next_ref",
    "fp8_gemm_ref",
    "quantize_act_cat_ref",
    "quantize_act_gated_ref",
    "quantize_act_ref",
    "quantize_activations",
    "round_e4m3",
    "svdq_linear",
    "svdq_linear_fp8_ref",
    "w4a16_linear_ref",
    "widen_weight_ref",
]

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


# --- The Hopper engine's arithmetic (fp8 containers), one reference per Triton kernel ---
#
# Each function below has the signature of a kernel launcher in ``kernels/`` and computes
# what that kernel computes, fp8 roundings included, so kernel tests compare like with
# like. Only the order of fp32 sums differs from the kernels.

#: Activation formats the fp8 engine computes itself (``nvfp4`` activations need a
#: per-token scale, a row-wide reduction: that layer stays on the reference).
ENGINE_ACT_FORMATS = ("int4", "fp8", "none")

#: The static activation scale S maps the calibration max of |x / s| to this fp8 value:
#: half of E4M3's 448, headroom for activations larger than calibration's.
ACT_SCALE_TARGET = 224.0


def act_scale_from_amax(act_amax: torch.Tensor) -> torch.Tensor:
    """The static per-layer activation scale S (fp32 []) from the calibration max."""
    a = act_amax.float()
    return torch.where(a > 0, a / ACT_SCALE_TARGET, torch.ones_like(a))


def round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """fp32 ``v`` rounded to fp8 E4M3 (nearest, ties to even), saturating at ±448."""
    e4m3_max = formats.FP8_E4M3_MAX
    return v.float().clamp(-e4m3_max, e4m3_max).to(torch.float8_e4m3fn)


def quantize_act_ref(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    act_scale: torch.Tensor,
    k_out: int,
    act_fmt: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantize kernel: ``x`` [M, K] -> (fp8 [M, k_out], fp32 [M, r]).

    ``x̂ = x · (1 / s)``; ``act_fmt="int4"``: the paper's int4 g64 codes against fp16 group
    scales ``fp16(max|x̂_group| / 7)``, found as ``round(x̂ · (1 / s_group))`` (the product
    rounded once, to the integer), written as ``fp8(code · (s_group · (1 / S)))`` (one
    factor per group); ``"fp8"``: ``fp8(x̂ · (1 / S))`` (W4A8). Columns from
    K to ``k_out`` (the weight's padded K) are zero. The second output is the low-rank down
    projection ``x̂ · L_downᵀ``, computed as ``x · (L_down · diag(1/s))ᵀ`` with both
    factors in L_down's 16-bit dtype (the smoothing folded into L_down), summed in fp32.

    Every division is a reciprocal taken once (per column, group or layer) and multiplied
    in, as the kernel does; against the paper's ``x / s`` and ``x̂ / s_group`` this moves a
    value by at most one fp32 ulp, which can flip a code only on an exact rounding tie.
    """
    if act_fmt not in ("int4", "fp8"):
        raise ValueError(f"the fp8 engine quantizes activations to int4 or fp8, got {act_fmt!r}")
    m, k = x.shape
    xs = x.float() * (1.0 / smooth.float())
    inv_act = 1.0 / act_scale.float()
    if act_fmt == "int4":
        g = formats.FORMATS["int4"].group_size
        kg = -(-k // g) * g
        xg = torch.nn.functional.pad(xs, (0, kg - k)).reshape(m, kg // g, g)
        sg = (xg.abs().amax(-1) / 7.0).clamp(max=formats.FP16_MAX).half().float()
        inv_sg = torch.where(sg > 0, 1.0 / torch.where(sg > 0, sg, 1.0), 0.0)
        # the product rounded once (the kernel's FMA): exact in fp64, then to the integer
        code = torch.round(xg.double() * inv_sg.double().unsqueeze(-1)).clamp(-7, 7).float()
        f = (sg * inv_act).clamp(max=torch.finfo(torch.float32).max)
        val = (code * f.unsqueeze(-1)).reshape(m, kg)[:, :k]
    else:
        val = xs * inv_act
    xq = round_e4m3(val)
    xq = torch.nn.functional.pad(xq.float(), (0, k_out - k)).to(torch.float8_e4m3fn)
    dt = lowrank_down.dtype
    folded = (lowrank_down.float() * (1.0 / smooth.float())).to(dt).float()
    return xq, x.to(dt).float() @ folded.t()


#: The activations by name, as torch's own kernels in the input's dtype.
_TORCH_ACTIVATIONS = {
    "gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "none": lambda t: t,
}


def activation_ref(y: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation`` ("none", "gelu_tanh", "silu", "gelu") of ``y`` computed in fp32, as
    fp32."""
    return activation_like(y.float(), activation)


def activation_like(y: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation_ref`` rounded to y's dtype, in one pass of torch's own kernel (which
    computes a bf16 / fp16 input in fp32 inside): for an engine path that writes the
    activation out, where ``activation_ref``'s fp32 copies would be three passes."""
    fn = _TORCH_ACTIVATIONS.get(activation)
    if fn is None:
        raise ValueError(
            f"unknown activation {activation!r}; supported: {sorted(_TORCH_ACTIVATIONS)}"
        )
    return fn(y)


def quantize_act_cat_ref(
    x: torch.Tensor,
    tail: torch.Tensor,
    tail_act: str,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    act_scale: torch.Tensor,
    k_out: int,
    act_fmt: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_act_ref`` of ``cat([x, tail_act(tail)], -1)``, the activation computed in
    fp32 and rounded to x's dtype (the unfused ``cat([x, act(tail)])`` of 16-bit tensors)."""
    h = torch.cat([x, activation_ref(tail, tail_act).to(x.dtype)], dim=-1)
    return quantize_act_ref(h, smooth, lowrank_down, act_scale, k_out, act_fmt)


def quantize_act_gated_ref(
    x: torch.Tensor,
    gate: torch.Tensor,
    gate_act: str,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    act_scale: torch.Tensor,
    k_out: int,
    act_fmt: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_act_ref`` of ``x · gate_act(gate)`` (a gated linear unit: SDXL's GEGLU),
    the activation and the product each rounded to x's dtype, as the unfused 16-bit
    modules write them."""
    return quantize_act_ref(gated_ref(x, gate, gate_act), smooth, lowrank_down, act_scale,
                            k_out, act_fmt)  # fmt: skip


def gated_ref(x: torch.Tensor, gate: torch.Tensor, gate_act: str) -> torch.Tensor:
    """``x · gate_act(gate)`` (a gated linear unit's product), the activation and the
    product each rounded to x's dtype, as the unfused 16-bit modules write them."""
    return (x.float() * activation_ref(gate, gate_act).to(x.dtype).float()).to(x.dtype)


def _group_scaled(qweight: torch.Tensor, wscales: torch.Tensor, fmt: str) -> torch.Tensor:
    """``code_value · s_group`` [N, K_pad] in fp32: the stored weight before its tensor
    scale (what the widen, dequantize and GEMV kernels decode)."""
    f = formats.get_format(fmt)
    vals = formats.code_values(formats.unpack(qweight, signed=f.name == "int4"), f)
    sg = wscales.float()
    return (vals.reshape(*sg.shape, f.group_size) * sg.unsqueeze(-1)).reshape(vals.shape)


def widen_weight_ref(
    qweight: torch.Tensor, wscales: torch.Tensor, wtensor_scale: torch.Tensor, fmt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The widen kernel: stored 4-bit weight -> (fp8 [N, K_pad], fp32 s_channel [N]).

    ``c = qmax · max_g(s_group) / 448`` per output channel (1 for an all-zero row), the fp8
    operand is ``fp8(code_value · s_group · (1 / c))`` and ``s_channel = c · s_tensor``, so
    ``W ≈ fp8 · s_channel`` with each row's largest possible value at 448.
    """
    c = widen_row_scale(wscales, fmt)
    v = _group_scaled(qweight, wscales, fmt)
    return round_e4m3(v * (1.0 / c).unsqueeze(-1)), c * wtensor_scale.float()


def widen_row_scale(wscales: torch.Tensor, fmt: str) -> torch.Tensor:
    """The widen's per-row scale ``c = qmax · max_g(s_group) / 448`` (1 for an all-zero
    row), fp32 [N]: a property of the stored weight alone."""
    mx = formats.get_format(fmt).qmax * wscales.float().amax(-1)
    # A tensor divisor: PyTorch's CUDA division by a Python scalar multiplies by its
    # reciprocal, one rounding away from the kernel's correctly rounded ``div_rn``.
    c = mx / torch.full_like(mx, formats.FP8_E4M3_MAX)
    return torch.where(c > 0, c, torch.ones_like(c))


def dequantize_weight_ref(
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    fmt: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The stored 4-bit weight as 16-bit [N, K_pad]: ``code_value · s_group · s_tensor``
    in fp32, rounded once to ``dtype`` (the W4A16 path's GEMM operand at many tokens)."""
    return (_group_scaled(qweight, wscales, fmt) * wtensor_scale.float()).to(dtype)


def fp8_gemm_ref(
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
    """The fp8 GEMM: ``(xq · wqᵀ) · (S · s_channel) + lora_act · L_upᵀ + b`` in ``out_dtype``.

    fp8 x fp8 products are exact in fp32; the sums are fp32. The low-rank term is 16-bit:
    ``lora_act`` is rounded to L_up's dtype (a 16-bit MMA in the kernel). ``activation``:
    of the output as written, in fp32, rounded to ``out_dtype`` again.
    """
    acc = xq.float() @ wq.float().t()
    y = acc * (act_scale.float() * s_channel.float())
    if lowrank_up.shape[-1]:
        y = y + lora_act.to(lowrank_up.dtype).float() @ lowrank_up.float().t()
    if bias is not None:
        y = y + bias.float()
    y = y.to(out_dtype)
    return y if activation == "none" else activation_ref(y, activation).to(out_dtype)


def _part_columns(parts: list[int], sizes: list[int]):
    """For each segment of a split with ``parts = [P, w_0, w_1, ...]``: (its rows, its
    own columns in the full L_up, the same in the compact one) — the first P columns are
    every segment's."""
    p, row, col = parts[0], 0, parts[0]
    for n, w in zip(sizes, parts[1:], strict=True):
        yield slice(row, row + n), slice(col, col + w), slice(p, p + w)
        row, col = row + n, col + w


def expand_lowrank_parts(lowrank_up: torch.Tensor, parts: list[int], sizes: list[int]):
    """The full L_up [N, P + Σ w_i] of a compact one (``gemm.fp8_gemm_split``'s
    ``parts = [P, w_0, w_1, ...]``): segment i's rows keep their first P columns and put
    their next w_i at its own block, P + Σ_{j<i} w_j; zeros elsewhere."""
    p = parts[0]
    full = lowrank_up.new_zeros(lowrank_up.shape[0], p + sum(parts[1:]))
    full[:, :p] = lowrank_up[:, :p]
    for rows, own, compact in _part_columns(parts, sizes):
        full[rows, own] = lowrank_up[rows, compact]
    return full


def compact_width(parts: list[int]) -> int:
    """The compact L_up's columns for ``parts``: the base and the widest segment's own,
    padded to a multiple of 16 (a rank the GEMMs take whole)."""
    return -(-(parts[0] + max(parts[1:], default=0)) // 16) * 16


def compact_lowrank_parts(lowrank_up: torch.Tensor, parts: list[int], sizes: list[int]):
    """The compact L_up of a full one (the inverse of ``expand_lowrank_parts``), its
    columns padded with zeros to a multiple of 16: segment i's rows keep their first P
    columns, then their own block's w_i."""
    p = parts[0]
    out = lowrank_up.new_zeros(lowrank_up.shape[0], compact_width(parts))
    out[:, :p] = lowrank_up[:, :p]
    for rows, own, compact in _part_columns(parts, sizes):
        out[rows, compact] = lowrank_up[rows, own]
    return out


def fp8_gemm_quantize_next_ref(
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
    """The GEMM whose epilogue quantizes the next layer's input: ``fp8_gemm_ref`` (rounded
    to ``out_dtype``), the activation in fp32 (rounded to ``out_dtype``), then
    ``quantize_act_ref`` — the unfused pair's numbers."""
    y = fp8_gemm_ref(xq, wq, s_channel, act_scale, lora_act, lowrank_up, None, torch.float32)
    if bias is not None:
        y = y + bias.float()
    y = y.to(out_dtype)  # the layer's output as written (fp32 math inside, like torch's)
    h = activation_ref(y, activation).to(out_dtype)
    return quantize_act_ref(h, smooth2, lowrank_down2, act_scale2, k_out2, act_fmt2)


def fp8_gemm_gated_next_ref(
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
    """A gated unit's up projection (value rows, then gate rows) whose epilogue quantizes
    the down projection's input: ``fp8_gemm_ref`` (rounded to ``out_dtype``) chunked into
    ``v, g``, then ``quantize_act_gated_ref(v, g, activation, ...)`` — the unfused
    modules' numbers."""
    v, g = _gated_halves(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out_dtype)
    return quantize_act_gated_ref(v, g, activation, smooth2, lowrank_down2, act_scale2, k_out2,
                                  act_fmt2)  # fmt: skip


def _gated_halves(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out_dtype):
    """A gated unit's up projection as the layer writes it, chunked into (value, gate)."""
    if wq.shape[0] % 2:
        raise ValueError(
            f"a gated unit's up projection has an even number of rows, got {wq.shape[0]}"
        )
    y = fp8_gemm_ref(xq, wq, s_channel, act_scale, lora_act, lowrank_up, None, torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).chunk(2, dim=-1)


def fp8_gemm_gated_ref(
    xq: torch.Tensor,
    wq: torch.Tensor,
    s_channel: torch.Tensor,
    act_scale: torch.Tensor,
    lora_act: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """A GEGLU's up projection (value rows, then gate rows) writing ``h = v · gelu(g)``
    [M, H]: ``fp8_gemm_ref`` rounded to ``out_dtype``, chunked, then ``gated_ref`` — the
    unfused modules' numbers (``gemm_ws.fp8_gemm_ws_gated``)."""
    v, g = _gated_halves(xq, wq, s_channel, act_scale, lora_act, lowrank_up, bias, out_dtype)
    return gated_ref(v, g, "gelu")


def w4a16_linear_ref(
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
    """The W4A16 GEMV on ``x`` [M, K]: 4-bit weights, activations not quantized.

    ``x̂ = x · (1 / s)``; ``y = (x̂ · (code · s_group)ᵀ) · s_tensor + (x̂ · L_downᵀ) · L_upᵀ + b``,
    all fp32 (the kernel multiplies the 4-bit part in tf32, the low-rank part in ~fp32).
    """
    k = x.shape[-1]
    xs = x.float() * (1.0 / smooth.float())
    w = _group_scaled(qweight, wscales, fmt)
    y = (xs @ w[:, :k].t()) * wtensor_scale.float()
    if lowrank_down.shape[0]:
        y = y + (xs @ lowrank_down.float().t()) @ lowrank_up.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def svdq_linear_fp8_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    smooth: torch.Tensor,
    act_scale: torch.Tensor,
    lowrank_down: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
    act_fmt: str,
) -> torch.Tensor:
    """The whole fp8 engine layer in torch: quantize, widen, GEMM (what ``triton`` computes).

    ``act_fmt="none"`` is the W4A16 path (``w4a16_linear_ref``).
    """
    k, n = smooth.shape[0], qweight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if act_fmt == "none":
        y = w4a16_linear_ref(
            x2, qweight, wscales, wtensor_scale, smooth, lowrank_down, lowrank_up, bias, fmt
        )
        return y.reshape(*lead, n)
    xq, lora = quantize_act_ref(x2, smooth, lowrank_down, act_scale, qweight.shape[1] * 2, act_fmt)
    wq, s_channel = widen_weight_ref(qweight, wscales, wtensor_scale, fmt)
    y = fp8_gemm_ref(xq, wq, s_channel, act_scale, lora, lowrank_up, bias, x.dtype)
    return y.reshape(*lead, n)


def rms_norm_rope_ref(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    head: torch.Tensor | None = None,
    head_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rope(cat([rms_norm(head, head_weight), rms_norm(x, weight)], 1), cos, sin)``:
    FLUX's q/k preparation as diffusers computes it (``torch.nn.RMSNorm`` per head, the
    text heads first, ``apply_rotary_emb`` with interleaved pairs), ``x`` and ``head``
    [B, S, H, D], ``cos``/``sin`` [S_head + S, D]. Reference of ``rope.rms_norm_rope``."""
    d = x.shape[-1]
    y = torch.nn.functional.rms_norm(x, (d,), weight, eps)
    if head is not None:
        y = torch.cat([torch.nn.functional.rms_norm(head, (d,), head_weight, eps), y], dim=1)
    cos, sin = cos[None, :, None, :].to(y.device), sin[None, :, None, :].to(y.device)
    y_real, y_imag = y.reshape(*y.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-y_imag, y_real], dim=-1).flatten(3)
    return (y.float() * cos + rotated.float() * sin).to(y.dtype)


def layer_norm_modulate_ref(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float
) -> torch.Tensor:
    """``layer_norm(x) · (1 + scale[:, None]) + shift[:, None]``: FLUX's adaptive norm as
    diffusers computes it (``nn.LayerNorm`` without affine weights, then PyTorch's
    elementwise ops in ``x``'s dtype). Reference of ``modulate.layer_norm_modulate``."""
    n = torch.nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)
    return n * (1 + scale[:, None]) + shift[:, None]


def gate_residual_ref(
    residual: torch.Tensor, gate: torch.Tensor, x: torch.Tensor, clip_fp16: bool = False
) -> torch.Tensor:
    """``residual + gate[:, None] · x`` as diffusers' blocks add a gated branch to the
    residual stream (``clip_fp16``: then clipped to fp16's range for an fp16 stream).
    Reference of ``modulate.gate_residual``."""
    y = residual + gate.unsqueeze(1) * x
    return y.clip(-65504, 65504) if clip_fp16 and y.dtype == torch.float16 else y


def gate_residual_modulate_ref(
    residual: torch.Tensor,
    gate: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    clip_fp16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = gate_residual_ref(residual, gate, x, clip_fp16)`` and
    ``layer_norm_modulate_ref(h, scale, shift, eps)``: a double block's attention output
    joining the stream, then its feed-forward's adaptive norm, as diffusers computes
    them. Reference of ``modulate.gate_residual_modulate``."""
    h = gate_residual_ref(residual, gate, x, clip_fp16)
    return h, layer_norm_modulate_ref(h, scale, shift, eps)
