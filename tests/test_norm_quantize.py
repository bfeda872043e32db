"""The adaptive norm that writes the next layer's quantized input
(``kernels/norm_quantize.py``) against the norm kernel followed by the quantize, and
against the PyTorch reference.

Without CUDA the kernel runs in triton's interpreter on small shapes; tests marked ``gpu``
run PixArt-Σ's, SANA's and FLUX's sizes on the device. The mean and variance are summed
step by step along the row, in another order than the norm kernel's and PyTorch's: a rare
normalized value may sit one unit in the last place away, and its code one step.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import svdquant  # noqa: E402
from svdquant import kernels  # noqa: E402
from svdquant.kernels import reference as ref  # noqa: E402
from svdquant.kernels.modulate import layer_norm_modulate  # noqa: E402
from svdquant.kernels.norm_quantize import norm_modulate_quantize  # noqa: E402
from test_kernels import fp8_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(b, s, c, r, dtype=torch.bfloat16, seed=0):
    """(x, scale, shift, eps, smooth, lowrank_down, act_scale, k_out): a block's stream
    with outlier channels, its modulation, and a next layer's quantization parameters
    (the static scale from the norm's own output, as calibration would set it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, c, generator=g) * 3 + 0.5
    x[..., : min(3, c)] *= 20
    scale = torch.randn(b, c, generator=g) * 0.3
    shift = torch.randn(b, c, generator=g) * 0.3
    smooth = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    down = (torch.randn(r, c, generator=g) / c**0.5).to(DEVICE, dtype)
    x, scale, shift = (t.to(DEVICE, dtype) for t in (x, scale, shift))
    n = ref.layer_norm_modulate_ref(x, scale, shift, 1e-6)
    act = ref.act_scale_from_amax((n.float() / smooth).abs().amax())
    return x, scale, shift, 1e-6, smooth, down, act, -(-c // 64) * 64


def _check(args, act_fmt, own_frac=0.0):
    """The kernel against the norm kernel then the quantize's reference (its own norm's
    numbers: codes equal but for ``own_frac``, sums to fp32 rounding) and against the
    PyTorch reference (codes within one step at a few places)."""
    x, scale, shift, eps, smooth, down, act, k_out = args
    xq, lora = norm_modulate_quantize(*args, act_fmt)
    c = x.shape[-1]
    assert xq.shape == (x.shape[0] * x.shape[1], k_out) and xq.dtype == torch.float8_e4m3fn
    assert lora.shape == (xq.shape[0], down.shape[0]) and lora.dtype == torch.float32
    n = layer_norm_modulate(x, scale, shift, eps).reshape(-1, c)
    oq, ol = ref.quantize_act_ref(n, smooth, down, act, k_out, act_fmt)
    assert fp8_close(xq, oq, max_frac=own_frac)
    if ol.numel():
        torch.testing.assert_close(lora, ol, rtol=1e-4, atol=1e-4 * ol.abs().max().item())
    rq, _ = ref.norm_modulate_quantize_ref(*args, act_fmt)
    assert fp8_close(xq, rq, max_frac=0.02)


@pytest.mark.parametrize(
    ("b", "s", "c", "r"),
    [(1, 1, 64, 8), (2, 37, 200, 32), (1, 3, 1, 0), (3, 5, 96, 0), (2, 17, 257, 16),
     (1, 257, 130, 64)],
)  # fmt: skip
@pytest.mark.parametrize(("act_fmt", "dtype"), [("int4", torch.bfloat16), ("fp8", torch.float16)])
def test_matches_the_norm_then_the_quantize(b, s, c, r, act_fmt, dtype):
    """One token to 257, C of one column to several steps of 128 and not a multiple of
    64 (k_out pads it), rank 0 to 64, int4 and fp8 activations, bf16 and fp16."""
    _check(_case(b, s, c, r, dtype, seed=b * s + c), act_fmt)


def test_refuses_what_it_cannot_take():
    """Bad shapes, dtypes, ranks and formats: a ValueError naming the problem."""
    x, scale, shift, eps, smooth, down, act, k_out = _case(1, 3, 64, 8)
    ok = (x, scale, shift, eps, smooth, down, act, k_out, "int4")
    for i, bad, words in [
        (8, "nvfp4", "int4 or fp8"),
        (4, smooth[:32], "smooth must be"),
        (5, down[:, :32], "lowrank_down"),
        (7, 128, "padded K"),
        (5, torch.zeros(96, 64, dtype=down.dtype, device=DEVICE), "rank of at most 64"),
        (0, x[0], "x must be"),
        (1, scale.float(), "scale must be"),
    ]:
        args = list(ok)
        args[i] = bad
        with pytest.raises(ValueError, match=words):
            norm_modulate_quantize(*args)
    xq, lora = norm_modulate_quantize(x[:, :0], *ok[1:])  # no tokens: empty outputs
    assert xq.shape == (0, 64) and lora.shape == (0, 8)


def _layer(c, sizes, r, dtype=torch.bfloat16):
    """A fused-projection-like layer (N = sum(sizes)) quantized on the norm's output."""
    x, scale, shift, eps, *_ = _case(2, 9, c, r, dtype)
    lin = torch.nn.Linear(c, sum(sizes)).to(DEVICE, dtype)
    n = layer_norm_modulate(x, scale, shift, eps)
    layer = svdquant.quantize_linear(lin, n.reshape(-1, c), rank=r, alpha=0.5)
    layer.backend = "triton"
    return layer, (x, scale, shift, eps), n


@pytest.mark.parametrize(
    ("c", "sizes", "r"),
    [(200, [64, 64, 72], 8), (128, [256, 256, 256], 16), (96, [96, 96, 96], 32)],
)
def test_layer_from_the_norm_equals_the_norm_then_the_layer(c, sizes, r):
    """``kernels.svdq_norm_linear_triton``: the layer's split output (by the GEMM where the
    parts meet at its tiles, else views or copies) as if the norm had written its input;
    refused where ``norm_feeds_layer`` says no; one node under ``torch.compile``."""
    layer, (x, scale, shift, eps), n = _layer(c, sizes, r)
    want = layer.forward_split(n, sizes)
    assert kernels.norm_feeds_layer(layer, x, scale, shift)
    for contiguous in (True, False):
        got = kernels.svdq_norm_linear_triton(layer, x, scale, shift, eps, sizes, contiguous)
        for a, w in zip(got, want, strict=True):
            assert a.shape == w.shape
            assert (a - w).abs().max().item() <= 1e-2 * w.abs().max().item() + 1e-3
            assert a.is_contiguous() or not contiguous
    assert not kernels.norm_feeds_layer(layer, x.float(), scale, shift)
    with pytest.raises(ValueError, match="norm_feeds_layer"):
        kernels.svdq_norm_linear_triton(layer, x[..., :-1], scale, shift, eps, sizes)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(
        lambda *a: [t * 2 for t in kernels.svdq_norm_linear_triton(layer, *a, sizes)],
        fullgraph=True,
        backend=backend,
    )
    for a, w in zip(compiled(x, scale, shift, eps), want, strict=True):
        assert (a - 2 * w).abs().max().item() <= 2e-2 * w.abs().max().item() + 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize(("s", "c"), [(4096, 1152), (1024, 2240), (4096, 3072), (512, 3072)])
@pytest.mark.parametrize("act_fmt", ["int4", "fp8"])
def test_gpu_model_sizes(s, c, act_fmt):
    """PixArt-Σ's and SANA's streams at 1024², FLUX's image and text streams: codes as the
    norm kernel and the quantize give them but for rare one-step flips (the GPU's fp32
    sums in another order), at batch 2."""
    _check(_case(2, s, c, 32, seed=s + c), act_fmt, own_frac=1e-3)
