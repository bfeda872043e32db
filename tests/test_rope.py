"""The q/k norm + rotary kernel (``kernels/rope.py``) against its reference and diffusers.

Without CUDA the kernel runs in triton's interpreter on small shapes; tests marked ``gpu``
run FLUX's sizes on the device. The norm's sum of squares is reduced in another order
than PyTorch's, so a rare output may sit one unit in the last place away.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from svdquant import kernels  # noqa: E402
from svdquant.kernels import reference as ref  # noqa: E402
from svdquant.kernels.rope import rms_norm_rope  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(b, s_head, s, h, d, dtype=torch.bfloat16, affine=True, strided=False, seed=0):
    """(x, weight, eps, cos, sin, head, head_weight) shaped like FLUX's q: ``strided``
    takes x as a view of a wider projection output (q of a fused q/k/v)."""
    g = torch.Generator().manual_seed(seed)
    width = 3 * h * d if strided else h * d
    x = (torch.randn(b, s, width, generator=g) * 3)[..., : h * d].unflatten(-1, (h, d))
    head = torch.randn(b, s_head, h, d, generator=g) if s_head else None
    w = torch.rand(d, generator=g) + 0.5 if affine else None
    wh = torch.rand(d, generator=g) + 0.5 if affine and s_head else None
    angle = torch.rand(s_head + s, d // 2, generator=g) * 6
    cos, sin = angle.cos().repeat_interleave(2, 1), angle.sin().repeat_interleave(2, 1)

    def dev(t, dt=dtype):
        return None if t is None else t.to(DEVICE, dt)

    trig = (dev(cos, torch.float32), dev(sin, torch.float32))
    return dev(x), dev(w), 1e-6, *trig, dev(head), dev(wh)


def _within_one_ulp(a: torch.Tensor, r: torch.Tensor) -> bool:
    """Equal up to the norm's last bit: its sum of squares is reduced in another order
    (and its reciprocal square root approximated on the GPU), so a normalized value may
    sit one unit in the last place away, which the rotation carries into both values of
    its pair — at most ~2 units of the row's largest value, rarely."""
    ulp = 2.0**-8 if a.dtype == torch.bfloat16 else 2.0**-11
    af, rf = a.float(), r.float()
    row_max = rf.abs().amax(-1, keepdim=True)
    near = (af - rf).abs() <= 4 * ulp * row_max + 1e-6
    rel = ((af - rf).norm() / rf.norm()).item()
    return bool(near.all()) and rel <= 8 * ulp and (af != rf).float().mean().item() <= 0.05


