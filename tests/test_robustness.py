"""Run-time inputs the layer must survive: odd sizes, dtypes, layouts, overflow, NaN."""

import pytest
import torch
from torch import nn

import svdquant

from conftest import rel_err


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = svdquant.quantize_linear(lin, torch.randn(128, 96), rank=8)
    return lin, q


def test_one_token_and_long_sequences(layer):
    _, q = layer
    g = torch.Generator().manual_seed(1)
    one = torch.randn(1, 1, 96, generator=g)
    assert q(one).shape == (1, 1, 40)
    long = torch.randn(1, 20000, 96, generator=g)
    y = q(long)
    assert y.shape == (1, 20000, 40) and torch.isfinite(y).all()
    assert torch.allclose(y[0, :1], q(long[0, :1]), atol=1e-6)  # rows are independent


def test_non_contiguous_inputs(layer):
    _, q = layer
    g = torch.Generator().manual_seed(2)
    base = torch.randn(96, 12, generator=g)
    x = base.t()  # [12, 96], not contiguous
    assert not x.is_contiguous()
    assert torch.allclose(q(x), q(x.contiguous()), atol=1e-5)  # BLAS may sum in another order
    strided = torch.randn(12, 192, generator=g)[:, ::2]
    assert torch.allclose(q(strided), q(strided.contiguous()), atol=1e-5)


def test_fp16_low_rank_branch_does_not_overflow():
    # (x/s) L_down^T is ~1e5 here (beyond fp16), L_up brings it back to ~1: the branch is
    # accumulated in fp32, so an fp16 layer still gives the right answer.
    torch.manual_seed(3)
    lin = nn.Linear(64, 32).half()
    q = svdquant.quantize_linear(lin, torch.randn(64, 64).half(), rank=4, act_fmt="none")
    q.lowrank_down.mul_(1000.0)
    q.lowrank_up.div_(1000.0)
    x = (torch.randn(8, 64) * 100).half()
    assert (x.float() / q.smooth @ q.lowrank_down.float().t()).abs().max() > 65504
    y = q(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    ref = x.float() @ q.dequantize().float().t() + q.bias.float()
    assert rel_err(y, ref) < 5e-3


def test_inf_propagates_like_nan(layer):
    _, q = layer
    x = torch.randn(2, 96)
    x[0, 0] = float("inf")
    y = q(x)
    assert not torch.isfinite(y[0]).any() and torch.isfinite(y[1]).all()


def test_rank_larger_than_the_layer_is_a_clear_error():
    lin = nn.Linear(20, 10)
    with pytest.raises(ValueError, match=r"rank 11 is larger .* = 10"):
        svdquant.quantize_linear(lin, torch.randn(4, 20), rank=11)
    q = svdquant.quantize_linear(lin, torch.randn(4, 20), rank=10)  # the limit itself works
    x = torch.randn(3, 20)
    assert rel_err(q(x), lin(x)) < 0.2


@pytest.mark.parametrize("rank", [8])
@pytest.mark.parametrize("act_fmt", ["int4", "fp8", "none"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_triton_backend_propagates_nan_and_inf_per_token(act_fmt, bad, rank):
    """The engine's kernels keep the documented behaviour (on the CPU: in the interpreter):
    a non-finite activation makes its own token's outputs non-finite, never a finite
    value clamped from it, and leaves the other tokens alone. The low-rank branch (16-bit,
    every SVDQuant layer has one) is what carries it on the fp8 path: the fp8 operand
    itself saturates (a known gap for rank-0 layers on the GPU, see README)."""
    torch.manual_seed(4)
    lin = nn.Linear(96, 40).to(torch.bfloat16)
    calib = torch.randn(128, 96).bfloat16()
    q = svdquant.quantize_linear(lin, calib, rank=rank, act_fmt=act_fmt)
    q.backend = "triton"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q = q.to(device)
    x = torch.randn(3, 96, device=device).bfloat16()
    x[1, 5] = bad
    y = q(x)
    assert not torch.isfinite(y[1]).any()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
