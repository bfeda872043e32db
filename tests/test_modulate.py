"""The adaptive-norm and gated-residual kernels (``kernels/modulate.py``) against their
references.

Without CUDA the kernel runs in triton's interpreter on small shapes; tests marked ``gpu``
run FLUX's sizes on the device. The mean and variance are summed in another order than
PyTorch's, so a rare value may sit one unit in the last place away.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from svdquant import kernels  # noqa: E402
from svdquant.kernels import reference as ref  # noqa: E402
from svdquant.kernels.modulate import (  # noqa: E402
    gate_residual,
    gate_residual_modulate,
    layer_norm_modulate,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(b, s, c, chunks=6, dtype=torch.bfloat16, seed=0):
    """(x, scale, shift, eps) as FLUX's blocks have them: scale and shift are chunks of
    one [B, chunks · C] embedding (rows ``chunks · C`` apart)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, s, c, generator=g) * 3 + 0.5).to(DEVICE, dtype)
    emb = torch.randn(b, chunks * c, generator=g).to(DEVICE, dtype)
    return x, emb[:, c : 2 * c], emb[:, :c], 1e-6


def _close(a: torch.Tensor, r: torch.Tensor) -> bool:
    """Equal up to the norm's last bit carried through the product and the sum."""
    ulp = 2.0**-8 if a.dtype == torch.bfloat16 else 2.0**-11
    af, rf = a.float(), r.float()
    row_max = rf.abs().amax(-1, keepdim=True)
    rel = ((af - rf).norm() / rf.norm()).item()
    near = (af - rf).abs() <= 4 * ulp * row_max + 1e-6
    return bool(near.all()) and rel <= 8 * ulp and (af != rf).float().mean().item() <= 0.05


