"""Property tests: the engine's Triton kernels against their torch references on random
shapes and values (hypothesis).

The parametrized sweeps in ``test_kernels.py`` pick shapes by hand; here hypothesis picks
them: any M (0 and 1 included), N and K that are multiples of nothing, any rank up to
past a tile, both weight formats, every activation format, both 16-bit dtypes, values
spread over several orders of magnitude. On the CPU the kernels run in Triton's
interpreter (set by ``conftest.py``), on a GPU compiled.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from svdquant import formats
from svdquant.kernels import quantize as quantize_mod
from svdquant.kernels import reference as ref
from svdquant.kernels.gemv import MAX_GEMV_M, w4a16_linear
from svdquant.kernels.ops import svdq_linear_triton
from svdquant.kernels.quantize import quantize_act

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROPS = settings(
    max_examples=30 if DEVICE == "cpu" else 8,  # on a GPU each new (N, K) autotunes the GEMM
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    suppress_health_check=[HealthCheck.too_slow],
)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _tensors(draw_seed: int, m: int, n: int, k: int, r: int, fmt: str, dtype, scale: float):
    g = torch.Generator().manual_seed(draw_seed)
    x = torch.randn(m, k, generator=g) * scale
    if k >= 8:  # a few outlier channels, as in a diffusion model's activations
        x[:, : k // 8] *= 20
    w = torch.randn(n, k, generator=g) * 0.05
    q = formats.quantize(w, fmt)
    smooth = torch.rand(k, generator=g) * 2 + 0.25
    down = torch.randn(r, k, generator=g) / k**0.5
    up = torch.randn(n, r, generator=g) * 0.1
    bias = torch.randn(n, generator=g)
    amax = (x / smooth).abs().amax() if m else torch.tensor(1.0)
    to = {"device": DEVICE}
    return (
        x.to(DEVICE, dtype),
        q.packed.to(**to),
        q.scales.to(**to),
        q.tensor_scale.to(**to),
        smooth.to(**to),
        amax.to(**to),
        down.to(DEVICE, dtype),
        up.to(DEVICE, dtype),
        bias.to(DEVICE, dtype),
    )


shapes = st.tuples(
    st.integers(0, 70),  # M
    st.integers(1, 150),  # N
    st.integers(1, 300),  # K
    st.integers(0, 40),  # rank
)


@PROPS
@given(
    shape=shapes,
    fmt=st.sampled_from(["int4", "nvfp4"]),
    act_fmt=st.sampled_from(["int4", "fp8"]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
# the edges, always tried: one token, no token, K below a group, rank 0 and past 32
@example(shape=(1, 7, 3, 0), fmt="int4", act_fmt="int4", dtype=torch.bfloat16, scale=1.0,
         bias=True, seed=0)  # fmt: skip
@example(shape=(0, 9, 65, 5), fmt="nvfp4", act_fmt="fp8", dtype=torch.float16, scale=1.0,
         bias=False, seed=1)  # fmt: skip
@example(shape=(70, 150, 300, 40), fmt="nvfp4", act_fmt="int4", dtype=torch.bfloat16,
         scale=30.0, bias=True, seed=2)  # fmt: skip
def test_layer_kernels_match_reference(shape, fmt, act_fmt, dtype, scale, bias, seed):
    """The whole W4A4/W4A8 layer (quantize, widen, GEMM) equals the torch emulation of the
    same fp8 arithmetic within 16-bit output rounding, for any shape."""
    m, n, k, r = shape
    x, qw, ws, ts, smooth, amax, down, up, b = _tensors(seed, m, n, k, r, fmt, dtype, scale)
    b = b if bias else None
    y = svdq_linear_triton(x, qw, ws, ts, smooth, amax, down, up, b, fmt, act_fmt)
    s = ref.act_scale_from_amax(amax)
    y_ref = ref.svdq_linear_fp8_ref(x, qw, ws, ts, smooth, s, down, up, b, fmt, act_fmt)
    assert y.shape == (m, n) and y.dtype == dtype
    assert torch.isfinite(y).all()
    if m:
        assert _rel_err(y, y_ref) <= 4e-3


@PROPS
@given(shape=shapes, act_fmt=st.sampled_from(["int4", "fp8"]), seed=st.integers(0, 2**16))
def test_quantize_kernel_equals_reference(shape, act_fmt, seed):
    """The activation quantize kernel writes the reference's fp8 values, value for value,
    and its low-rank down projection to fp32 summation order."""
    m, _, k, r = shape
    x, qw, _, _, smooth, amax, down, _, _ = _tensors(seed, m, 1, k, r, "int4", torch.bfloat16, 1)
    s = ref.act_scale_from_amax(amax)
    k_out = qw.shape[1] * 2
    xq, lora = quantize_act(x, smooth, down, s, k_out, act_fmt)
    xq_ref, lora_ref = ref.quantize_act_ref(x, smooth, down, s, k_out, act_fmt)
    assert xq.shape == (m, k_out) and lora.shape == (m, r)
    diff = xq.float() != xq_ref.float()
    # On the GPU a multiply may be fused into the next rounding: a value on an exact tie
    # can land on its other neighbour (one fp8 step), never further.
    if m:
        assert diff.float().mean().item() <= (0 if DEVICE == "cpu" else 1e-3)
    if r and m:
        assert _rel_err(lora, lora_ref) <= 1e-5


@PROPS
@given(
    shape=shapes,
    act=st.sampled_from(["gelu", "gelu_tanh", "silu"]),
    act_fmt=st.sampled_from(["int4", "fp8"]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_gated_quantize_matches_reference(shape, act, act_fmt, dtype, seed):
    """The gated quantize (a GEGLU's down-projection input ``x · act(gate)``, read from the
    two halves of the up projection's output) writes the reference's fp8 values but for
    rare ties (the kernel's erf and exp against torch's in the last fp32 bits), and its
    low-rank down projection to fp32 summation order."""
    m, _, k, r = shape
    x, qw, _, _, smooth, _, down, _, _ = _tensors(seed, m, 1, k, r, "int4", dtype, 1)
    up = torch.cat([x, x.roll(1, dims=-1) * 0.5], dim=-1)
    x, gate = up.chunk(2, dim=-1)
    h = (x.float() * ref.activation_ref(gate, act).to(dtype).float()).to(dtype)
    amax = (h.float() / smooth).abs().amax() if m else torch.tensor(1.0, device=DEVICE)
    s = ref.act_scale_from_amax(amax)
    k_out = qw.shape[1] * 2
    xq, lora = quantize_act(x, smooth, down, s, k_out, act_fmt, gate, act, gated=True)
    xq_ref, lora_ref = ref.quantize_act_gated_ref(x, gate, act, smooth, down, s, k_out, act_fmt)
    assert xq.shape == (m, k_out) and lora.shape == (m, r)
    if m:
        assert (xq.float() != xq_ref.float()).float().mean().item() <= 5e-3
    if r and m:
        assert _rel_err(lora, lora_ref) <= 1e-4


@PROPS
@given(
    shape=shapes,
    act=st.sampled_from(["gelu", "gelu_tanh", "silu", "none"]),
    act_fmt=st.sampled_from(["int4", "fp8"]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    bias=st.booleans(),
    r2=st.integers(0, 20),
    seed=st.integers(0, 2**16),
)
def test_gated_up_projection_matches_reference(shape, act, act_fmt, dtype, bias, r2, seed):
    """The gated up projection (a GEGLU's up projection writing its down projection's
    quantized input, ``gemm_gated``) on a layer's real operands: the reference's codes but
    for rare roundings (the kernel's erf and exp against torch's in the last fp32 bits; on
    a GPU also the fp8 tensor cores' sums), its low-rank sums to fp32 summation order."""
    from svdquant.kernels.gemm_gated import fp8_gemm_gated_next
    from svdquant.kernels.widen import widen_weight

    m, h, k, r = shape
    x, qw, qs, qt, smooth, amax, down, up, b = _tensors(seed, m, 2 * h, k, r, "int4", dtype, 1)
    s = ref.act_scale_from_amax(amax)
    xq, lora = quantize_act(x, smooth, down, s, qw.shape[1] * 2, act_fmt)
    wq, s_ch = widen_weight(qw, qs, qt, "int4")
    g = torch.Generator().manual_seed(seed + 1)
    smooth2 = (torch.rand(h, generator=g) * 2 + 0.25).to(DEVICE)
    down2 = (torch.randn(r2, h, generator=g) / h**0.5).to(DEVICE, dtype)
    bias_ = b if bias else None
    v, gate = ref.fp8_gemm_ref(xq, wq, s_ch, s, lora, up, bias_, dtype).chunk(2, dim=-1)
    hid = v.float() * ref.activation_ref(gate, act).to(dtype).float()
    amax2 = (hid / smooth2).abs().amax() if m else torch.tensor(1.0, device=DEVICE)
    args = (xq, wq, s_ch, s, lora, up, bias_, dtype, act, smooth2, down2,
            ref.act_scale_from_amax(amax2), -(-h // 64) * 64, act_fmt)  # fmt: skip
    xq2, lora2 = fp8_gemm_gated_next(*args)
    xq2_ref, lora2_ref = ref.fp8_gemm_gated_next_ref(*args)
    assert xq2.shape == (m, args[12]) and lora2.shape == (m, r2)
    if not m:
        return
    flips = (xq2.float() != xq2_ref.float()).sum().item()
    if DEVICE == "cpu":
        assert flips <= max(2, 0.01 * xq2.numel()), flips
    assert _rel_err(xq2, xq2_ref) <= (0.02 if DEVICE == "cpu" else 0.05)
    if r2:
        assert _rel_err(lora2, lora2_ref) <= (1e-3 if DEVICE == "cpu" else 5e-3)


@PROPS
@given(
    m=st.integers(1, MAX_GEMV_M),
    n=st.integers(1, 200),
    k=st.integers(1, 400),
    r=st.integers(0, 40),
    fmt=st.sampled_from(["int4", "nvfp4"]),
    seed=st.integers(0, 2**16),
)
def test_w4a16_kernel_matches_reference(m, n, k, r, fmt, seed):
    """The W4A16 GEMV equals the fp32 reference within 16-bit output rounding."""
    x, qw, ws, ts, smooth, _, down, up, b = _tensors(seed, m, n, k, r, fmt, torch.bfloat16, 1)
    y = w4a16_linear(x, qw, ws, ts, smooth, down, up, b, fmt)
    y_ref = ref.w4a16_linear_ref(x, qw, ws, ts, smooth, down, up, b, fmt)
    assert y.shape == (m, n)
    assert _rel_err(y, y_ref) <= 4e-3


@given(
    m_blocks=st.integers(1, 5000),
    steps=st.integers(1, 400),
    sms=st.integers(1, 200),
)
@settings(max_examples=300, deadline=None, derandomize=True)
def test_quantize_k_split_covers_k_once(m_blocks, steps, sms):
    """The quantize's K split: every step in exactly one program, no empty program, and
    one-step programs only where two-step ones would number fewer than
    ``TWO_STEP_MIN_PER_SM`` per multiprocessor."""
    split, per = quantize_mod.k_split(m_blocks, steps, sms)
    assert 1 <= split <= steps and per >= 1
    assert (split - 1) * per < steps <= split * per
    if per == 1 and steps >= 2:
        assert m_blocks * (steps // 2) < quantize_mod.TWO_STEP_MIN_PER_SM * sms


def _ulp_close(a: torch.Tensor, r: torch.Tensor) -> bool:
    """Equal up to a norm's last bit carried through what follows it (a few units of the
    row's largest value; the sum order differs from PyTorch's)."""
    ulp = 2.0**-8 if a.dtype == torch.bfloat16 else 2.0**-11
    af, rf = a.float(), r.float()
    return bool(((af - rf).abs() <= 4 * ulp * rf.abs().amax(-1, keepdim=True) + 1e-6).all())


@PROPS
@given(
    b=st.integers(1, 3),
    s_head=st.integers(0, 9),
    s=st.integers(1, 40),
    h=st.integers(1, 4),
    d=st.sampled_from([2, 8, 32, 64, 128]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    affine=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
    packed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rms_norm_rope_matches_reference(b, s_head, s, h, d, dtype, affine, scale, packed, seed):
    """The q/k kernels (``kernels/rope.py``, split or ``PACKED``): any token counts, text
    heads or none, head sizes from a single pair up, values of any scale (the norm
    removes it)."""
    from svdquant.kernels import rope
    from svdquant.kernels.rope import rms_norm_rope

    rope.PACKED, was = packed, rope.PACKED

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, s, h, d, generator=g) * scale).to(DEVICE, dtype)
    head = (torch.randn(b, s_head, h, d, generator=g) * scale).to(DEVICE, dtype) if s_head else None
    w = (torch.rand(d, generator=g) + 0.5).to(DEVICE, dtype) if affine else None
    wh = (torch.rand(d, generator=g) + 0.5).to(DEVICE, dtype) if affine and s_head else None
    angle = torch.rand(s_head + s, d // 2, generator=g) * 100
    cos = angle.cos().repeat_interleave(2, 1).to(DEVICE)
    sin = angle.sin().repeat_interleave(2, 1).to(DEVICE)
    args = (x, w, 1e-6, cos, sin, head, wh)
    try:
        assert _ulp_close(rms_norm_rope(*args), ref.rms_norm_rope_ref(*args))
    finally:
        rope.PACKED = was


@PROPS
@given(
    b=st.integers(1, 3),
    s=st.integers(1, 20),
    c=st.integers(1, 300),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    scale=st.sampled_from([1e-2, 1.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_modulate_kernels_match_reference(b, s, c, dtype, scale, seed):
    """The adaptive norm and the gated residual (``kernels/modulate.py``): any channel
    count (not a power of two), scale and shift as chunks of one embedding."""
    from svdquant.kernels.modulate import gate_residual, layer_norm_modulate

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, s, c, generator=g) * scale + scale).to(DEVICE, dtype)
    emb = torch.randn(b, 3 * c, generator=g).to(DEVICE, dtype)
    shift, sc, gate = emb[:, :c], emb[:, c : 2 * c], emb[:, 2 * c :]
    if c > 1:  # one channel normalizes to 0 whatever the sum order
        assert _ulp_close(
            layer_norm_modulate(x, sc, shift, 1e-6), ref.layer_norm_modulate_ref(x, sc, shift, 1e-6)
        )
    r = torch.randn(b, s, c, generator=g).to(DEVICE, dtype)
    assert torch.equal(gate_residual(r, gate, x), ref.gate_residual_ref(r, gate, x))
