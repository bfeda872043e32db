"""SVDQLinear: shapes, dtypes, padding, dequantize, dtype casts, bad inputs."""

import copy

import pytest
import torch
from torch import nn

import svdquant
from svdquant import SVDQLinear

from conftest import rel_err


@pytest.fixture(scope="module")
def odd_layer():
    """K = 70 (not a multiple of 64 or 16), N = 33."""
    torch.manual_seed(0)
    lin = nn.Linear(70, 33)
    return lin, torch.randn(64, 70)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("act_fmt", [None, "fp8", "none"])
def test_any_leading_dims_and_padded_k(odd_layer, fmt, act_fmt):
    lin, calib = odd_layer
    q = svdquant.quantize_linear(lin, calib, fmt=fmt, act_fmt=act_fmt, rank=8)
    torch.manual_seed(1)
    assert q.qweight.shape == (33, svdquant.FORMATS[fmt].padded(70) // 2)
    for shape in [(70,), (1, 70), (3, 70), (2, 5, 70), (2, 1, 3, 70)]:
        x = torch.randn(shape)
        y = q(x)
        assert y.shape == (*shape[:-1], 33)
        assert rel_err(y, lin(x)) < 0.2  # random weights: no outliers to absorb
    # tokens are independent: a row's result does not depend on its batch
    x = torch.randn(5, 70)
    assert torch.allclose(q(x)[2:3], q(x[2:3]), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_input_dtypes(odd_layer, dtype):
    lin, calib = odd_layer
    q = svdquant.quantize_linear(copy.deepcopy(lin).to(dtype), calib.to(dtype), rank=8)
    x = torch.randn(4, 70, generator=torch.Generator().manual_seed(3))
    y = q(x.to(dtype))
    assert y.dtype == dtype
    assert rel_err(y, lin(x)) < 0.15


def test_dequantize_is_the_effective_weight(odd_layer):
    lin, calib = odd_layer
    q = svdquant.quantize_linear(lin, calib, act_fmt="none", rank=8)
    w = q.dequantize()
    assert w.shape == (33, 70) and w.dtype == torch.float16
    x = torch.randn(10, 70)
    assert torch.allclose(q(x), x @ w.float().t() + q.bias.float(), rtol=1e-2, atol=1e-2)
    assert rel_err(w, lin.weight) < 0.1


def test_casting_the_module_keeps_the_format(odd_layer):
    lin, calib = odd_layer
    q = svdquant.quantize_linear(lin, calib, fmt="nvfp4", rank=8)
    x = torch.randn(6, 70, generator=torch.Generator().manual_seed(4))
    before = q(x)
    scales = q.wscales.clone()
    q.to(torch.bfloat16)
    assert q.wscales.dtype == torch.float8_e4m3fn and q.smooth.dtype == torch.float32
    assert q.lowrank_up.dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    assert torch.equal(q.wscales.float(), scales.float())
    assert rel_err(q(x.bfloat16()), before) < 0.03  # bf16 inputs move a few 4-bit bins
    q.half()
    assert q.wscales.dtype == torch.float8_e4m3fn and q.lowrank_down.dtype == torch.float16


def test_shell_on_meta_has_the_checkpoint_shapes():
    shell = SVDQLinear(3072, 12288, fmt="int4", rank=32, device="meta")
    shapes = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    assert shapes == {
        "qweight": (12288, 1536),
        "wscales": (12288, 48),
        "wtensor_scale": (),
        "smooth": (3072,),
        "act_amax": (),
        "lowrank_down": (32, 3072),
        "lowrank_up": (12288, 32),
        "bias": (12288,),
    }
    # 4-bit codes + fp16 scales + rank-32 branch: about 3.6x smaller than bf16
    nbytes = sum(v.numel() * v.element_size() for v in shell.state_dict().values())
    assert 3072 * 12288 * 2 / nbytes > 3.5


def test_bad_inputs(odd_layer):
    lin, calib = odd_layer
    q = svdquant.quantize_linear(lin, calib, rank=4)
    with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 70\]"):
        q(torch.randn(4, 71))
    with pytest.raises(ValueError, match="floating-point"):
        q(torch.ones(4, 70, dtype=torch.int64))
    with pytest.raises(ValueError, match="but the layer is on"):
        q(torch.randn(4, 70, device="meta"))
    with pytest.raises(ValueError, match="unknown activation format"):
        SVDQLinear(8, 8, act_fmt="int2")
    with pytest.raises(ValueError, match="unknown backend"):
        SVDQLinear(8, 8, backend="cuda-magic")
    with pytest.raises(ValueError, match="positive"):
        SVDQLinear(0, 8)


def test_nan_in_activations_propagates_to_its_token(odd_layer):
    lin, calib = odd_layer
    q = svdquant.quantize_linear(lin, calib, rank=4)
    x = torch.randn(3, 70)
    x[1, 5] = float("nan")
    y = q(x)
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[[0, 2]]).all()
    assert q(torch.randn(0, 70)).shape == (0, 33)  # an empty batch is fine