SHAPES = [
    (1, 0, 1, 1, 2),  # one token, one head, the smallest pair
    (1, 0, 5, 3, 64),
    (2, 3, 7, 2, 128),  # text heads first, batch 2
    (1, 5, 1, 1, 16),  # one image token after five text tokens
    (1, 0, 33, 4, 128),  # rows not a multiple of the program's 64
    (3, 17, 9, 5, 32),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("affine", "strided"), [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_reference(monkeypatch, shape, dtype, affine, strided, packed):
    """Both kernels (``rope.PACKED``: pairs packed in words, or split and joined rows)."""
    from svdquant.kernels import rope

    monkeypatch.setattr(rope, "PACKED", packed)
    args = _case(*shape, dtype=dtype, affine=affine, strided=strided)
    got, want = rms_norm_rope(*args), ref.rms_norm_rope_ref(*args)
    assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
    assert _within_one_ulp(got, want)


@torch.no_grad()
def test_reference_is_what_diffusers_computes():
    """The reference equals diffusers' own passes: ``torch.nn.RMSNorm`` per head, the text
    heads concatenated first, ``apply_rotary_emb`` (FLUX's interleaved pairs)."""
    from diffusers.models.embeddings import apply_rotary_emb

    x, w, eps, cos, sin, head, wh = _case(2, 3, 7, 2, 128)
    norm, norm_head = torch.nn.RMSNorm(128, eps=eps), torch.nn.RMSNorm(128, eps=eps)
    norm.to(DEVICE, x.dtype).weight.copy_(w)
    norm_head.to(DEVICE, x.dtype).weight.copy_(wh)
    y = torch.cat([norm_head(head), norm(x)], dim=1)
    want = apply_rotary_emb(y, (cos, sin), sequence_dim=1)
    assert torch.equal(ref.rms_norm_rope_ref(x, w, eps, cos, sin, head, wh), want)


def test_packed_kernel_leaves_odd_offsets_to_the_split_kernel(monkeypatch):
    """A view that does not start on a whole word (an odd element offset) cannot be read
    as int32 pairs: ``PACKED`` falls back to the split kernel, same values; the packed
    kernel gives the same values as the split one where it runs."""
    from svdquant.kernels import rope

    x, w, eps, cos, sin, head, wh = _case(1, 2, 5, 2, 16)
    want = ref.rms_norm_rope_ref(x, w, eps, cos, sin, head, wh)
    wide = torch.zeros(1, 5, 2 * 16 + 1, dtype=x.dtype, device=DEVICE)
    wide[..., 1:] = x.flatten(2)
    odd = wide[..., 1:].unflatten(-1, (2, 16))  # offset 1 element: not an int32 view
    monkeypatch.setattr(rope, "PACKED", True)
    launched = []
    real = rope._launch_packed

    def counted(*a):
        launched.append(real(*a))
        return launched[-1]

    monkeypatch.setattr(rope, "_launch_packed", counted)
    assert _within_one_ulp(rms_norm_rope(odd, w, eps, cos, sin, head, wh), want)
    assert launched == [False]
    assert _within_one_ulp(rms_norm_rope(x, w, eps, cos, sin, head, wh), want)
    assert launched == [False, True]


def test_refuses_bad_input():
    x, w, eps, cos, sin, head, wh = _case(1, 2, 3, 2, 16)
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        rms_norm_rope(x[0], w, eps, cos, sin)
    with pytest.raises(ValueError, match="does not match"):
        rms_norm_rope(x, w, eps, cos, sin, head[:, :, :1], wh)
    with pytest.raises(ValueError, match="both or neither"):
        rms_norm_rope(x, w, eps, cos, sin, head, None)
    with pytest.raises(ValueError, match="cos/sin"):
        rms_norm_rope(x, w, eps, cos[:3], sin[:3], head, wh)
    with pytest.raises(ValueError, match="power-of-two"):
        rms_norm_rope(x[..., :12], w[:12], eps, cos[:, :12], sin[:, :12], head[..., :12], wh[:12])
    with pytest.raises(ValueError, match="16-bit"):
        rms_norm_rope(x.float(), w, eps, cos, sin, head.float(), wh)


def test_op_falls_back_to_the_reference_where_the_kernel_does_not_fit():
    """``kernels.rms_norm_rope`` (what the fused FLUX processor calls): a head dim the
    kernel does not take, or the reference backend, computes the reference."""
    x, w, eps, cos, sin, head, wh = _case(1, 2, 3, 2, 16)
    cut = (x[..., :12], w[:12], eps, cos[:, :12], sin[:, :12], head[..., :12], wh[:12])
    assert torch.equal(kernels.rms_norm_rope(*cut), ref.rms_norm_rope_ref(*cut))
    args = (x, w, eps, cos, sin, head, wh)
    got = kernels.rms_norm_rope(*args, backend="reference")
    assert torch.equal(got, ref.rms_norm_rope_ref(*args))


def test_compiles_fullgraph():
    """The custom op under ``torch.compile(fullgraph=True)``: one opaque node, the eager
    output."""
    args = _case(2, 3, 7, 2, 64)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(lambda *a: kernels.rms_norm_rope(*a) * 2, fullgraph=True,
                             backend=backend)  # fmt: skip
    assert torch.equal(compiled(*args), rms_norm_rope(*args) * 2)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("s_head", "s", "strided"), [(512, 4096, False), (0, 4608, True), (512, 1024, False)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_flux_sizes(monkeypatch, s_head, s, strided, dtype, packed):
    """FLUX.1's q/k at 1024² (double blocks: 512 text + 4096 image tokens; single blocks:
    4608 tokens, q a view of the fused projection's output) and at 512², 24 heads of 128,
    both kernels."""
    from svdquant.kernels import rope

    monkeypatch.setattr(rope, "PACKED", packed)
    args = _case(1, s_head, s, 24, 128, dtype=dtype, strided=strided, seed=s)
    assert _within_one_ulp(rms_norm_rope(*args), ref.rms_norm_rope_ref(*args))