@pytest.mark.parametrize(
    ("b", "s", "c"), [(1, 1, 3), (2, 5, 64), (1, 7, 3072), (3, 3, 100), (2, 33, 257)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference(b, s, c, dtype):
    args = _case(b, s, c, dtype=dtype)
    got, want = layer_norm_modulate(*args), ref.layer_norm_modulate_ref(*args)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    assert _close(got, want)


def test_rows_of_a_slice_are_read_in_place():
    """A slice along the sequence of a wider stream (the image tokens after the text
    tokens) is read where it lies for one image and copied first for several."""
    for b in (1, 2):
        x, scale, shift, eps = _case(b, 9, 64)
        part = x[:, 4:]
        assert _close(layer_norm_modulate(part, scale, shift, eps),
                      ref.layer_norm_modulate_ref(part, scale, shift, eps))  # fmt: skip
        r, gate, y = _gate_case(b, 9, 64)
        assert torch.equal(gate_residual(r[:, 4:], gate, y[:, 2:7]),
                           ref.gate_residual_ref(r[:, 4:], gate, y[:, 2:7]))  # fmt: skip


def test_reference_is_what_diffusers_computes():
    """The reference is ``AdaLayerNormZeroSingle``'s arithmetic (norm, 1 + scale, product,
    sum), here on its own module."""
    from diffusers.models.normalization import AdaLayerNormZeroSingle

    torch.manual_seed(0)
    ada = AdaLayerNormZeroSingle(64).to(DEVICE, torch.bfloat16)
    x = torch.randn(2, 5, 64, device=DEVICE, dtype=torch.bfloat16)
    temb = torch.randn(2, 64, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        want, _ = ada(x, emb=temb)
        shift, scale, _ = ada.linear(ada.silu(temb)).chunk(3, dim=1)
    assert torch.equal(ref.layer_norm_modulate_ref(x, scale, shift, ada.norm.eps), want)


def test_refuses_bad_input():
    x, scale, shift, eps = _case(2, 3, 16)
    with pytest.raises(ValueError, match=r"\[B, S, C\]"):
        layer_norm_modulate(x[0], scale, shift, eps)
    with pytest.raises(ValueError, match="scale must be"):
        layer_norm_modulate(x, scale[:1], shift, eps)
    with pytest.raises(ValueError, match="shift must be"):
        layer_norm_modulate(x, scale, shift.float(), eps)
    with pytest.raises(ValueError, match="16-bit"):
        layer_norm_modulate(x.float(), scale.float(), shift.float(), eps)


def test_op_falls_back_to_the_reference():
    """``kernels.layer_norm_modulate``: fp32 (which the kernel does not take) or the
    reference backend computes the reference."""
    x, scale, shift, eps = _case(2, 3, 16)
    f32 = (x.float(), scale.float(), shift.float(), eps)
    assert torch.equal(kernels.layer_norm_modulate(*f32), ref.layer_norm_modulate_ref(*f32))
    got = kernels.layer_norm_modulate(x, scale, shift, eps, backend="reference")
    assert torch.equal(got, ref.layer_norm_modulate_ref(x, scale, shift, eps))


def test_compiles_fullgraph():
    args = _case(2, 5, 64)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(lambda *a: kernels.layer_norm_modulate(*a) * 2, fullgraph=True,
                             backend=backend)  # fmt: skip
    assert torch.equal(compiled(*args), layer_norm_modulate(*args) * 2)


def _gate_case(b, s, c, dtype=torch.bfloat16, seed=0):
    """(residual, gate, x): the gate a chunk of a [B, 6 · C] embedding."""
    g = torch.Generator().manual_seed(seed)
    r = (torch.randn(b, s, c, generator=g) * 4).to(DEVICE, dtype)
    x = torch.randn(b, s, c, generator=g).to(DEVICE, dtype)
    emb = torch.randn(b, 6 * c, generator=g).to(DEVICE, dtype)
    return r, emb[:, 2 * c : 3 * c], x


@pytest.mark.parametrize(("b", "s", "c"), [(1, 1, 3), (2, 5, 64), (1, 7, 3072), (3, 3, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clip", [False, True])
def test_gate_residual_matches_reference(b, s, c, dtype, clip):
    """The product rounded before the sum, as PyTorch's two ops: equal value for value."""
    args = _gate_case(b, s, c, dtype)
    got = gate_residual(*args, clip_fp16=clip)
    assert got.is_contiguous() and torch.equal(got, ref.gate_residual_ref(*args, clip))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the unclipped call
def test_gate_residual_clips_an_fp16_stream():
    """diffusers clips an fp16 residual stream to ±65504 (an overflow would be inf): so
    does the kernel where asked, and only then."""
    r, gate, x = _gate_case(1, 2, 8, torch.float16)
    r[0, 0, :4] = torch.tensor([65000.0, -65000.0, 60000.0, 1.0], dtype=torch.float16)
    x[0, 0, :4], gate[0, :4] = 6000.0, 1.0
    clipped = gate_residual(r, gate, x, clip_fp16=True)
    assert clipped[0, 0, 0].item() == 65504 and clipped[0, 0, 2].item() == 65504
    assert torch.equal(clipped, ref.gate_residual_ref(r, gate, x, True))
    assert gate_residual(r, gate, x)[0, 0, 0].isinf()


def test_gate_residual_refuses_bad_input():
    r, gate, x = _gate_case(2, 3, 16)
    with pytest.raises(ValueError, match="x must be"):
        gate_residual(r, gate, x[:, :2])
    with pytest.raises(ValueError, match="gate must be"):
        gate_residual(r, gate[:1], x)
    with pytest.raises(ValueError, match="one 16-bit dtype"):
        gate_residual(r, gate.float(), x)
    f32 = (r.float(), gate.float(), x.float())
    assert torch.equal(kernels.gate_residual(*f32), ref.gate_residual_ref(*f32))


def test_gate_residual_compiles_fullgraph():
    args = _gate_case(2, 5, 64)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(lambda *a: kernels.gate_residual(*a) + 1, fullgraph=True,
                             backend=backend)  # fmt: skip
    assert torch.equal(compiled(*args), gate_residual(*args) + 1)


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "s"), [(1, 4096), (1, 4608), (4, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gate_residual_flux_sizes(b, s, dtype):
    args = _gate_case(b, s, 3072, dtype, seed=s)
    assert torch.equal(gate_residual(*args), ref.gate_residual_ref(*args))


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "s", "chunks"), [(1, 4096, 6), (1, 4608, 3), (4, 512, 6)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_flux_sizes(b, s, chunks, dtype):
    """FLUX.1's adaptive norms at 1024² (double blocks' 4096 image tokens, single blocks'
    4608) and a batch of four text streams, 3072 channels."""
    args = _case(b, s, 3072, chunks=chunks, dtype=dtype, seed=s)
    assert _close(layer_norm_modulate(*args), ref.layer_norm_modulate_ref(*args))


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "s", "c"), [(1, 4096, 1152), (2, 4096, 1152), (1, 1024, 2240),
                                           (2, 1024, 2240)])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_pixart_and_sana_sizes(b, s, c, dtype):
    """PixArt-Σ's (1152 channels, 4096 tokens at 1024²) and SANA 1.6B's (2240, 1024)
    blocks, batch 1 and 2 (v41's fused blocks): the three kernels against the reference,
    the gates bit for bit."""
    args = _case(b, s, c, chunks=6, dtype=dtype, seed=s + c)
    assert _close(layer_norm_modulate(*args), ref.layer_norm_modulate_ref(*args))
    g = _gate_case(b, s, c, dtype, seed=c)
    assert torch.equal(gate_residual(*g), ref.gate_residual_ref(*g))
    f = _fused_case(b, s, c, dtype, seed=s)
    assert _close(gate_residual_modulate(*f)[1], ref.gate_residual_modulate_ref(*f)[1])


@pytest.mark.parametrize("b", [1, 2])
@pytest.mark.parametrize("inference", [False, True])
def test_single_blocks_rejoin_their_halves_without_a_copy(monkeypatch, b, inference):
    """Each FLUX single block gets the previous one's output split into text and image
    tokens: with ``modulate.ENABLED`` the two halves are joined back as a view of that
    output (no copy), in inference mode too; anything else is concatenated."""
    from svdquant import fuse
    from svdquant.kernels import modulate

    monkeypatch.setattr(modulate, "ENABLED", True)
    with torch.inference_mode() if inference else torch.no_grad():
        t = torch.randn(b, 9, 4)
        joined = fuse._joined(t[:, :3], t[:, 3:])
        assert joined.data_ptr() == t.data_ptr() and torch.equal(joined, t)
        other = torch.randn(b, 9, 4)
        for first, second in ((t[:, :3], t[:, 4:]), (t[:, 3:], t[:, :3]), (t[:, :3], other[:, 3:])):
            got = fuse._joined(first, second)
            assert got.data_ptr() != t.data_ptr()
            assert torch.equal(got, torch.cat([first, second], dim=1))
        monkeypatch.setattr(modulate, "ENABLED", False)
        assert fuse._joined(t[:, :3], t[:, 3:]).data_ptr() != t.data_ptr()


def _fused_case(b, s, c, dtype=torch.bfloat16, seed=0):
    """(residual, gate, x, scale, shift, eps): a double block's attention output joining
    its stream, then the feed-forward's norm (all chunks of one [B, 6 · C] embedding)."""
    r, gate, x = _gate_case(b, s, c, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    emb = torch.randn(b, 6 * c, generator=g).to(DEVICE, dtype)
    return r, gate, x, emb[:, 4 * c : 5 * c], emb[:, 3 * c : 4 * c], 1e-6


@pytest.mark.parametrize(
    ("b", "s", "c"), [(1, 1, 3), (2, 5, 64), (1, 7, 3072), (3, 3, 100), (2, 33, 257)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_residual_modulate_is_the_two_kernels(b, s, c, dtype):
    """One pass, the same numbers as ``gate_residual`` then ``layer_norm_modulate``, bit for
    bit; the sum equal to diffusers' value for value, the norm up to its last bit."""
    r, gate, x, scale, shift, eps = args = _fused_case(b, s, c, dtype)
    h, n = gate_residual_modulate(*args)
    assert h.is_contiguous() and n.is_contiguous() and h.dtype == n.dtype == dtype
    h2 = gate_residual(r, gate, x)
    assert torch.equal(h, h2) and torch.equal(n, layer_norm_modulate(h2, scale, shift, eps))
    want_h, want_n = ref.gate_residual_modulate_ref(*args)
    assert torch.equal(h, want_h) and _close(n, want_n)


def test_gate_residual_modulate_reads_slices_and_clips():
    """Rows of wider tensors are read where they lie (or copied first for several images);
    ``clip_fp16`` clips the sum of an fp16 stream before its norm."""
    for b in (1, 2):
        r, gate, x, scale, shift, eps = _fused_case(b, 9, 64)
        got = gate_residual_modulate(r[:, 4:], gate, x[:, 2:7], scale, shift, eps)
        want = ref.gate_residual_modulate_ref(r[:, 4:], gate, x[:, 2:7], scale, shift, eps)
        assert torch.equal(got[0], want[0]) and _close(got[1], want[1])
    r, gate, x, scale, shift, eps = _fused_case(1, 2, 8, torch.float16)
    r[0, 0, :2] = torch.tensor([65000.0, -65000.0], dtype=torch.float16)
    x[0, 0, :2], gate[0, :2] = 6000.0, 1.0
    h, n = gate_residual_modulate(r, gate, x, scale, shift, eps, clip_fp16=True)
    assert h[0, 0, 0].item() == 65504 and n.isfinite().all()
    assert torch.equal(n, layer_norm_modulate(h, scale, shift, eps))


def test_gate_residual_modulate_refuses_bad_input():
    r, gate, x, scale, shift, eps = _fused_case(2, 3, 16)
    with pytest.raises(ValueError, match="x must be"):
        gate_residual_modulate(r, gate, x[:, :2], scale, shift, eps)
    with pytest.raises(ValueError, match="gate must be"):
        gate_residual_modulate(r, gate[:1], x, scale, shift, eps)
    with pytest.raises(ValueError, match="scale must be"):
        gate_residual_modulate(r, gate, x, scale[:1], shift, eps)
    with pytest.raises(ValueError, match="shift must be"):
        gate_residual_modulate(r, gate, x, scale, shift.float(), eps)
    with pytest.raises(ValueError, match="one 16-bit dtype"):
        gate_residual_modulate(r.float(), gate.float(), x.float(), scale, shift, eps)


def test_gate_residual_modulate_op_falls_back_and_compiles():
    """``kernels.gate_residual_modulate``: fp32 or the reference backend computes the
    reference; ``torch.compile(fullgraph=True)`` traces the op as one node."""
    args = _fused_case(2, 3, 16)
    f32 = tuple(a.float() if torch.is_tensor(a) else a for a in args)
    for got, want in zip(kernels.gate_residual_modulate(*f32),
                         ref.gate_residual_modulate_ref(*f32), strict=True):  # fmt: skip
        assert torch.equal(got, want)
    for got, want in zip(kernels.gate_residual_modulate(*args, backend="reference"),
                         ref.gate_residual_modulate_ref(*args), strict=True):  # fmt: skip
        assert torch.equal(got, want)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(lambda *a: [t * 2 for t in kernels.gate_residual_modulate(*a)],
                             fullgraph=True, backend=backend)  # fmt: skip
    for got, want in zip(compiled(*args), gate_residual_modulate(*args), strict=True):
        assert torch.equal(got, want * 2)


@pytest.mark.gpu
@pytest.mark.parametrize(("b", "s"), [(1, 4096), (1, 512), (4, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gate_residual_modulate_flux_sizes(b, s, dtype):
    """A double block's image stream (4096 tokens) and text streams at 1024², 3072
    channels: the two kernels' numbers bit for bit."""
    r, gate, x, scale, shift, eps = args = _fused_case(b, s, 3072, dtype, seed=s)
    h, n = gate_residual_modulate(*args)
    h2 = gate_residual(r, gate, x)
    assert torch.equal(h, h2) and torch.equal(n, layer_norm_modulate(h2, scale, shift, eps))
    assert _close(n, ref.gate_residual_modulate_ref(*args)[1])
