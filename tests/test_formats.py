"""The 4-bit formats: packing, round trips, grid error bounds, edge cases."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from svdquant import formats
from svdquant.formats import E2M1_VALUES, FORMATS

FMTS = sorted(FORMATS)


def _tensor(seed: int, rows: int, k: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g) * scale


@given(
    codes=st.lists(st.integers(-8, 7), min_size=1, max_size=64).filter(lambda v: len(v) % 2 == 0)
)
def test_pack_unpack_signed_lossless(codes):
    c = torch.tensor(codes, dtype=torch.int8)
    p = formats.pack(c)
    assert p.dtype == torch.uint8 and p.numel() == c.numel() // 2
    assert torch.equal(formats.unpack(p, signed=True), c)


@given(
    codes=st.lists(st.integers(0, 15), min_size=2, max_size=64).filter(lambda v: len(v) % 2 == 0)
)
def test_pack_unpack_unsigned_lossless(codes):
    c = torch.tensor(codes, dtype=torch.int8)
    assert torch.equal(formats.unpack(formats.pack(c), signed=False), c)


def test_pack_layout_is_low_nibble_first():
    p = formats.pack(torch.tensor([[1, 2, -1, 7]], dtype=torch.int8))
    assert p.tolist() == [[0x21, 0x7F]]


def _grid_error_bound(x: torch.Tensor, q: formats.QuantizedTensor) -> torch.Tensor:
    """Half the gap between the two grid points around each element (per element)."""
    f = FORMATS[q.fmt]
    step = q.scales.float().repeat_interleave(f.group_size, -1)[..., : x.shape[-1]]
    if q.fmt == "int4":
        return step / 2
    step = step * q.tensor_scale
    grid = torch.tensor(E2M1_VALUES)
    mag = (x.abs() / torch.where(step > 0, step, 1.0)).clamp(max=6.0)
    upper = torch.bucketize(mag, grid).clamp(1, len(grid) - 1)
    gap = grid[upper] - grid[upper - 1]
    return gap * step / 2


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(FMTS),
    rows=st.integers(1, 5),
    k=st.integers(1, 200),
    log_scale=st.floats(-3, 3),
    seed=st.integers(0, 2**16),
)
def test_round_trip_within_half_a_step(fmt, rows, k, log_scale, seed):
    x = _tensor(seed, rows, k, 10.0**log_scale)
    q = formats.quantize(x, fmt)
    y = formats.dequantize(q)
    assert y.shape == x.shape
    bound = _grid_error_bound(x, q)
    # fp16/fp8 rounding of the scale and a saturating top code may add a sliver.
    slack = 1e-6 * x.abs().amax() + 1e-30
    if fmt == "nvfp4":  # E4M3 rounds the group scale by up to 1/16: the top code clips
        slack = slack + x.abs() / 16
    assert ((y - x).abs() <= bound * (1 + 1e-5) + slack).all()


@pytest.mark.parametrize("fmt", FMTS)
def test_requantizing_is_exact(fmt):
    x = _tensor(0, 7, 130, 1.0)
    y = formats.fake_quantize(x, fmt)
    q2 = formats.quantize(y, fmt)
    assert torch.equal(formats.dequantize(q2), y)


@pytest.mark.parametrize("fmt", FMTS)
def test_zeros_and_constant_groups(fmt):
    z = torch.zeros(3, 64)
    q = formats.quantize(z, fmt)
    assert torch.equal(formats.dequantize(q), z)
    c = torch.full((2, 64), -0.37)
    assert torch.allclose(formats.dequantize(formats.quantize(c, fmt)), c, rtol=1e-3)


@pytest.mark.parametrize("fmt", FMTS)
def test_one_huge_outlier_is_kept(fmt):
    x = _tensor(1, 1, 64, 0.01)
    x[0, 5] = 1000.0
    y = formats.fake_quantize(x, fmt)
    assert y[0, 5] == pytest.approx(1000.0, rel=1e-3)
    assert torch.isfinite(y).all()


def test_int4_codes_and_scales():
    x = torch.arange(-32, 32, dtype=torch.float32)[None] / 4.0  # max |x| = 8
    q = formats.quantize(x, "int4")
    assert q.scales.dtype == torch.float16 and q.scales.shape == (1, 1)
    assert q.scales.item() == pytest.approx(8 / 7, rel=1e-3)
    assert q.codes().min() >= -7 and q.codes().max() <= 7


def test_nvfp4_values_are_exact_on_the_grid():
    x = torch.tensor([[0, 0.5, 1, 1.5, 2, 3, 4, 6, -6, -4, -3, -2, -1.5, -1, -0.5, 0]])
    q = formats.quantize(x, "nvfp4")
    assert q.scales.dtype == torch.float8_e4m3fn
    assert torch.equal(formats.dequantize(q), x)


def test_nvfp4_rounds_ties_to_even_code():
    ts = torch.tensor(1.0 / 448)  # group scale 448 * ts = 1 with a group max of 6
    x = torch.tensor([[6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] + [0.0] * 8])
    y = formats.fake_quantize(x, "nvfp4", tensor_scale=ts)
    assert y[0, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize("fmt", FMTS)
def test_k_not_a_multiple_of_the_group_is_padded(fmt):
    x = _tensor(2, 3, 70, 1.0)
    q = formats.quantize(x, fmt)
    g = FORMATS[fmt].group_size
    assert q.packed.shape[-1] * 2 == FORMATS[fmt].padded(70) and q.scales.shape[-1] * g >= 70
    assert formats.dequantize(q).shape == (3, 70)


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown 4-bit format"):
        formats.quantize(torch.ones(4), "int3")
    with pytest.raises(ValueError, match="floating-point"):
        formats.quantize(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="even"):
        formats.pack(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match="fp16"):
        formats.quantize(torch.tensor([1e7]), "int4")
    # ... unless saturating (the run-time activation path)
    assert torch.isfinite(formats.fake_quantize(torch.tensor([1e7]), "int4", saturate=True)).all()
