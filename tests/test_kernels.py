"""The Triton engine's kernels against their torch references (``kernels/reference.py``).

Without CUDA the kernels run in triton's CPU interpreter (``TRITON_INTERPRET=1``, set
here before any kernel module is imported), on small shapes. Tests marked ``gpu`` sweep
larger shapes on the device: ``pytest -m gpu tests/test_kernels*.py``.

Tolerances: the kernels emulate the references' fp8 containers exactly (the quantize and
widen outputs are compared bit for bit); outputs differ only by the order of fp32 sums,
so they are held to a relative error of 4e-3 (bf16 output rounding).
"""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
tl = triton.language

import svdquant  # noqa: E402
from svdquant import formats  # noqa: E402
from svdquant.kernels import reference as ref  # noqa: E402
from svdquant.kernels._triton_common import (  # noqa: E402
    interpreting,
    round_bf16,
    round_e4m3,
)
from svdquant.kernels.gemm import (  # noqa: E402
    fp8_gemm,
    fp8_gemm_quantize_next,
    fp8_gemm_split,
    split_supported,
)
from svdquant.kernels.gemm_ws import CANDIDATE_TILES, tile_name  # noqa: E402
from svdquant.kernels.gemv import _dp4a, w4a16_linear  # noqa: E402
from svdquant.kernels.quantize import quantize_act  # noqa: E402
from svdquant.kernels.widen import dequantize_weight, widen_weight  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 4e-3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal fp8 tensors, value for value (a value that rounds to ±0 may keep either sign)."""
    return a.dtype == b.dtype and torch.equal(a.float(), b.float())


def fp8_close(a: torch.Tensor, b: torch.Tensor, max_frac: float = 1e-3) -> bool:
    """fp8 tensors equal but for rare flips by one E4M3 step. On the GPU the kernel's
    per-channel scale may differ from torch's in its last bit (rtol 1e-6) and multiplies
    may be fused, so a value that sits on a rounding tie can land on either neighbour."""
    af, bf = a.float(), b.float()
    diff = af != bf
    if a.dtype != b.dtype:
        return False
    if not diff.any():
        return True
    one_step = (af - bf).abs() <= 0.125 * torch.maximum(af.abs(), bf.abs()) + 2.0**-9
    return diff.float().mean().item() <= max_frac and bool(one_step.all())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _acts(m: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Activations with a few outlier channels, like a diffusion model's."""
    x = torch.randn(m, k, generator=_gen(seed))
    x[:, : max(1, k // 50)] *= 15
    return x.to(DEVICE, dtype)


def _weight(n: int, k: int, fmt: str, seed: int = 1) -> formats.QuantizedTensor:
    w = torch.randn(n, k, generator=_gen(seed)) * 0.05
    return formats.quantize(w.to(DEVICE), fmt)


def _lowrank(n: int, k: int, r: int, dtype: torch.dtype, seed: int = 2):
    g = _gen(seed)
    down = (torch.randn(r, k, generator=g) / k**0.5).to(DEVICE, dtype)
    up = (torch.randn(n, r, generator=g) * 0.1).to(DEVICE, dtype)
    return down, up


def _smooth(k: int, seed: int = 3) -> torch.Tensor:
    return (torch.rand(k, generator=_gen(seed)) * 2 + 0.25).to(DEVICE)


# --- the rounding helpers -------------------------------------------------------------


@triton.jit
def _round_kernel(x_ptr, e4m3_ptr, bf16_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(e4m3_ptr + offs, round_e4m3(x).to(tl.float8e4nv), mask=mask)
    tl.store(bf16_ptr + offs, round_bf16(x).to(tl.bfloat16), mask=mask)


def test_rounding_helpers_match_torch():
    """round_e4m3 / round_bf16 are torch's casts: ties to even, E4M3 subnormals, ±448."""
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[e4m3.isfinite()]
    mids = (e4m3.sort().values[1:] + e4m3.sort().values[:-1]) / 2  # every tie
    x = torch.cat(
        [
            e4m3,
            mids,
            torch.randn(4000, generator=_gen(0)) * 100,
            torch.randn(2000, generator=_gen(1)) * 0.01,
            torch.tensor([500.0, -1e6, 448.0, 464.0, 0.0, -0.0, 2.0**-10, 3 * 2.0**-10]),
        ]
    ).to(DEVICE)
    e_out = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=DEVICE)
    b_out = torch.empty(x.shape, dtype=torch.bfloat16, device=DEVICE)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, e_out, b_out, x.numel(), BLOCK=1024)
    assert torch.equal(e_out.float(), ref.round_e4m3(x).float())
    assert torch.equal(b_out, x.to(torch.bfloat16))


# --- quantize -------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 257])
@pytest.mark.parametrize("act_fmt", ["int4", "fp8"])
@pytest.mark.parametrize(("k", "k_out", "r"), [(100, 128, 7), (200, 208, 0), (320, 320, 32)])
def test_quantize_act_matches_reference(m, act_fmt, k, k_out, r):
    dtype = torch.bfloat16 if m != 3 else torch.float16
    x = _acts(m, k, dtype)
    s = _smooth(k)
    down, _ = _lowrank(8, k, r, dtype)
    act_scale = ref.act_scale_from_amax((x.float() / s).abs().amax() * 0.8)  # some saturate
    xq, lora = quantize_act(x, s, down, act_scale, k_out, act_fmt)
    xq_ref, lora_ref = ref.quantize_act_ref(x, s, down, act_scale, k_out, act_fmt)
    assert xq.shape == (m, k_out) and lora.shape == (m, r)
    assert same_values(xq, xq_ref)
    if r:
        assert rel_err(lora, lora_ref) < 1e-5


@pytest.mark.parametrize(("m", "r"), [(1, 48), (70, 80), (257, 96), (5, 192), (3, 33), (66, 40)])
@pytest.mark.parametrize("tail", [False, True])
def test_quantize_act_split_rank_matches_reference(monkeypatch, m, r, tail):
    """A rank that is no power of two as two low-rank parts (``quantize.SPLIT_RANK``): the
    reference's codes and sums, with and without a tail, K split or not."""
    from svdquant.kernels import quantize as qmod

    monkeypatch.setattr(qmod, "SPLIT_RANK", True)
    assert qmod.rank_parts(r)[1] > 0  # the two-part kernel runs
    k1, k2 = 192, (128 if tail else 0)
    x = _acts(m, k1, torch.bfloat16, seed=5)
    t = _acts(m, k2, torch.bfloat16, seed=6) if tail else None
    s = _smooth(k1 + k2)
    down, _ = _lowrank(8, k1 + k2, r, torch.bfloat16)
    h = x if t is None else torch.cat([x, ref.activation_ref(t, "gelu_tanh").to(x.dtype)], -1)
    act_scale = ref.act_scale_from_amax((h.float() / s).abs().amax())
    kw = {"tail": t, "tail_act": "gelu_tanh"} if tail else {}
    xq, lora = quantize_act(x, s, down, act_scale, k1 + k2, "int4", **kw)
    xq_ref, lora_ref = ref.quantize_act_ref(h, s, down, act_scale, k1 + k2, "int4")
    assert lora.shape == (m, r)
    assert fp8_close(xq, xq_ref, max_frac=0 if DEVICE == "cpu" else 5e-3)
    assert rel_err(lora, lora_ref) < 1e-4


@pytest.mark.parametrize(("m", "r", "kind"), [
    (70, 160, "plain"), (130, 112, "tail"), (65, 256, "gated"), (200, 192, "plain"),
    (66, 129, "tail"), (70, 544, "plain"),
])  # fmt: skip
def test_quantize_act_rank_slices_match_reference(monkeypatch, m, r, kind):
    """``quantize.RANK_SLICES``: a rank over 128 (or 112 / 128 at 32 rows) as slices of 64
    columns, a program each at 64 rows — the reference's codes (written by the first
    slice only) and sums, plain, with a tail and gated, K split or not."""
    from svdquant.kernels import quantize as qmod

    monkeypatch.setattr(qmod, "RANK_SLICES", True)
    monkeypatch.setattr(qmod, "WIDE_BY_MM", False)  # (the slices, not the GEMM, plain too)
    k1, k2 = 192, (128 if kind == "tail" else 0)
    assert qmod.rank_slices(r, m, 64) == -(-r // 64)
    x = _acts(m, k1, torch.bfloat16, seed=5)
    t = _acts(m, k1 if kind == "gated" else k2, torch.bfloat16, seed=6) if kind != "plain" else None
    s = _smooth(k1 + k2)
    down, _ = _lowrank(8, k1 + k2, r, torch.bfloat16)
    if kind == "gated":
        h = (x.float() * ref.activation_ref(t, "gelu").to(x.dtype).float()).to(x.dtype)
        kw = {"tail": t, "tail_act": "gelu", "gated": True}
    elif kind == "tail":
        h = torch.cat([x, ref.activation_ref(t, "gelu_tanh").to(x.dtype)], -1)
        kw = {"tail": t, "tail_act": "gelu_tanh"}
    else:
        h, kw = x, {}
    act_scale = ref.act_scale_from_amax((h.float() / s).abs().amax())
    xq, lora = quantize_act(x, s, down, act_scale, k1 + k2, "int4", **kw)
    xq_ref, lora_ref = ref.quantize_act_ref(h, s, down, act_scale, k1 + k2, "int4")
    assert lora.shape == (m, r)
    assert fp8_close(xq, xq_ref, max_frac=0 if DEVICE == "cpu" else 5e-3)
    assert rel_err(lora, lora_ref) < 1e-4
    monkeypatch.setattr(qmod, "RANK_SLICES", False)  # (the one-program kernel: the same)
    xq1, lora1 = quantize_act(x, s, down, act_scale, k1 + k2, "int4", **kw)
    assert torch.equal(xq.view(torch.uint8), xq1.view(torch.uint8))
    assert rel_err(lora, lora1) < 1e-5


@pytest.mark.parametrize(("m", "r"), [(70, 160), (130, 544), (66, 129)])
@pytest.mark.parametrize("folded", [False, True])
def test_quantize_wide_rank_by_mm_matches_reference(monkeypatch, m, r, folded):
    """``quantize.WIDE_BY_MM``: a rank the quantize would slice, on a plain input, as its
    first slice in the kernel and the rest by one GEMM — the slices' codes bit for bit and
    the reference's sums, into given buffers too (the widen-first overlap's); a tail (a
    gate is one too) or a trigger keep the slices."""
    from svdquant.kernels import quantize as qmod

    gemms = _count_calls(monkeypatch, qmod, "lowrank_mm")
    k = 192
    x, s = _acts(m, k, torch.bfloat16, seed=5), _smooth(k)
    down, _ = _lowrank(8, k, r, torch.bfloat16)
    act_scale = ref.act_scale_from_amax((x.float() / s).abs().amax())
    ld = qmod.fold_lowrank_down(down, s) if folded else down
    assert qmod.rank_slices(r, m, 64) > 1
    monkeypatch.setattr(qmod, "WIDE_BY_MM", False)
    sliced = quantize_act(x, s, ld, act_scale, k, "int4", folded=folded)
    assert not gemms
    monkeypatch.setattr(qmod, "WIDE_BY_MM", True)
    xq, lora = quantize_act(x, s, ld, act_scale, k, "int4", folded=folded)
    assert len(gemms) == 1
    xq_ref, lora_ref = ref.quantize_act_ref(x, s, down, act_scale, k, "int4")
    assert torch.equal(xq.view(torch.uint8), sliced[0].view(torch.uint8))
    assert fp8_close(xq, xq_ref, max_frac=0 if DEVICE == "cpu" else 5e-3)
    assert lora.shape == (m, r) and rel_err(lora, lora_ref) < 1e-4
    given = (torch.empty_like(xq), torch.zeros_like(lora))
    got = quantize_act(x, s, ld, act_scale, k, "int4", folded=folded, out=given)
    assert got[0] is given[0] and got[1] is given[1] and rel_err(got[1], lora_ref) < 1e-4
    t = _acts(m, 64, torch.bfloat16, seed=6)
    down2, _ = _lowrank(8, k + 64, r, torch.bfloat16)
    monkeypatch.setattr(qmod, "WIDE_TAIL_BY_MM", False)  # (a tail has its own switch)
    quantize_act(x, _smooth(k + 64), down2, act_scale, k + 64, "int4", tail=t, tail_act="gelu")
    quantize_act(x, s, ld, act_scale, k, "int4", trigger=True, folded=folded)
    monkeypatch.setattr(qmod, "FP32_OUT_MM", False)  # (torch < 2.8: no fp32-output GEMM)
    quantize_act(x, s, ld, act_scale, k, "int4", folded=folded)
    assert len(gemms) == 2


def _wide_routes_fp16(monkeypatch, m: int, k1: int, k2: int, r: int) -> None:
    """Both wide-rank routes on fp16 inputs (an fp16 model: SDXL's usual dtype) against
    the slices' codes, bit for bit, and the reference's sums; each route taken once."""
    from svdquant.kernels import quantize as qmod

    gemms = _count_calls(monkeypatch, qmod, "lowrank_mm")
    f16 = torch.float16
    x, t = _acts(m, k1, f16, seed=5), _acts(m, k2, f16, seed=6)
    for tail in (None, t):
        k = k1 + (0 if tail is None else k2)
        s = _smooth(k)
        down, _ = _lowrank(8, k, r, f16)
        kw = {} if tail is None else {"tail": tail, "tail_act": "gelu_tanh"}
        h = x if tail is None else torch.cat([x, ref.activation_ref(t, "gelu_tanh").to(f16)], -1)
        act_scale = ref.act_scale_from_amax((h.float() / s).abs().amax())
        monkeypatch.setattr(qmod, "WIDE_BY_MM", False)
        monkeypatch.setattr(qmod, "WIDE_TAIL_BY_MM", False)
        sliced = quantize_act(x, s, down, act_scale, k, "int4", **kw)
        monkeypatch.setattr(qmod, "WIDE_BY_MM", True)
        monkeypatch.setattr(qmod, "WIDE_TAIL_BY_MM", True)
        before = len(gemms)
        xq, lora = quantize_act(x, s, down, act_scale, k, "int4", **kw)
        assert len(gemms) == before + (1 if tail is None else 2)  # (the route, not the slices)
        _, lora_ref = ref.quantize_act_ref(h, s, down, act_scale, k, "int4")
        assert torch.equal(xq.view(torch.uint8), sliced[0].view(torch.uint8))
        assert rel_err(lora, lora_ref) < 1e-4


def test_quantize_wide_ranks_by_mm_take_fp16(monkeypatch):
    """``WIDE_BY_MM`` and ``WIDE_TAIL_BY_MM`` on an fp16 model's inputs (v58)."""
    _wide_routes_fp16(monkeypatch, 70, 192, 128, 160)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [4608, 100])
def test_gpu_quantize_wide_ranks_by_mm_take_fp16(monkeypatch, m):
    """The same at FLUX's ``proj_out`` sizes on the GPU (cuBLAS's fp32-output GEMMs of
    fp16 operands)."""
    _wide_routes_fp16(monkeypatch, m, 3072, 12288, 160)


@pytest.mark.parametrize(("m", "r", "act"), [(70, 160, "gelu_tanh"), (130, 544, "silu")])
def test_quantize_wide_tailed_rank_by_mm_matches_reference(monkeypatch, m, r, act):
    """``quantize.WIDE_TAIL_BY_MM``: a sliced rank on ``cat([x, act(tail)])`` (FLUX's
    ``proj_out``) as the codes alone in the kernel and two GEMMs (x's columns, the
    activated tail's) — the slices' codes bit for bit, the reference's sums; a gate keeps
    the slices."""
    from svdquant.kernels import quantize as qmod

    gemms = _count_calls(monkeypatch, qmod, "lowrank_mm")
    k1, k2 = 192, 128
    x, t = _acts(m, k1, torch.bfloat16, seed=5), _acts(m, k2, torch.bfloat16, seed=6)
    s = _smooth(k1 + k2)
    down, _ = _lowrank(8, k1 + k2, r, torch.bfloat16)
    h = torch.cat([x, ref.activation_ref(t, act).to(x.dtype)], -1)
    act_scale = ref.act_scale_from_amax((h.float() / s).abs().amax())
    kw = {"tail": t, "tail_act": act}
    monkeypatch.setattr(qmod, "WIDE_TAIL_BY_MM", False)
    sliced = quantize_act(x, s, down, act_scale, k1 + k2, "int4", **kw)
    assert not gemms
    monkeypatch.setattr(qmod, "WIDE_TAIL_BY_MM", True)
    xq, lora = quantize_act(x, s, down, act_scale, k1 + k2, "int4", **kw)
    assert len(gemms) == 2
    _, lora_ref = ref.quantize_act_cat_ref(x, t, act, s, down, act_scale, k1 + k2, "int4")
    assert torch.equal(xq.view(torch.uint8), sliced[0].view(torch.uint8))
    assert lora.shape == (m, r) and rel_err(lora, lora_ref) < 1e-4
    s1 = _smooth(k1)
    g = _acts(m, k1, torch.bfloat16, seed=7)
    quantize_act(x, s1, down[:, :k1], act_scale, k1, "int4", tail=g, tail_act=act, gated=True)
    assert len(gemms) == 2


def test_wide_rank_by_mm_folds_once_per_lowrank_down(monkeypatch):
    """``WIDE_BY_MM`` folds an L_down once and keeps it while L_down and the smoothing
    are the same, unchanged tensors: changed in place, replaced, or a view of other rows,
    they fold anew (never a stale fold); a freed L_down drops its fold."""
    import gc

    from svdquant.kernels import quantize as qmod

    monkeypatch.setattr(qmod, "WIDE_BY_MM", True)
    folds = _count_calls(monkeypatch, qmod, "fold_lowrank_down")
    m, k, r = 70, 192, 160
    x, s = _acts(m, k, torch.bfloat16, seed=5), _smooth(k)
    down, _ = _lowrank(8, k, 2 * r, torch.bfloat16)
    act_scale = ref.act_scale_from_amax((x.float() / s).abs().amax())

    def sums(ld, smooth=s):
        want = ref.quantize_act_ref(x, smooth, ld, act_scale, k, "int4")[1]
        got = quantize_act(x, smooth, ld, act_scale, k, "int4")[1]
        assert rel_err(got, want) < 1e-4
        return got

    part = down[:r]
    sums(part), sums(part), sums(down[:r])  # (a new view of the same rows: the same fold)
    assert len(folds) == 1
    sums(down[r:])  # other rows of the same L_down
    assert len(folds) == 2
    part.mul_(0.5)  # in place: its version moves on
    sums(part)
    assert len(folds) == 3
    s2 = s.clone()
    s2[:5] *= 2  # another smoothing
    sums(part, s2)
    assert len(folds) == 4
    n = len(qmod._FOLDS)
    monkeypatch.setattr(qmod, "KEEP_FOLDS", False)  # (memory before speed: every call)
    sums(part, s2), sums(part, s2)
    assert len(folds) == 6 and len(qmod._FOLDS) <= n  # (other tests' folds may die now)
    del part, down
    gc.collect()
    assert len(qmod._FOLDS) <= n - 2


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("sliced", [False, True])
def test_quantize_rank_widths_cover_every_rank(monkeypatch, split, sliced):
    """For every rank up to 512 and either switch: the parts (or slices) cover the rank,
    each part a power of two of at least 16, the second narrower than the first, and a
    program keeps at least 16 rows — whatever the measured rules pick."""
    from svdquant.kernels import quantize as qmod

    monkeypatch.setattr(qmod, "SPLIT_RANK", split)
    monkeypatch.setattr(qmod, "RANK_SLICES", sliced)
    for r in range(513):
        first, second = qmod.rank_parts(r)
        assert first + second >= r and first >= 16 and first & (first - 1) == 0
        assert second == 0 or (second & (second - 1) == 0 and 16 <= second < first)
        slices = qmod.rank_slices(r, 4096, 64)
        assert slices == 1 or (sliced and slices * qmod.RANK_SLICE >= r > qmod.RANK_SLICE)
        width = qmod.RANK_SLICE if slices > 1 else first + second
        assert qmod.rows_per_program(64, width) >= 16


def test_quantize_rank_slices_policy(monkeypatch):
    """Slices only where ``RANK_SLICES`` is on, above the few-row tile, and where the
    ranks' parts would leave a program fewer rows than its tile."""
    from svdquant.kernels import quantize as qmod

    assert qmod.rank_slices(160, 4096, 64) == 3  # (on by default)
    monkeypatch.setattr(qmod, "RANK_SLICES", False)
    assert qmod.rank_slices(160, 4096, 64) == 1
    monkeypatch.setattr(qmod, "RANK_SLICES", True)
    got = {r: qmod.rank_slices(r, 4096, 64) for r in (32, 48, 64, 80, 96, 112, 128, 160, 192, 256)}
    assert got == {32: 1, 48: 1, 64: 1, 80: 1, 96: 1, 112: 2, 128: 2, 160: 3, 192: 3, 256: 4}
    assert qmod.rank_slices(256, 64, 16) == 1  # the few-row tile


@pytest.mark.parametrize(("m", "k", "r", "dtype", "tail"), [
    (1, 100, 7, torch.bfloat16, False), (257, 320, 32, torch.float16, False),
    (70, 192, 80, torch.bfloat16, False), (66, 192, 40, torch.bfloat16, True),
])  # fmt: skip
def test_quantize_act_folded_is_the_same(m, k, r, dtype, tail):
    """``quantize_act(folded=True)`` with ``fold_lowrank_down``'s L_down: the codes bit for
    bit and the low-rank sums (fp32 atomics in any order) of the unfolded call — the fold
    done once per layer is the one every program does."""
    from svdquant.kernels.quantize import fold_lowrank_down

    k2 = 128 if tail else 0
    x = _acts(m, k, dtype, seed=m)
    t = _acts(m, k2, dtype, seed=m + 1) if tail else None
    s = _smooth(k + k2)
    down, _ = _lowrank(8, k + k2, r, dtype)
    scale = torch.tensor(0.02, device=DEVICE)
    kw = {"tail": t, "tail_act": "gelu_tanh"} if tail else {}
    xq, lora = quantize_act(x, s, down, scale, k + k2, "int4", **kw)
    folded = fold_lowrank_down(down, s)
    assert folded.dtype == dtype and folded.shape == down.shape
    xq_f, lora_f = quantize_act(x, s, folded, scale, k + k2, "int4", folded=True, **kw)
    assert torch.equal(xq.view(torch.uint8), xq_f.view(torch.uint8))
    assert rel_err(lora_f, lora) < 1e-6


def test_quantize_rank_parts_policy(monkeypatch):
    """The low-rank widths the quantize pads a rank to, and its rows per program: one
    power of two by default; with ``SPLIT_RANK`` 48 = 32 + 16, 80 = 64 + 16, 96 = 64 + 32
    at 64 rows (a LoRA stacked on the fused runtime's q/k/v), not 128 wide at 32 rows; 192
    = 128 + 64; 144 and 160 one 256-wide part (their two parts measured slower)."""
    from svdquant.kernels import quantize as qmod

    monkeypatch.setattr(qmod, "SPLIT_RANK", False)
    assert [qmod.rank_parts(r) for r in (0, 16, 32, 48, 80, 96)] == [
        (16, 0), (16, 0), (32, 0), (64, 0), (128, 0), (128, 0)]  # fmt: skip
    assert [qmod.rows_per_program(64, w) for w in (16, 32, 64, 128, 256)] == [64, 64, 64, 32, 16]
    monkeypatch.setattr(qmod, "SPLIT_RANK", True)
    parts = [qmod.rank_parts(r) for r in (32, 48, 64, 80, 96, 112, 128, 144, 160, 192, 288)]
    # (144 and 160: 128 + 16 / 32 at 32 rows measured slower than one 256-wide part; 192 =
    # 128 + 64 faster; 288 = 256 + 32 would run 16 rows: one part)
    assert parts == [(32, 0), (32, 16), (64, 0), (64, 16), (64, 32), (128, 0), (128, 0),
                     (256, 0), (256, 0), (128, 64), (512, 0)]  # fmt: skip
    assert [qmod.rows_per_program(64, a + b) for a, b in parts] == [
        64, 64, 64, 64, 64, 32, 32, 16, 16, 32, 16]  # fmt: skip
    assert qmod.rows_per_program(16, 96) == 16  # the few-row tile stays


@pytest.mark.parametrize(
    ("m", "k1", "k2", "act", "dtype", "k_out"),
    [
        (1, 64, 64, "gelu_tanh", torch.bfloat16, 128),
        (3, 70, 100, "gelu_tanh", torch.float16, 192),  # the seam inside a group
        (257, 128, 192, "silu", torch.bfloat16, 320),
        (17, 40, 24, "none", torch.float32, 64),
        (5, 192, 1, "gelu_tanh", torch.bfloat16, 256),  # k_out past K: zero columns
    ],
)
@pytest.mark.parametrize("act_fmt", ["int4", "fp8"])
def test_quantize_act_cat_matches_reference(m, k1, k2, act, dtype, k_out, act_fmt):
    """quantize of ``cat([x, act(tail)])`` read from the two tensors (FLUX's proj_out):
    value for value the reference's, which concatenates and applies the activation."""
    x, tail = _acts(m, k1, dtype, seed=3), _acts(m, k2, dtype, seed=4) * 0.5
    s = _smooth(k1 + k2)
    down, _ = _lowrank(8, k1 + k2, 4, dtype)
    h = torch.cat([x, ref.activation_ref(tail, act).to(dtype)], dim=-1)
    act_scale = ref.act_scale_from_amax((h.float() / s).abs().amax() * 0.8)
    xq, lora = quantize_act(x, s, down, act_scale, k_out, act_fmt, tail=tail, tail_act=act)
    args = (s, down, act_scale, k_out, act_fmt)
    xq_ref, lora_ref = ref.quantize_act_cat_ref(x, tail, act, *args)
    assert xq.shape == (m, k_out) and lora.shape == (m, 4)
    if act == "none" or DEVICE == "cpu":
        assert same_values(xq, xq_ref)
    else:  # the GPU's exp2 differs from torch's in the last fp32 bits: a rare bf16 flip
        assert fp8_close(xq, xq_ref, max_frac=5e-3)
    assert rel_err(lora, lora_ref) < 1e-4


def test_quantize_act_cat_refuses_bad_input():
    x = _acts(4, 64, torch.bfloat16)
    s, down = _smooth(128), x.new_zeros(0, 128)
    one = torch.ones((), device=DEVICE)
    with pytest.raises(ValueError, match="tail must be"):
        quantize_act(x, s, down, one, 128, "int4", tail=x.half())
    with pytest.raises(ValueError, match="smooth has 128"):
        quantize_act(x, s, down, one, 128, "int4", tail=x[:, :32])
    with pytest.raises(ValueError, match="unknown activation"):
        quantize_act(x, s, down, one, 128, "int4", tail=x, tail_act="relu")


@pytest.mark.parametrize(
    ("m", "k", "act", "dtype", "k_out"),
    [
        (1, 64, "gelu", torch.bfloat16, 64),
        (3, 70, "gelu", torch.float16, 128),  # K not a group multiple
        (257, 192, "gelu", torch.bfloat16, 256),  # k_out past K: zero columns
        (17, 40, "silu", torch.float32, 64),
        (5, 130, "none", torch.bfloat16, 192),
    ],
)
@pytest.mark.parametrize("act_fmt", ["int4", "fp8"])
def test_quantize_act_gated_matches_reference(m, k, act, dtype, k_out, act_fmt):
    """quantize of ``x · act(gate)`` read from the two halves of a gated linear unit (SDXL's
    GEGLU: views into the up projection's output, rows 2K apart): value for value the
    reference's, which writes the activation and the product in x's dtype first."""
    up = torch.cat([_acts(m, k, dtype, seed=3), _acts(m, k, dtype, seed=4) * 0.7], dim=-1)
    x, gate = up.chunk(2, dim=-1)
    s = _smooth(k)
    down, _ = _lowrank(8, k, 4, dtype)
    h = (x.float() * ref.activation_ref(gate, act).to(dtype).float()).to(dtype)
    act_scale = ref.act_scale_from_amax((h.float() / s).abs().amax() * 0.8)
    xq, lora = quantize_act(
        x, s, down, act_scale, k_out, act_fmt, tail=gate, tail_act=act, gated=True
    )
    xq_ref, lora_ref = ref.quantize_act_gated_ref(x, gate, act, s, down, act_scale, k_out, act_fmt)
    assert xq.shape == (m, k_out) and lora.shape == (m, 4)
    if act == "none" or (DEVICE == "cpu" and act != "gelu"):
        assert same_values(xq, xq_ref)
    else:  # the kernel's erf (|error| ≤ 1.5e-7) and the GPU's exp differ from torch's in
        assert fp8_close(xq, xq_ref, max_frac=5e-3)  # the last fp32 bits: a rare flip
    assert rel_err(lora, lora_ref) < 1e-4
    with pytest.raises(ValueError, match="gated input needs a tail of x's shape"):
        quantize_act(x, s, down, act_scale, k_out, act_fmt, tail=gate[:, 1:], gated=True)


@pytest.mark.parametrize("act_fmt", ["int4", "fp8"])
def test_forward_gated_on_the_engine(act_fmt, monkeypatch):
    """``SVDQLinear.forward_gated`` on the engine = the layer on ``x · gelu(gate)`` (what
    diffusers' GEGLU hands its down projection); the reference backend multiplies first,
    the same numbers; bad input is refused; fullgraph compiles."""
    from svdquant.kernels import ops

    _, layer, calib = _layer("int4", act_fmt, k=200, n=48)
    x = calib[:33].reshape(3, 11, 200)
    up = torch.cat([x, x.flip(0) * 0.5], dim=-1)
    value, gate = up.chunk(2, dim=-1)
    h = value * torch.nn.functional.gelu(gate)
    quantize, calls = ops._EAGER.quantize_act_gated, []
    counted = lambda *a: calls.append(1) or quantize(*a)  # noqa: E731
    monkeypatch.setattr(ops._EAGER, "quantize_act_gated", counted)
    for rows in (1, 34):  # the gated quantize, then (fewer rows) PyTorch's gate
        monkeypatch.setattr(ops, "GATED_MIN_ROWS", rows)
        for backend in ("triton", "reference"):
            layer.backend = backend
            y = layer.forward_gated(value, gate, "gelu")
            assert y.shape == (3, 11, 48)
            assert rel_err(y, layer(h)) <= TOL
    assert len(calls) == 1
    monkeypatch.setattr(ops, "GATED_MIN_ROWS", 1)
    with pytest.raises(ValueError, match=r"must both be \[\.\.\., 200\]"):
        layer.forward_gated(value, gate[..., 1:])
    with pytest.raises(ValueError, match="share a dtype"):
        layer.forward_gated(value, gate.half())
    with pytest.raises(ValueError, match="unknown activation"):
        layer.forward_gated(value, gate, "relu")
    layer.act_fmt = "none"
    with pytest.raises(ValueError, match="act_fmt int4 or fp8"):
        svdquant.kernels.svdq_linear_gated_triton(layer, value, gate)
    layer.act_fmt = act_fmt
    torch._dynamo.reset()
    layer.backend = "triton"
    fn = lambda a, b: layer.forward_gated(a, b, "gelu")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(value, gate), fn(value, gate))


@pytest.mark.parametrize("act_fmt", ["int4", "fp8"])
def test_forward_cat_on_the_engine(act_fmt):
    """``SVDQLinear.forward_cat`` on the engine = the layer on ``cat([x, gelu(tail)])``;
    the reference backend concatenates, the same numbers."""
    _, layer, calib = _layer("int4", act_fmt, k=200, n=48)
    x = calib[:33].reshape(3, 11, 200)
    head, tail = x[..., :72], x[..., 72:] * 0.3
    h = torch.cat([head, torch.nn.functional.gelu(tail, approximate="tanh")], dim=-1)
    for backend in ("triton", "reference"):
        layer.backend = backend
        y = layer.forward_cat(head, tail, "gelu_tanh")
        assert y.shape == (3, 11, 48)
        assert rel_err(y, layer(h)) <= TOL
    with pytest.raises(ValueError, match="together have 200"):
        layer.forward_cat(head, tail[..., 1:], "gelu_tanh")
    with pytest.raises(ValueError, match="share a dtype"):
        layer.forward_cat(head, tail.half(), "gelu_tanh")
    with pytest.raises(ValueError, match="unknown activation"):
        layer.forward_cat(head, tail, "relu")
    layer.act_fmt = "none"  # the fused path takes no 16-bit activations (forward_cat
    with pytest.raises(ValueError, match="act_fmt int4 or fp8"):  # concatenates them)
        svdquant.kernels.svdq_linear_cat_triton(layer, head, tail, "gelu_tanh")
    layer.act_fmt = act_fmt
    torch._dynamo.reset()
    layer.backend = "triton"
    fn = lambda a, b: layer.forward_cat(a, b, "gelu_tanh")  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(head, tail), fn(head, tail))


def test_quantize_act_int4_is_the_papers_codes():
    """The fp8 operand times S is the paper's int4 fake-quantized activation, up to fp8."""
    x = _acts(5, 192, torch.float32)
    s = torch.ones(192, device=DEVICE)
    exact = formats.fake_quantize(x, "int4", saturate=True)
    scale = ref.act_scale_from_amax(x.abs().amax())
    xq, _ = quantize_act(x, s, x.new_empty(0, 192), scale, 192, "int4")
    assert rel_err(xq.float() * scale, exact) < 0.04  # 3 mantissa bits: ≤ 1/16 per element


def test_quantize_act_int4_rounds_the_exact_product():
    """A code is ``round(x̂ · (1 / s_group))`` of the exact product, rounded once: with
    s_group = 3 (a group max of 21), 1/3 rounds up in fp32, so 7.5 · RN(1/3) lies just
    above 2.5 — its fp32 rounding is the tie 2.5 (then 2, to even), its code is 3. The
    kernel (one FMA on the GPU, fp64 under the interpreter) and the reference agree on 3,
    written as fp8(3 · 3 / S) = 9 (2 would give 6)."""
    x = torch.zeros(3, 64, dtype=torch.bfloat16, device=DEVICE)
    x[:, 0], x[:, 1], x[:, 2] = 21.0, 7.5, -7.5
    args = (x, torch.ones(64, device=DEVICE), x.new_empty(0, 64), torch.ones((), device=DEVICE))
    for xq, _ in (quantize_act(*args, 64, "int4"), ref.quantize_act_ref(*args, 64, "int4")):
        assert xq[:, 1:3].float().tolist() == [[9.0, -9.0]] * 3


# --- widen ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize(("n", "k"), [(1, 16), (37, 100), (130, 333)])
def test_widen_matches_reference(fmt, n, k):
    q = _weight(n, k, fmt)
    q.packed[0].zero_()  # an all-zero row: c = 1, no division by zero
    q.scales[0].zero_()
    wq, s_ch = widen_weight(q.packed, q.scales, q.tensor_scale, fmt)
    wq_ref, s_ref = ref.widen_weight_ref(q.packed, q.scales, q.tensor_scale, fmt)
    assert same_values(wq, wq_ref)
    assert torch.allclose(s_ch, s_ref, rtol=1e-6, atol=0)  # GPU: fp32 ops may fuse
    # and it stands for the stored weight, up to fp8's 3 mantissa bits
    w = formats.dequantize(q)
    assert rel_err((wq.float() * s_ch[:, None])[:, :k], w) < 0.04


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_matches_reference(fmt, dtype):
    """The 16-bit weight of the W4A16 path at many tokens: the same kernel, ``DEQUANT``."""
    q = _weight(37, 333, fmt)
    w = dequantize_weight(q.packed, q.scales, q.tensor_scale, fmt, dtype)
    w_ref = ref.dequantize_weight_ref(q.packed, q.scales, q.tensor_scale, fmt, dtype)
    assert w.dtype == dtype and w.shape == w_ref.shape
    assert torch.equal(w.float(), w_ref.float())


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_w4a16_layer_at_many_tokens(fmt):
    """act_fmt="none" above the GEMV's 16 rows: dequantized 16-bit weight, 16-bit GEMM."""
    _, layer, calib = _layer(fmt, "none")
    x = calib[:40]
    layer.backend = "triton"
    y = layer(x)
    y_ref = ref.w4a16_linear_ref(
        x, layer.qweight, layer.wscales, layer.wtensor_scale, layer.smooth,
        layer.lowrank_down, layer.lowrank_up, layer.bias, fmt,
    )  # fmt: skip
    assert y.dtype == x.dtype
    assert rel_err(y, y_ref) < 1e-2  # x̂, the weight and the low-rank product in bf16


# --- fp8 GEMM -------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 257])
@pytest.mark.parametrize(
    ("n", "k", "r", "bias"), [(45, 128, 7, True), (130, 208, 0, False), (70, 200, 3, True)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tma", [True, False])
def test_fp8_gemm_matches_reference(monkeypatch, m, n, k, r, bias, dtype, tma):
    """Operands read through tensor descriptors (``gemm.TMA_LOADS``, here from one row on;
    rows of 200 bytes are not 16-byte aligned: pointer loads) or by pointer loads."""
    from svdquant.kernels import gemm

    monkeypatch.setattr(gemm, "TMA_LOADS", tma)
    monkeypatch.setattr(gemm, "TMA_MIN_M", 1)
    g = _gen(m + n)
    xq = ref.round_e4m3(torch.randn(m, k, generator=g) * 50).to(DEVICE)
    wq = ref.round_e4m3(torch.randn(n, k, generator=g) * 100).to(DEVICE)
    s_ch = (torch.rand(n, generator=g) * 1e-3).to(DEVICE)
    act_scale = torch.tensor(0.02, device=DEVICE)
    lora = torch.randn(m, r, generator=g).to(DEVICE)
    _, up = _lowrank(n, k, r, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    y = fp8_gemm(xq, wq, s_ch, act_scale, lora, up, b, dtype)
    y_ref = ref.fp8_gemm_ref(xq, wq, s_ch, act_scale, lora, up, b, dtype)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, y_ref) <= TOL


@pytest.mark.parametrize(("m", "r", "bias"), [(3, 300, True), (70, 544, False)])
def test_fp8_gemm_adds_a_branch_past_the_epilogues_rank_apart(monkeypatch, m, r, bias):
    """A low-rank branch wider than the epilogues take (``gemm.MAX_EPILOGUE_RANK``: a
    layer quantized with a larger rank, a fused group's whole stacked branch) is added
    after the GEMM: the reference's output, no kernel asked for a rank it cannot hold."""
    from svdquant.kernels import gemm

    apart = _count_calls(monkeypatch, gemm, "_wide_lowrank_apart")
    assert r > gemm.MAX_EPILOGUE_RANK
    args = list(_gemm_args(m, 45, 128, seed=m + r, r=r))
    if not bias:
        args[6] = None
    assert rel_err(fp8_gemm(*args), ref.fp8_gemm_ref(*args)) <= TOL
    assert len(apart) == 1


def test_fp8_gemm_keeps_no_memory_between_calls(monkeypatch):
    """The buffer the GEMM keeps for the pointers a launch never reads owns no memory: one
    made during torch.compile's CUDA-graph warm-up (which allocates from the graph's pool)
    would otherwise stay alive untracked and the compiled model would refuse to run (v37)."""
    from svdquant.kernels import gemm

    monkeypatch.setattr(gemm, "_DUMMIES", {})
    g = _gen(3)
    xq = ref.round_e4m3(torch.randn(3, 64, generator=g)).to(DEVICE)
    wq = ref.round_e4m3(torch.randn(32, 64, generator=g)).to(DEVICE)
    s_ch, scale = torch.ones(32, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    lora, up = torch.zeros(3, 0, device=DEVICE), torch.zeros(32, 0, device=DEVICE)
    fp8_gemm(xq, wq, s_ch, scale, lora, up, None, torch.bfloat16)
    assert gemm._DUMMIES and all(t.numel() == 0 for t in gemm._DUMMIES.values())


def test_gemm_autotune_refuses_graph_capture_with_a_clear_error(monkeypatch):
    """A first call of a shape inside CUDA-graph capture cannot time the tiles: it says
    to warm the model up first instead of failing deep inside the capture."""
    from svdquant.kernels import gemm

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="warm-up call"):
        gemm._bench_config(lambda: None, (0.5, 0.2, 0.8))


def test_tma_rule(monkeypatch):
    """Tensor descriptors only where TMA can take the operands: from ``TMA_MIN_M`` rows,
    16-byte aligned base and rows, a GPU of compute capability 9+ (or the interpreter);
    the flag turns them off."""
    from svdquant.kernels import gemm

    monkeypatch.setattr(gemm, "TMA_MIN_M", 4)
    w = torch.zeros(8, 64, device=DEVICE).to(torch.float8_e4m3fn)
    x = torch.zeros(5, 64, device=DEVICE).to(torch.float8_e4m3fn)
    big = torch.zeros(5 * 64 + 8, device=DEVICE).to(torch.float8_e4m3fn)
    gpu_ok = DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    assert gemm._tma_ok(x, w) == gpu_ok
    assert not gemm._tma_ok(x[:3], w)  # fewer rows than TMA_MIN_M
    assert not gemm._tma_ok(torch.zeros(5, 40, device=DEVICE).to(x.dtype), w)  # rows of 40 B
    assert not gemm._tma_ok(big[1 : 1 + 5 * 64].view(5, 64), w)  # base off by one byte
    monkeypatch.setattr(gemm, "TMA_LOADS", False)
    assert not gemm._tma_ok(x, w)


def _gemm_args(m: int, n: int, k: int, seed: int, x_scale: float = 30, r: int = 5) -> tuple:
    """fp8_gemm's arguments: fp8 operands, channel and activation scales, a rank-``r``
    low-rank branch and a bias, bf16 out."""
    g = _gen(seed)
    xq = ref.round_e4m3(torch.randn(m, k, generator=g) * x_scale).to(DEVICE)
    wq = ref.round_e4m3(torch.randn(n, k, generator=g) * 100).to(DEVICE)
    s_ch = (torch.rand(n, generator=g) * 1e-3).to(DEVICE)
    act_scale = torch.tensor(0.02, device=DEVICE)
    lora = torch.randn(m, r, generator=g).to(DEVICE)
    _, up = _lowrank(n, k, r, torch.bfloat16)
    b = torch.randn(n, generator=g).to(DEVICE, torch.bfloat16)
    return xq, wq, s_ch, act_scale, lora, up, b, torch.bfloat16


@pytest.mark.parametrize(("m", "sizes"), [(1, [256, 256]), (37, [256, 512, 256, 300])])
def test_fp8_gemm_split_writes_each_segment_contiguous(m, sizes):
    """The split output (fused q/k/v, q/k/v/mlp): segment i of the flat buffer is columns
    [c_i, c_i + sizes[i]) of the plain GEMM, value for value; bounds that are not
    multiples of 256 are refused."""
    n, k = sum(sizes), 64
    args = _gemm_args(m, n, k, m, x_scale=50)
    y = fp8_gemm(*args)
    flat = fp8_gemm_split(*args, sizes)
    start = 0
    for w in sizes:
        seg = flat[m * start : m * (start + w)].view(m, w)
        assert torch.equal(seg, y[:, start : start + w])
        start += w
    assert not split_supported([100, 156]) and not split_supported([n])
    with pytest.raises(ValueError, match="multiples of 256"):
        fp8_gemm_split(*args, [100, n - 100])


@pytest.mark.parametrize(
    ("m", "n", "k", "r", "activation"),
    [(1, 45, 128, 7, "gelu_tanh"), (3, 130, 208, 0, "silu"), (257, 70, 200, 3, "gelu"),
     (70, 45, 128, 300, "gelu_tanh")],
)  # fmt: skip
def test_fp8_gemm_applies_an_activation_as_written(monkeypatch, m, n, k, r, activation):
    """``fp8_gemm(activation=...)`` (an MLP's fc1 whose fc2 runs apart): the activation
    of the output as written, rounded again — the reference's, and the plain GEMM's
    output through torch's activation within one rounding; a branch past the epilogues'
    rank too (added after the GEMM)."""
    from svdquant.kernels import gemm

    monkeypatch.setattr(gemm, "TMA_MIN_M", 1)
    args = _gemm_args(m, n, k, seed=m + n, r=r)
    y = fp8_gemm(*args, activation)
    y_ref = ref.fp8_gemm_ref(*args, activation)
    assert y.dtype == torch.bfloat16 and rel_err(y, y_ref) <= TOL
    assert rel_err(y, ref.activation_like(fp8_gemm(*args), activation)) <= TOL
    with pytest.raises(ValueError, match="unknown activation"):
        fp8_gemm(*args, "relu6")


@pytest.mark.parametrize(("m", "sizes"), [(1, [256, 256]), (37, [256, 512, 256, 300])])
def test_fp8_gemm_split_applies_the_last_activation(m, sizes):
    """``fp8_gemm_split(last_act=...)`` (FLUX's single blocks: the MLP part's GELU, which
    only ``proj_out`` reads): the other segments the plain split's, value for value, the
    last the activation of its columns as written."""
    n, k = sum(sizes), 64
    args = _gemm_args(m, n, k, m + 1, x_scale=50)
    plain = fp8_gemm_split(*args, sizes)
    flat = fp8_gemm_split(*args, sizes, None, "gelu_tanh")
    last = m * (n - sizes[-1])
    assert torch.equal(flat[:last], plain[:last])
    want = ref.activation_ref(plain[last:], "gelu_tanh").to(plain.dtype)
    assert rel_err(flat[last:], want) <= TOL
    with pytest.raises(ValueError, match="unknown activation"):
        fp8_gemm_split(*args, sizes, None, "relu6")


@pytest.mark.parametrize(
    ("m", "sizes", "parts"),
    [(1, [256, 256], [8, 4, 12]), (37, [256, 512, 256, 300], [16, 16, 0, 8, 16]),
     (70, [512, 256, 256], [0, 4, 4, 4])],
)  # fmt: skip
def test_fp8_gemm_split_parts_match_the_full_lowrank(m, sizes, parts):
    """``fp8_gemm_split``'s ``parts``: each segment reads the shared prefix and its own
    block of ``lora_act`` against a compact L_up — the product of the full L_up
    (``reference.expand_lowrank_parts``), segment for segment."""
    n, k = sum(sizes), 64
    p, widths = parts[0], parts[1:]
    xq, wq, s_ch, scale, _, _, b, dtype = _gemm_args(m, n, k, m + n, x_scale=50)
    g = _gen(m)
    lora = torch.randn(m, p + sum(widths), generator=g).to(DEVICE)
    compact = (torch.randn(n, p + max(widths) + 3, generator=g) * 0.1).to(DEVICE, dtype)
    full = ref.expand_lowrank_parts(compact, parts, sizes)
    y_ref = ref.fp8_gemm_ref(xq, wq, s_ch, scale, lora, full, b, dtype)
    flat = fp8_gemm_split(xq, wq, s_ch, scale, lora, compact, b, dtype, sizes, parts)
    y_full = fp8_gemm_split(xq, wq, s_ch, scale, lora, full, b, dtype, sizes)
    assert rel_err(flat, y_full) < 1e-5
    start = 0
    for w in sizes:
        assert (
            rel_err(flat[m * start : m * (start + w)].view(m, w), y_ref[:, start : start + w])
            <= TOL
        )
        start += w
    with pytest.raises(ValueError, match="parts"):
        fp8_gemm_split(xq, wq, s_ch, scale, lora, compact, b, dtype, sizes, parts[:-1])


@pytest.mark.parametrize(("m", "n", "activation", "act_fmt2"), [
    (3, 130, "gelu_tanh", "int4"), (257, 128, "silu", "fp8"), (40, 64, "none", "int4"),
])  # fmt: skip
def test_fp8_gemm_quantize_next_matches_reference(m, n, activation, act_fmt2):
    """fc1's epilogue writes fc2's input: activation, 16-bit rounding, quantize, low-rank."""
    k, r2 = 128, 6
    down2, _ = _lowrank(8, n, r2, torch.bfloat16)
    k_out2 = -(-n // 64) * 64
    args = (*_gemm_args(m, n, k, m + n), activation, _smooth(n), down2,
            torch.tensor(0.01, device=DEVICE), k_out2, act_fmt2)  # fmt: skip
    xq2, lora2 = fp8_gemm_quantize_next(*args)
    xq2_ref, lora2_ref = ref.fp8_gemm_quantize_next_ref(*args)
    assert xq2.shape == (m, k_out2) and lora2.shape == (m, r2)
    # the kernel's GELU/SiLU differ from torch's by fp32 ulps, which can move a value
    # across a bf16 or fp8 rounding boundary: almost every element is equal
    mismatch = (xq2.float() != xq2_ref.float()).float().mean().item()
    assert mismatch < 0.01
    assert rel_err(xq2, xq2_ref) < 0.01
    assert rel_err(lora2, lora2_ref) < 1e-3


GATED_NEXT_CASES = [
    (1, 64, 128, 8, "gelu", "int4", True, torch.bfloat16),
    (3, 136, 96, 8, "gelu", "fp8", True, torch.bfloat16),  # H past a tile, not a group multiple
    (37, 70, 200, 0, "silu", "int4", False, torch.bfloat16),  # no low-rank branch, K odd
    (257, 192, 64, 16, "none", "int4", True, torch.bfloat16),
    (37, 136, 96, 8, "gelu", "int4", True, torch.float16),  # an fp16 model (SDXL's usual)
]


def _gated_next_args(m, h, k, r, activation, act_fmt2, bias, dtype=torch.bfloat16, r2=6):
    """fp8_gemm_gated_next's arguments: an up projection of 2h rows, a next layer of h
    (rank ``r2``), the 16-bit tensors and the output in ``dtype``."""
    down2, _ = _lowrank(8, h, r2, dtype)
    xq, wq, s_ch, scale, lora, up, b, _ = _gemm_args(m, 2 * h, k, m + h + k, r=r)
    return (xq, wq, s_ch, scale, lora, up.to(dtype), b.to(dtype) if bias else None, dtype,
            activation, _smooth(h), down2, torch.tensor(0.01, device=DEVICE),
            -(-h // 64) * 64, act_fmt2)  # fmt: skip


@pytest.mark.parametrize(
    ("m", "h", "k", "r", "activation", "act_fmt2", "bias", "dtype"), GATED_NEXT_CASES
)
def test_fp8_gemm_gated_next_matches_reference(m, h, k, r, activation, act_fmt2, bias, dtype):
    """A gated unit's up projection writes its down projection's input (``gemm_gated``):
    value and gate rows in two accumulators, the gate's activation and the product
    rounded as the unfused modules write them, then the quantize and its low-rank sums."""
    from svdquant.kernels.gemm_gated import fp8_gemm_gated_next

    args = _gated_next_args(m, h, k, r, activation, act_fmt2, bias, dtype)
    xq2, lora2 = fp8_gemm_gated_next(*args)
    assert xq2.shape == (m, args[12]) and lora2.shape == (m, 6)
    _check_gated_next(args, xq2, lora2)


def _check_gated_next(args: tuple, xq2: torch.Tensor, lora2: torch.Tensor) -> None:
    """``fp8_gemm_gated_next``'s outputs against the reference. In the interpreter (fp32
    sums) almost code for code: the kernel's GELU/SiLU differ from torch's in the last
    fp32 bits, which can move a value across a bf16 or fp8 rounding boundary. On the GPU
    the fp8 tensor cores' sums differ from the fp32 reference's in the last bits too,
    which moves a few 16-bit roundings of v and g and so whole int4 steps (v41, H200, K =
    640-1280: 0.1-0.2% of the codes, a norm error of 1.6-2.5%; the low-rank sums
    1.5-2.1e-3): there the codes are compared with the reference on the GPU's own 16-bit
    up projection (``fp8_gemm`` on the Triton kernel: the same MMAs)."""
    xq2_ref, lora2_ref = ref.fp8_gemm_gated_next_ref(*args)
    if DEVICE == "cpu":
        assert (xq2.float() != xq2_ref.float()).float().mean().item() < 0.01
        assert rel_err(xq2, xq2_ref) < 0.01
        assert rel_err(lora2, lora2_ref) < 1e-3
        return
    from svdquant.kernels import gemm

    assert rel_err(xq2, xq2_ref) < 0.05
    assert rel_err(lora2, lora2_ref) < 5e-3
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gemm, "WS_GEMM", False)  # the Triton kernel: the same MMAs
        v, g = fp8_gemm(*args[:8]).chunk(2, dim=-1)
    own, _ = ref.quantize_act_gated_ref(v, g, args[8], *args[9:])
    flips = (xq2.float() != own.float()).sum().item()
    assert flips <= max(2, 2e-3 * own.numel()), flips


def test_fp8_gemm_gated_next_refuses_bad_shapes():
    from svdquant.kernels.gemm_gated import fp8_gemm_gated_next

    args = list(_gated_next_args(3, 64, 64, 4, "gelu", "int4", True))
    odd = [*args]
    odd[1] = args[1][:-1]
    with pytest.raises(ValueError, match="even number of rows"):
        fp8_gemm_gated_next(*odd)
    with pytest.raises(ValueError, match="even number of rows"):
        ref.fp8_gemm_gated_next_ref(*odd)
    with pytest.raises(ValueError, match="padded K for K = 64"):
        fp8_gemm_gated_next(*args[:12], 128, "int4")
    with pytest.raises(ValueError, match="int4 or fp8"):
        fp8_gemm_gated_next(*args[:13], "none")


def _geglu_layers(act_fmt: str, c: int = 96, h: int = 136, n: int = 80):
    """An up projection (C -> 2H) and a down projection (H -> N) quantized on GEGLU data,
    on the engine, and inputs [3, 11, C]."""
    g = _gen(13)
    lin_up = torch.nn.Linear(c, 2 * h).to(DEVICE, torch.bfloat16)
    lin_down = torch.nn.Linear(h, n).to(DEVICE, torch.bfloat16)
    x = (torch.randn(300, c, generator=g) * 2).to(DEVICE, torch.bfloat16)
    v, gate = lin_up(x).chunk(2, dim=-1)
    opts = dict(fmt="int4", act_fmt=act_fmt, rank=8, alpha=0.5)
    up = svdquant.quantize_linear(lin_up, x, **opts)
    down = svdquant.quantize_linear(lin_down, v * torch.nn.functional.gelu(gate), **opts)
    up.backend = down.backend = "triton"
    return up, down, x[:33].reshape(3, 11, c)


@pytest.mark.parametrize("act_fmt", ["int4", "fp8"])
def test_fused_geglu_matches_unfused(act_fmt):
    """``svdq_geglu_triton`` = down(v · gelu(g)) with v, g = up(x).chunk(2): the unfused
    layers' numbers without the [..., 2H] output or a quantize pass; bad pairs refused;
    fullgraph compiles."""
    up, down, x = _geglu_layers(act_fmt)
    y = svdquant.kernels.svdq_geglu_triton(x, up, down, "gelu")
    v, gate = up(x).chunk(2, dim=-1)
    assert y.shape == (3, 11, 80)
    assert rel_err(y, down(v * torch.nn.functional.gelu(gate))) <= TOL
    with pytest.raises(ValueError, match="gives twice as many"):
        svdquant.kernels.svdq_geglu_triton(x, up, up, "gelu")
    down.act_fmt = "none"
    with pytest.raises(ValueError, match="act_fmt in"):
        svdquant.kernels.svdq_geglu_triton(x, up, down, "gelu")
    down.act_fmt = act_fmt
    ff = lambda t: svdquant.kernels.svdq_geglu_triton(t, up, down, "gelu")  # noqa: E731
    torch._dynamo.reset()
    assert torch.equal(torch.compile(ff, fullgraph=True, backend="aot_eager")(x), ff(x))


@pytest.mark.parametrize(("m", "n", "k"), [(100, 200, 333), (20, 60, 200), (70, 512, 96)])
def test_fp8_gemm_split_k_tail_matches_whole_tiles(monkeypatch, m, n, k):
    """``gemm.TAIL_SPLIT``: the tiles past the last whole wave run as K slices whose fp32
    partial sums meet in a workspace; the last slice to arrive runs the epilogue. Every
    mode (plain, split output, next-layer quantize) gives the whole-tile results up to
    the order of fp32 sums. Under the interpreter the GPU has 3 "SMs": 16 tiles leave a
    tail of 1, a single tile is all tail, 3 × 2 tiles none."""
    from svdquant.kernels import gemm

    monkeypatch.setattr(gemm, "TMA_MIN_M", 1)  # K = 96: through tensor descriptors
    args = _gemm_args(m, n, k, m + n + k)
    down2, _ = _lowrank(8, n, 6, torch.bfloat16)
    nxt = ("gelu_tanh", _smooth(n), down2, torch.tensor(0.01, device=DEVICE), -(-n // 64) * 64)
    results = []
    for on in (False, True):
        monkeypatch.setattr(gemm, "TAIL_SPLIT", on)
        out = [fp8_gemm(*args), *fp8_gemm_quantize_next(*args, *nxt, "int4")]
        if n == 512:
            out.append(fp8_gemm_split(*args, [256, 256]))
        results.append(out)
    (y0, q0, l0, *s0), (y1, q1, l1, *s1) = results
    assert rel_err(y1, y0) <= TOL and rel_err(l1, l0) < 1e-3
    assert (q1.float() != q0.float()).float().mean().item() < 0.01
    for a, c in zip(s0, s1, strict=True):
        assert rel_err(c, a) <= TOL
    _, tail, slices = gemm._tail_plan(m, n, k, 32, 64, 64, 3)  # the interpreter's tile
    assert (tail, slices if tail else None) == {100: (1, 3), 20: (1, 3), 70: (0, None)}[m]


def test_split_k_tail_policy(monkeypatch):
    """By default the tail runs where it was measured to pay: a long K, at least one
    whole wave of 128x256 tiles and a last wave mostly idle (FLUX's single-block proj_out
    at batch 1); forced on or off by ``TAIL_SPLIT``."""
    from svdquant.kernels import gemm

    monkeypatch.setattr(gemm, "TAIL_SPLIT", None)
    assert gemm._tail_wanted(4608, 3072, 15360, 132)
    assert gemm._tail_wanted(4608, 3072, 12288, 132)
    assert not gemm._tail_wanted(4608, 3072, 3072, 132)  # short K slices: slower
    assert not gemm._tail_wanted(1024, 3072, 12288, 132)  # no whole wave: all tail
    assert not gemm._tail_wanted(4096, 3072, 12288, 132)  # the last wave 91% full
    # past rank 128 (a rank-128 LoRA on rank 32) gemm_ws's chunks beat the tail (v59)
    assert gemm._tail_keeps(4608, 3072, 15360, 128, 132)
    assert not gemm._tail_keeps(4608, 3072, 15360, 160, 132)
    assert not gemm._tail_keeps(4608, 3072, 3072, 32, 132)
    monkeypatch.setattr(gemm, "TAIL_SPLIT", True)
    assert gemm._tail_wanted(16, 16, 16, 132)
    monkeypatch.setattr(gemm, "TAIL_SPLIT", False)
    assert not gemm._tail_wanted(4608, 3072, 15360, 132)


def test_quantize_k_split_policy():
    """The quantize's K split on 132 multiprocessors (the H200) at the launches measured
    in v30 (``probe_layer-h200-2026-11-29-v30-*.json``): (programs along K, steps each)."""
    from svdquant.kernels.quantize import k_split

    assert k_split(72, 96, 132) == (16, 6)  # M = 4608, K = 12288 (v26: 12 x 8, 1.11x slower)
    assert k_split(72, 120, 132) == (18, 7)  # M = 4608, K = 15360
    assert k_split(72, 24, 132) == (12, 2)  # M = 4608, K = 3072: not 24 one-step programs
    assert k_split(8, 96, 132) == (48, 2)  # M = 512, K = 12288 (96 x 1: 1.08x slower)
    assert k_split(8, 24, 132) == (24, 1)  # M = 512, K = 3072: two-step would leave 96
    assert k_split(16, 24, 132) == (24, 1)  # M = 1024, K = 3072: 192 (1.12x slower)
    assert k_split(1, 1, 132) == (1, 1)


def test_widen_tile_policy():
    """The widen's tile: beside the quantize, the standalone tile unless the weight is
    taller than wide (v30: 1.01-1.05x the layer where N <= K, 0.98x at 12288 x 3072)."""
    from svdquant.kernels import widen

    assert widen.tile(3072, 12288, False, overlapped=True) == widen.TILE
    assert widen.tile(3072, 3072, False, overlapped=True) == widen.TILE
    assert widen.tile(12288, 3072, False, overlapped=True) == widen.OVERLAP_TILE
    assert widen.tile(12288, 3072, False, overlapped=False) == widen.TILE
    assert widen.tile(12288, 3072, True, overlapped=True) == widen.DEQUANT_TILE


# --- W4A16 GEMV -----------------------------------------------------------------------


@pytest.fixture
def no_gluon(monkeypatch):
    """For the tests of the dp4a kernel at 3-4 tokens: the Gluon kernel, which takes int4
    weights there on an H100/H200 (``gemv.GLUON``), off."""
    from svdquant.kernels import gemv

    monkeypatch.setattr(gemv, "GLUON", False)


@pytest.fixture
def no_dp4a(monkeypatch):
    """For the tests of the other GEMV kernels: the dp4a kernel and (on the GPU) the Gluon
    one, which take int4 weights first (``gemv.DP4A_MAX_M``, ``gemv.GLUON``), off."""
    from svdquant.kernels import gemv

    monkeypatch.setattr(gemv, "DP4A_MAX_M", 0)
    monkeypatch.setattr(gemv, "GLUON", False)


def _w4a16_case(m, n, k, r, fmt, dtype, bias_seed):
    """Activations and ``w4a16_linear``'s other arguments (no bias when ``bias_seed`` is
    None) for the GEMV tests."""
    x = _acts(m, k, dtype)
    q = _weight(n, k, fmt)
    down, up = _lowrank(n, k, r, dtype)
    b = None if bias_seed is None else torch.randn(n, generator=_gen(bias_seed)).to(DEVICE, dtype)
    return x, (q.packed, q.scales, q.tensor_scale, _smooth(k), down, up, b, fmt)


@pytest.mark.usefixtures("no_dp4a")
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize(
    ("n", "k", "r"),
    [(45, 100, 5), (130, 333, 0), (45, 1024, 3), (20, 2176, 2), (33, 200, 40)],
)
def test_w4a16_matches_reference(monkeypatch, m, fmt, n, k, r):
    """The FMA kernel (M = 1, 3) and ``_w4a16_mma_kernel`` (M = 16, int4 too:
    ``PACKED_MMA`` off here; the packed kernel has its own tests). (45, 1024): a K split
    (partial sums through atomics); (20, 2176): more low-rank partial sums (17 chunks of
    K) than one epilogue load takes; rank 40: two rank blocks in the x̂ / low-rank down
    kernel."""
    from svdquant.kernels import gemv

    monkeypatch.setattr(gemv, "PACKED_MMA", False)
    dtype = torch.bfloat16 if fmt == "int4" else torch.float16
    x, args = _w4a16_case(m, n, k, r, fmt, dtype, bias_seed=5)
    y = w4a16_linear(x, *args)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.usefixtures("no_dp4a")
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize(
    ("tile", "n", "k", "r"),
    [
        (t, *shape)
        for t in [(8, 256, 2), (4, 1024, 1), (16, 512, 1)]
        for shape in [(45, 1024, 3), (20, 1088, 2), (130, 3072, 8)]
    ]
    + [((2, 1024, 1), 45, 1024, 3), ((1, 256, 2), 20, 1088, 2)],  # one or two rows each
)
def test_w4a16_fma_kernel_over_tiles(monkeypatch, m, tile, fmt, n, k, r):
    """The FMA kernel (one token, or up to ``FMA_MAX_M``) over its tiles: rows spread
    over threads (each thread loads x̂ for its row) or all of a program's rows in every
    thread (x̂ loaded once per step and token, broadcast over the rows); K steps narrowed
    until they divide K (1088 → 64); 3 tokens padded to 4 (the 4th reads token 3)."""
    from svdquant.kernels import gemv

    monkeypatch.setitem(gemv.TILES, "fma", tile)
    monkeypatch.setitem(gemv.TILES, "fma_multi", tile)
    monkeypatch.setattr(gemv, "FMA_MAX_M", 4)
    x, args = _w4a16_case(m, n, k, r, fmt, torch.bfloat16, bias_seed=6)
    assert rel_err(w4a16_linear(x, *args), ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize(
    ("n", "k", "r"),
    [(45, 100, 5), (130, 333, 0), (45, 1024, 3), (20, 2176, 2), (33, 200, 40)],
)
def test_w4a16_dp4a_matches_reference(monkeypatch, m, n, k, r):
    """The dp4a kernel (int4 at up to ``DP4A_MAX_M`` tokens; here up to 16): x̂ as 16-bit
    integers per group, codes as signed bytes; shapes like the other kernels' test (K
    padded, a K split, 17 low-rank chunks: more than one epilogue load at one token,
    rank 40), 3 tokens padded to 4."""
    from svdquant.kernels import gemv

    monkeypatch.setattr(gemv, "DP4A_MAX_M", 16)
    monkeypatch.setattr(gemv, "GLUON", False)
    assert gemv._path(m, "int4") == "dp4a"
    x, args = _w4a16_case(m, n, k, r, "int4", torch.bfloat16, bias_seed=5)
    y = w4a16_linear(x, *args)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert rel_err(y, ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize(
    ("tile", "n", "k", "r"),
    [
        (t, *shape)
        for t in [(1, 512, 1), (4, 1024, 1), (8, 2048, 2), (16, 512, 2), (32, 512, 4)]
        for shape in [(45, 1024, 3), (20, 1152, 2)]
    ],
)
def test_w4a16_dp4a_kernel_over_tiles(monkeypatch, m, tile, n, k, r):
    """The dp4a kernel over its tiles (one row to 16, steps of 512 to 2048 columns
    narrowed until they divide KP: 1152 → 128), fp16 activations."""
    from svdquant.kernels import gemv

    monkeypatch.setitem(gemv.TILES, "dp4a", tile)
    monkeypatch.setitem(gemv.TILES, "dp4a_multi", tile)
    x, args = _w4a16_case(m, n, k, r, "int4", torch.float16, bias_seed=6)
    y = w4a16_linear(x, *args)
    assert y.dtype == torch.float16
    assert rel_err(y, ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize(
    ("tile", "n", "k", "r"),
    [(t, 45, 1024, 3) for t in [(8, 512, 1), (16, 512, 2), (4, 1024, 1)]]
    + [((8, 512, 1), 20, 2176, 2)],
)
def test_w4a16_dp4a_x_rows_is_the_same_kernel(monkeypatch, m, tile, n, k, r):
    """``gemv.DP4A_X_ROWS_MAX_M`` (x̂ addressed per weight row, loaded in the codes' layout)
    changes where x̂ lands in registers, not a bit of the output (integer sums)."""
    from svdquant.kernels import gemv

    monkeypatch.setitem(gemv.TILES, "dp4a", tile)
    monkeypatch.setitem(gemv.TILES, "dp4a_multi", tile)
    x, args = _w4a16_case(m, n, k, r, "int4", torch.bfloat16, bias_seed=7)
    monkeypatch.setattr(gemv, "DP4A_X_ROWS_MAX_M", 0)
    y0 = w4a16_linear(x, *args)
    monkeypatch.setattr(gemv, "DP4A_X_ROWS_MAX_M", 4)
    y1 = w4a16_linear(x, *args)
    assert torch.equal(y0, y1) and rel_err(y1, ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.parametrize(
    ("m", "n", "k", "r"), [(1, 20, 2176, 40), (2, 45, 1024, 3), (5, 45, 1024, 3), (1, 33, 200, 0)]
)
def test_w4a16_prep_loads_first_is_the_same_kernel(monkeypatch, m, n, k, r):
    """``gemv.PREP_LD_FIRST`` (the prep's L_down and first token requested before it waits
    for anything) reorders loads only: the same output bit for bit, on the dp4a path (1-2
    tokens, one and two rank blocks, no rank) and the packed one (5 tokens)."""
    from svdquant.kernels import gemv

    x, args = _w4a16_case(m, n, k, r, "int4", torch.bfloat16, bias_seed=5)
    monkeypatch.setattr(gemv, "PREP_LD_FIRST", False)
    y0 = w4a16_linear(x, *args)
    monkeypatch.setattr(gemv, "PREP_LD_FIRST", True)
    y1 = w4a16_linear(x, *args)
    assert torch.equal(y0, y1) and rel_err(y1, ref.w4a16_linear_ref(x, *args)) <= TOL


@triton.jit
def _dp4a_kernel(a_ptr, b_ptr, c_ptr, s_ptr, u_ptr, INTERPRET: tl.constexpr):
    i = tl.arange(0, 256)
    a, b, c = tl.load(a_ptr + i), tl.load(b_ptr + i), tl.load(c_ptr + i)
    tl.store(s_ptr + i, _dp4a(a, b, c, True, INTERPRET))
    tl.store(u_ptr + i, _dp4a(a, b, c, False, INTERPRET))


def test_dp4a_matches_its_definition():
    """``gemv._dp4a`` (PTX ``dp4a`` on the GPU, integer ops in the interpreter): c plus
    the dot product of a's four signed bytes with b's four bytes, signed or unsigned,
    on words with every byte value at the extremes."""
    g = _gen(21)
    extremes = torch.tensor([0, 1, 127, 128, 255, 0x80, 0x7F, 0xF0], dtype=torch.int64)
    raw = torch.randint(0, 256, (3, 256, 4), generator=g)
    raw[:2, :8, :] = extremes[torch.randint(0, 8, (2, 8, 4), generator=g)]
    words = [(r[..., 0] | r[..., 1] << 8 | r[..., 2] << 16 | r[..., 3] << 24) for r in raw]
    a, b, c = (((w + 2**31) % 2**32 - 2**31).to(torch.int32) for w in words)
    signed = ((raw + 128) % 256) - 128
    want_s = c.long() + (signed[0] * signed[1]).sum(-1)
    want_u = c.long() + (signed[0] * raw[1]).sum(-1)
    s, u = torch.empty_like(a), torch.empty_like(a)
    dev = [t.to(DEVICE) for t in (a, b, c, s, u)]
    _dp4a_kernel[(1,)](*dev, INTERPRET=interpreting())
    assert torch.equal(dev[3].cpu().long(), want_s)
    assert torch.equal(dev[4].cpu().long(), want_u)


def test_w4a16_dp4a_prep_planes_decode_to_x_hat():
    """The dp4a kernel's x̂ (``prep(..., i16=True)``): high and low bytes at even and odd
    columns, four to a word in the code words' nibble order, times the group's step (× 16)
    give back x · (1/s) within 2⁻¹⁵ of each group's largest value; zero past K."""
    from svdquant.kernels import gemv

    m, k, kp = 3, 333, 384
    x = _acts(m, k, torch.bfloat16)
    smooth = _smooth(k)
    down = torch.zeros(2, k, dtype=torch.bfloat16, device=DEVICE)
    xh, _ = gemv.prep(x, smooth, down, kp, "int4", fma=False, i16=True)
    planes = xh.planes.cpu().long() % 2**32  # [m, 4, kp/8] as unsigned words
    by = torch.stack([(planes >> (8 * b)) & 255 for b in range(4)], dim=-1)  # [m, 4, kp/8, 4]
    hi = ((by[:, :2] + 128) % 256) - 128
    q = hi * 256 + by[:, 2:]  # [m, parity, kp/8, 4]: column 8i + 2b + parity
    q = q.permute(0, 2, 3, 1).reshape(m, kp)
    xhat = q.double() * 16 * xh.scales.cpu().double().repeat_interleave(64, dim=1)
    want = torch.zeros(m, kp, dtype=torch.float64)
    want[:, :k] = x.cpu().double() / smooth.cpu().double()
    amax = want.abs().reshape(m, -1, 64).amax(-1).repeat_interleave(64, dim=1)
    assert ((xhat - want).abs() <= amax * 2.0**-15).all()
    assert (q[:, k:] == 0).all()


def test_w4a16_default_path(monkeypatch):
    """The default routing: int4 on the Gluon kernel from ``GLUON_MIN_M`` (3) tokens where
    the GPU has it, else on the dp4a kernel up to ``DP4A_MAX_M`` (4) tokens;
    nvfp4 (and int4 with the dp4a kernel off) on the FMA kernel up to ``FMA_MAX_M`` (4)
    tokens, above it int4 on the packed kernel (``PACKED_MMA``) and nvfp4 on
    ``_w4a16_mma_kernel``; ``PACKED_MMA`` off sends int4 there too. ``w4a16_linear``
    launches the kernel ``_path`` names."""
    from svdquant.kernels import gemv

    assert gemv.PACKED_MMA and gemv.FMA_MAX_M == 4 and gemv.DP4A_MAX_M == 4
    assert gemv.GLUON and gemv.GLUON_MIN_M == 2
    # where the GPU has the Gluon kernel: int4 from 2 tokens on it, nvfp4 never
    assert [gemv._path(m, "int4", True) for m in (1, 2, 3, 4, 16)] == ["dp4a"] + ["gluon"] * 4
    assert gemv._path(16, "nvfp4", True) == "mma"
    monkeypatch.setattr(gemv, "GLUON", False)  # (and below: the other kernels, on any GPU)
    assert gemv._path(16, "int4", True) == "packed"
    assert [gemv._path(m, "int4") for m in (1, 4, 5, 8, 16)] == ["dp4a"] * 2 + ["packed"] * 3
    assert [gemv._path(m, "nvfp4") for m in (1, 4, 5, 16)] == ["fma"] * 2 + ["mma"] * 2
    monkeypatch.setattr(gemv, "DP4A_MAX_M", 0)
    assert [gemv._path(m, "int4") for m in (1, 4, 5, 8, 16)] == ["fma"] * 2 + ["packed"] * 3
    launched = []

    class Spy:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: launched.append(self.name)

    for name in ("fma", "mma", "packed", "dp4a"):
        monkeypatch.setattr(gemv, f"_w4a16_{name}_kernel", Spy(name))
    for m, fmt in ((4, "int4"), (5, "int4"), (16, "int4"), (4, "nvfp4"), (5, "nvfp4")):
        x, args = _w4a16_case(m, 45, 256, 3, fmt, torch.bfloat16, bias_seed=None)
        w4a16_linear(x, *args)
    assert launched == ["fma", "packed", "packed", "fma", "mma"]
    monkeypatch.setattr(gemv, "PACKED_MMA", False)
    assert gemv._path(5, "int4") == "mma"
    x, args = _w4a16_case(5, 45, 256, 3, "int4", torch.bfloat16, bias_seed=None)
    w4a16_linear(x, *args)
    assert launched[-1] == "mma"
    monkeypatch.setattr(gemv, "DP4A_MAX_M", 4)
    for m in (1, 4, 5):
        x, args = _w4a16_case(m, 45, 256, 3, "int4", torch.bfloat16, bias_seed=None)
        w4a16_linear(x, *args)
    assert launched[-3:] == ["dp4a", "dp4a", "mma"]


@pytest.mark.parametrize(
    ("half", "dtype", "offset"), [(0x4300, torch.bfloat16, 136.0), (0x6400, torch.float16, 1032.0)]
)
def test_packed_decode_ptx_recipe(half, dtype, offset):
    """The GEMVs' PTX decode (``nibble_pair_ptx``: bf16 for ``gemv._decode_pair``, fp16 for
    the Gluon kernel), emulated bit for bit — xor 0x8888, ``prmt`` 0x4140, shift by 4,
    ``lop3`` (x & 0x000F000F) | half — gives ``offset + code`` for both nibbles of a byte
    pair, for every byte. (The interpreter cannot run inline PTX: the kernels' tests there
    use integer ops for the same values.)"""
    from svdquant.kernels._triton_common import nibble_pair_ptx

    ptx = nibble_pair_ptx(half)
    assert "0x8888" in ptx and "0x4140" in ptx and f"0x{half:04X}{half:04X}" in ptx

    def decode(b0: int, b1: int) -> list[float]:
        t = (b0 | b1 << 8) ^ 0x8888
        a = (t & 0xFF) | ((t >> 8) & 0xFF) << 16
        out = []
        for word in (a, a >> 4):
            word = (word & 0x000F000F) | (half << 16 | half)
            halves = torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32)
            out += halves.to(torch.int16).view(dtype).float().tolist()
        return out  # low nibble of b0, of b1, high nibble of b0, of b1

    def code(nibble: int) -> int:
        return nibble - 16 if nibble >= 8 else nibble

    for b0 in range(256):
        b1 = (b0 * 37 + 11) % 256
        want = [code(b0 & 15), code(b1 & 15), code(b0 >> 4), code(b1 >> 4)]
        assert decode(b0, b1) == [offset + c for c in want]


@pytest.mark.usefixtures("no_dp4a")
@pytest.mark.parametrize("m", [2, 5, 16])
@pytest.mark.parametrize(("n", "k", "r"), [(45, 1024, 3), (130, 333, 0), (20, 2176, 2)])
def test_w4a16_packed_kernel_matches_reference(monkeypatch, m, n, k, r):
    """The packed-decode tensor-core kernel (``gemv.PACKED_MMA``; here from M = 2): x̂
    as bf16 hi/lo planes with the per-group offset sums, codes decoded to ``136 + code``
    (under the interpreter by integer ops, on the GPU by the PTX); K split into partial
    sums at (45, 1024) and (20, 2176), K padded to 384 at 333, no low-rank branch at r = 0."""
    from svdquant.kernels import gemv

    monkeypatch.setattr(gemv, "PACKED_MMA", True)
    monkeypatch.setattr(gemv, "FMA_MAX_M", 1)
    x, args = _w4a16_case(m, n, k, r, "int4", torch.bfloat16, bias_seed=8)
    assert rel_err(w4a16_linear(x, *args), ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.usefixtures("no_dp4a")
@pytest.mark.parametrize("m", [2, 5, 16])
@pytest.mark.parametrize(
    ("tile", "n", "k", "r"),
    [
        ((64, 2, 4), 45, 1024, 3),  # 16 groups, steps of 2: K split into whole steps
        ((32, 4, 4), 45, 1024, 3),  # steps of 4, 2 row blocks: 4 splits of 1 step
        ((32, 2, 4), 130, 333, 0),  # K padded to 384: 6 groups, 3 steps of 2
        ((64, 4, 4), 130, 333, 0),  # 6 groups: not whole steps of 4, so steps of 3
        ((32, 4, 4), 70, 640, 5),  # 10 groups: steps of 2 (not 4), K split
        ((64, 4, 8), 20, 448, 2),  # 7 groups (prime): one group a step
    ],
)
def test_w4a16_packed_kernel_over_tiles(monkeypatch, m, tile, n, k, r):
    """The packed kernel over ``TILES["packed"]``: BLOCK_N 32 and 64, 2 and 4 groups a
    step (fewer where KP is not whole steps), with and without K splits."""
    from svdquant.kernels import gemv

    monkeypatch.setattr(gemv, "PACKED_MMA", True)
    monkeypatch.setattr(gemv, "FMA_MAX_M", 1)
    monkeypatch.setitem(gemv.TILES, "packed", tile)
    x, args = _w4a16_case(m, n, k, r, "int4", torch.bfloat16, bias_seed=8)
    assert rel_err(w4a16_linear(x, *args), ref.w4a16_linear_ref(x, *args)) <= TOL


def test_packed_groups_per_step_fallback():
    """The packed launcher's groups per step: the most, up to the tile's, that divide
    KP / 64 (so that KP and every K split are whole steps)."""
    from svdquant.kernels import gemv

    assert [gemv._groups_per_step(kp, 4) for kp in (64, 128, 192, 256, 384, 640, 1024)] == [
        1, 2, 3, 4, 3, 2, 4
    ]  # fmt: skip
    assert gemv._groups_per_step(4544, 4) == 1  # 71 groups
    assert gemv._groups_per_step(3072, 2) == 2
    assert gemv._groups_per_step(3072, 0) == 1


@pytest.mark.usefixtures("no_dp4a")
@pytest.mark.parametrize("m", [5])
def test_w4a16_packed_kernel_groups_per_step_same_numbers(monkeypatch, m):
    """More groups a step changes the loop, not the arithmetic: the groups are added in
    the same order, so without a K split (n = 512: 16 row blocks of 32, enough programs
    for the interpreter's 4 "SMs") the result is the same for 1, 2 and 4 groups a step —
    bit for bit under the interpreter."""
    from svdquant.kernels import gemv

    monkeypatch.setattr(gemv, "PACKED_MMA", True)
    monkeypatch.setattr(gemv, "FMA_MAX_M", 1)
    x, args = _w4a16_case(m, 512, 512, 3, "int4", torch.bfloat16, bias_seed=8)
    ys = []
    for gps in (1, 2, 4):
        monkeypatch.setitem(gemv.TILES, "packed", (32, gps, 4))
        ys.append(w4a16_linear(x, *args))
    assert rel_err(ys[0], ref.w4a16_linear_ref(x, *args)) <= TOL
    for y in ys[1:]:
        if DEVICE == "cpu":
            assert torch.equal(y, ys[0])
        else:
            assert rel_err(y, ys[0]) <= 1e-6


@pytest.mark.usefixtures("no_dp4a")
@pytest.mark.parametrize("tile", [(32, 1, 4), (32, 2, 4), (64, 4, 4)])
def test_w4a16_packed_kernel_empty_split(monkeypatch, tile):
    """A K split whose range is empty (one more split than ``_split_k`` plans: its
    programs start past KP) adds nothing — its first-step loads stay inside the weight."""
    from svdquant.kernels import gemv

    plan = gemv._split_k

    def one_more(m, n, kp, block_k, n_blocks, out_dtype, device):
        split, kps, _ = plan(m, n, kp, block_k, n_blocks, out_dtype, device)
        return split + 1, kps, torch.zeros(m, n, dtype=torch.float32, device=device)

    monkeypatch.setattr(gemv, "PACKED_MMA", True)
    monkeypatch.setattr(gemv, "FMA_MAX_M", 1)
    monkeypatch.setattr(gemv, "_split_k", one_more)
    monkeypatch.setitem(gemv.TILES, "packed", tile)
    x, args = _w4a16_case(5, 45, 1024, 3, "int4", torch.bfloat16, bias_seed=8)
    assert rel_err(w4a16_linear(x, *args), ref.w4a16_linear_ref(x, *args)) <= TOL


def _f16x_to_dense(xh, m: int, kp: int) -> torch.Tensor:
    """x̂ [m, kp] back from ``F16X``: each group's fp16 plane values times its power of two
    (the odd plane's times 16 too), read at the positions ``gemv._store_f16`` documents."""
    planes, scales = xh.planes.float().cpu(), xh.scales.float().cpu()
    t = planes.shape[-1]
    n = torch.arange(t)
    b = torch.arange(32)
    lane = 4 * (n % 8)[:, None] + (b // 8)[None, :]  # [t, 32]
    j = 8 * (n // 8)[:, None] + (b % 8)[None, :]
    out = torch.zeros(t, kp)
    for g in range(kp // 64):
        for p in range(2):
            out[:, 64 * g + 2 * b + p] = planes[g, p][lane, j] * scales[g, 0][:, None] * 16**p
    return out[:m]


@pytest.mark.parametrize(("m", "k", "t"), [(1, 64, 8), (3, 333, 8), (8, 200, 8), (9, 256, 16),
                                           (16, 1000, 16)])  # fmt: skip
@pytest.mark.parametrize("chunk", [128, 64])
def test_w4a16_f16_prep_layout(monkeypatch, m, k, t, chunk):
    """The Gluon GEMV's x̂ (``prep(..., f16=t)``): read back at the documented positions it
    is x · (1/s) to fp16 rounding, every group's largest value of a token in [2⁹, 2¹⁰)
    (before the odd plane's / 16), zero past M and K; the offset is
    P · (1032 · Σ even + 1152 · Σ odd) of the stored values; at both prep chunk widths."""
    from svdquant.kernels import gemv

    monkeypatch.setattr(gemv, "F16_CHUNK", chunk)
    kp = -(-k // 64) * 64
    x = _acts(m, k, torch.bfloat16)
    s = _smooth(k)
    down, _ = _lowrank(8, k, 5, torch.bfloat16)
    xh, lora = gemv.prep(x, s, down, kp, "int4", fma=False, f16=t, n=1500)
    assert xh.planes.shape == (kp // 64, 2, 32, t) and xh.scales.shape == (kp // 64, 2, t)
    assert xh.out.shape == (m, 1500) and xh.out.dtype == torch.float32
    assert (xh.out == 0).all()  # the GEMV's sums, zeroed by the prep's programs
    want = torch.zeros(m, kp)
    want[:, :k] = x.float().cpu() / s.float().cpu()
    got = _f16x_to_dense(xh, m, kp)
    assert ((got - want).abs() <= want.abs() * 2**-11 + 1e-30).all()
    scaled = got / xh.scales[:, 0].float().cpu().repeat_interleave(64, 0).t()[:m]
    gmax = scaled.reshape(m, -1, 64).abs().amax(-1)
    assert ((gmax >= 512) & (gmax < 1024) | (gmax == 0)).all()
    full = _f16x_to_dense(xh, t, kp)
    assert (full[m:] == 0).all()
    sums = (full / xh.scales[:, 0].float().cpu().repeat_interleave(64, 0).t()).reshape(t, -1, 64)
    pw = xh.scales[:, 0].float().cpu().t()
    offset = pw * (1032 * sums[..., 0::2].sum(-1) + 72 * sums[..., 1::2].sum(-1))
    # (fp32 sums in another order: within 2⁻²⁰ of the sum of magnitudes)
    size = pw * (1032 * sums[..., 0::2].abs().sum(-1) + 72 * sums[..., 1::2].abs().sum(-1))
    assert ((xh.scales[:, 1].float().cpu().t() - offset).abs() <= size * 2**-20).all()
    want_lora = (x.float() / s.float()) @ down.float().t()
    torch.testing.assert_close(lora.sum(0), want_lora, rtol=1e-4, atol=1e-4)


def test_w4a16_f16_prep_without_xhat():
    """``prep(..., f16=t, xhat=False)`` (the Gluon GEMV's ``XHAT_IN_KERNEL``): no x̂, the
    GEMV's inputs handed on (x contiguous, s as fp32), the same low-rank sums and zeroing
    as with x̂."""
    from svdquant.kernels import gemv

    m, k, kp = 3, 333, 384
    x = _acts(m, 2 * k, torch.bfloat16)[:, ::2]  # (strided: the prep makes it contiguous)
    s = _smooth(k).to(torch.bfloat16)
    down, _ = _lowrank(8, k, 5, torch.bfloat16)
    xh, lora = gemv.prep(x, s, down, kp, "int4", fma=False, f16=8, n=700, xhat=False)
    assert xh.planes is None and xh.scales is None
    assert xh.x.is_contiguous() and torch.equal(xh.x, x)
    assert xh.smooth.dtype == torch.float32 and torch.equal(xh.smooth, s.float())
    assert xh.out.shape == (m, 700) and (xh.out == 0).all()
    _, want = gemv.prep(x, s, down, kp, "int4", fma=False, f16=8, n=700)
    torch.testing.assert_close(lora, want, rtol=0, atol=0)


def test_gluon_gemv_read_timeline(monkeypatch):
    """``read_timeline``: the SM, the stamps widened against the 64-bit end (across a wrap
    of their low 32 bits too) and the end; ``programs`` counts row blocks × K splits."""
    from svdquant.kernels import gemv_gluon

    monkeypatch.setattr(gemv_gluon, "num_sms", lambda device: 132)
    assert gemv_gluon.programs(18432, 3072, torch.device("cpu")) == 144 * 6
    end = 5 * 2**32 + 100  # (the low 32 bits wrapped between the stamps and the end)
    want = [end - 900 + 100 * i for i in range(7)]
    buf = torch.zeros(2 * 16, dtype=torch.int64)
    buf[16:18] = torch.tensor([7, end])
    buf[18:25] = torch.tensor(want) & 0xFFFFFFFF
    t = gemv_gluon.read_timeline(buf, 2)
    assert t.shape == (2, 9) and t[1].tolist() == [7, *want, end]


def test_gluon_gemv_timeline_buffer_checked():
    """``gemv_gluon.TIMELINE`` (a diagnostic): a buffer too small, of another dtype or on
    another device is refused before any launch."""
    from svdquant.kernels import gemv_gluon

    cpu = torch.device("cpu")
    gemv_gluon.check_timeline(None, 864, cpu)
    gemv_gluon.check_timeline(torch.zeros(16 * 864, dtype=torch.int64), 864, cpu)
    for bad in (torch.zeros(8 * 864, dtype=torch.int64), torch.zeros(16 * 864)):
        with pytest.raises(ValueError, match="16 a program"):
            gemv_gluon.check_timeline(bad, 864, cpu)
    with pytest.raises(ValueError, match="16 a program"):
        gemv_gluon.check_timeline(torch.zeros(16 * 864, dtype=torch.int64), 864,
                                  torch.device("cuda"))  # fmt: skip


def test_gluon_gemv_k_split_plan(monkeypatch):
    """The prep zeroes the Gluon GEMV's fp32 sums only where its launcher splits K
    (``splits_k``, ``prep_args`` and the launcher share one plan)."""
    from svdquant.kernels import gemv_gluon

    cpu = torch.device("cpu")
    monkeypatch.setattr(gemv_gluon, "num_sms", lambda device: 132)
    assert gemv_gluon.splits_k(18432, 3072, cpu)  # 144 row blocks: 6 splits of 8 groups
    assert gemv_gluon._k_split(18432, 3072, cpu) == (8, 6)
    assert not gemv_gluon.splits_k(130, 128, cpu)  # two groups: one program's worth
    # what ``w4a16_linear`` hands the prep: x̂ in the kernel, sums only where K is split
    assert gemv_gluon.prep_args(4, 18432, 3072, cpu) == dict(f16=8, n=18432, xhat=False)
    assert gemv_gluon.prep_args(9, 130, 128, cpu) == dict(f16=16, n=0, xhat=False)


@pytest.mark.parametrize("shape", [(1, 5), (4, 1500), (16, 3000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_after(shape, dtype):
    """The K split's cast kernel (``cast_after``; without PDL here) is ``Tensor.to``,
    sizes not a multiple of its block, Inf and NaN kept."""
    from svdquant.kernels._triton_common import cast_after

    src = torch.randn(shape, generator=_gen(3)).to(DEVICE) * 1000
    src[0, 0] = float("inf")
    src[-1, -1] = float("nan")
    got = cast_after(src, dtype, pdl=False)
    assert got.dtype == dtype and got.shape == src.shape
    torch.testing.assert_close(got, src.to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize(("n", "k"), [(130, 333), (18432, 3072), (300, 4500), (3072, 3072)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_w4a16_gluon_kernel(monkeypatch, m, n, k, dtype):
    """The Gluon tensor-core GEMV (``gemv.GLUON``) against the reference: 8 and 16 token
    slots, K splits with a short last split (K = 333, 4500), with and without bias."""
    from svdquant.kernels import gemv, gemv_gluon

    if not gemv_gluon.available(torch.device("cuda")):
        pytest.skip("the Gluon GEMV needs sm_90 and a Gluon triton")
    monkeypatch.setattr(gemv, "GLUON", True)
    monkeypatch.setattr(gemv, "GLUON_MIN_M", 1)
    x, args = _w4a16_case(m, n, k, 32, "int4", dtype, bias_seed=9 if m % 2 else None)
    y = w4a16_linear(x, *args)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("m", [4, 16])
@pytest.mark.parametrize(("n", "k", "r"), [(18432, 3072, 32), (300, 4500, 0), (130, 333, 48)])
@pytest.mark.parametrize("tile", [(64, 1, 4), (64, 4, 4), (128, 1, 4), (128, 4, 4)])
@pytest.mark.parametrize("max_groups", [8, 16])
def test_gpu_w4a16_gluon_kernel_over_tiles(monkeypatch, m, n, k, r, tile, max_groups):
    """The Gluon GEMV's tiles and groups a program (ranks 0 and 48: no low-rank branch,
    two rank blocks)."""
    from svdquant.kernels import gemv, gemv_gluon

    if not gemv_gluon.available(torch.device("cuda")):
        pytest.skip("the Gluon GEMV needs sm_90 and a Gluon triton")
    monkeypatch.setattr(gemv, "GLUON", True)
    monkeypatch.setattr(gemv_gluon, "TILE", tile)
    monkeypatch.setattr(gemv_gluon, "MAX_GROUPS", max_groups)
    x, args = _w4a16_case(m, n, k, r, "int4", torch.bfloat16, bias_seed=9)
    assert rel_err(w4a16_linear(x, *args), ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("m", [3, 16])
@pytest.mark.parametrize(("n", "k"), [(18432, 3072), (300, 4500)])
def test_gpu_w4a16_gluon_kernel_without_tma(monkeypatch, m, n, k):
    """The Gluon GEMV's register-prefetch variant (``STAGES = 0``: what it runs where TMA
    cannot read the codes, a weight not 16-byte aligned)."""
    from svdquant.kernels import gemv, gemv_gluon

    if not gemv_gluon.available(torch.device("cuda")):
        pytest.skip("the Gluon GEMV needs sm_90 and a Gluon triton")
    monkeypatch.setattr(gemv, "GLUON", True)
    monkeypatch.setattr(gemv_gluon, "STAGES", 0)
    x, args = _w4a16_case(m, n, k, 32, "int4", torch.bfloat16, bias_seed=9)
    assert rel_err(w4a16_linear(x, *args), ref.w4a16_linear_ref(x, *args)) <= TOL


def _gluon_setting_agrees(monkeypatch, setting: str, m: int, n: int, k: int, r: int) -> None:
    """The Gluon GEMV with ``gemv_gluon.<setting>`` on against the reference, and element
    by element against it off: at most a bf16 rounding apart (the K split's fp32 sums add
    in any order)."""
    from svdquant.kernels import gemv, gemv_gluon

    if not gemv_gluon.available(torch.device("cuda")):
        pytest.skip("the Gluon GEMV needs sm_90 and a Gluon triton")
    monkeypatch.setattr(gemv, "GLUON", True)
    monkeypatch.setattr(gemv, "GLUON_MIN_M", 1)
    x, args = _w4a16_case(m, n, k, r, "int4", torch.bfloat16, bias_seed=9)
    monkeypatch.setattr(gemv_gluon, setting, True)
    y = w4a16_linear(x, *args)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    assert rel_err(y, ref.w4a16_linear_ref(x, *args)) <= TOL
    monkeypatch.setattr(gemv_gluon, setting, False)
    y2 = w4a16_linear(x, *args).float()
    assert ((y.float() - y2).abs() <= y2.abs() * 2**-7 + y2.abs().max() * 1e-4).all()


_GLUON_SETTING_CASES = [(18432, 3072, 32), (300, 4500, 16), (130, 333, 0)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 4, 9, 16])
@pytest.mark.parametrize(("n", "k", "r"), _GLUON_SETTING_CASES)
def test_gpu_w4a16_gluon_xhat_in_kernel(monkeypatch, m, n, k, r):
    """x̂ computed in the Gluon GEMV (``XHAT_IN_KERNEL``) against the reference, and
    against the GEMV reading the prep's x̂: the same x̂ (the same rounding), so the same
    outputs up to the fp32 sums' order."""
    _gluon_setting_agrees(monkeypatch, "XHAT_IN_KERNEL", m, n, k, r)


@pytest.mark.gpu
def test_gpu_w4a16_gluon_timeline(monkeypatch):
    """The diagnostic ``gemv_gluon.TIMELINE``: each program's SM and stamps, in order, and
    the same output as without it."""
    from svdquant.kernels import gemv, gemv_gluon

    if not gemv_gluon.available(torch.device("cuda")):
        pytest.skip("the Gluon GEMV needs sm_90 and a Gluon triton")
    monkeypatch.setattr(gemv, "GLUON", True)
    x, args = _w4a16_case(4, 18432, 3072, 32, "int4", torch.bfloat16, bias_seed=9)
    y = w4a16_linear(x, *args).float()
    programs = gemv_gluon.programs(18432, 3072, x.device)
    buf = torch.full((programs * 16,), -1, dtype=torch.int64, device="cuda")
    monkeypatch.setattr(gemv_gluon, "TIMELINE", buf)
    y2 = w4a16_linear(x, *args).float()
    assert ((y - y2).abs() <= y.abs() * 2**-7 + y.abs().max() * 1e-4).all()
    t = gemv_gluon.read_timeline(buf, programs).cpu()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert ((t[:, 0] >= 0) & (t[:, 0] < sms)).all()
    # the stamps widened against the 64-bit end: in order, within a few ms
    steps = t[:, 1:].diff(dim=1)
    assert (steps >= 0).all() and (steps < 10**7).all()


@pytest.mark.gpu
def test_gpu_w4a16_gluon_kernel_keeps_non_finite(monkeypatch):
    """An Inf in a token's activations reaches that token's outputs (and no other's)."""
    from svdquant.kernels import gemv, gemv_gluon

    if not gemv_gluon.available(torch.device("cuda")):
        pytest.skip("the Gluon GEMV needs sm_90 and a Gluon triton")
    monkeypatch.setattr(gemv, "GLUON", True)
    x, args = _w4a16_case(4, 300, 640, 16, "int4", torch.bfloat16, bias_seed=None)
    x[2, 100] = float("inf")
    y = w4a16_linear(x, *args)
    assert not torch.isfinite(y[2]).any()
    assert torch.isfinite(y[[0, 1, 3]]).all()


# --- the layer ------------------------------------------------------------------------


def _layer(fmt: str, act_fmt: str, k: int = 200, n: int = 130, rank: int = 8):
    g = _gen(7)
    lin = torch.nn.Linear(k, n).to(DEVICE, torch.bfloat16)
    calib = torch.randn(512, k, generator=g)
    calib[:, :4] *= 20
    calib = calib.to(DEVICE, torch.bfloat16)
    layer = svdquant.quantize_linear(lin, calib, fmt=fmt, act_fmt=act_fmt, rank=rank, alpha=0.5)
    return lin, layer, calib


ENGINE_CASES = [("int4", "int4"), ("int4", "fp8"), ("nvfp4", "int4"), ("nvfp4", "fp8")]


def test_layer_with_wide_rank_by_mm_is_the_same(monkeypatch):
    """A layer whose rank the quantize slices (a rank-160 branch: a LoRA stacked on it) on
    the engine, ``quantize.WIDE_BY_MM`` on: the quantize beside the widen as ever, writing
    the codes alone, and every low-rank column by one GEMM — the sliced layer's output:
    the same codes, the low-rank sums only in another order, so each output within one
    rounding of its 16-bit value."""
    from svdquant.kernels import quantize as qmod

    _, layer, calib = _layer("int4", "int4", k=192, n=176, rank=160)
    layer.backend = "triton"
    gemms = _count_calls(monkeypatch, qmod, "lowrank_mm")
    x = calib[:70]
    monkeypatch.setattr(qmod, "WIDE_BY_MM", False)
    sliced = layer(x).float()
    monkeypatch.setattr(qmod, "WIDE_BY_MM", True)
    wide = layer(x).float()
    ulp = torch.maximum(wide.abs(), sliced.abs()) * 2**-7  # (bf16: 8 bits of mantissa)
    assert ((wide - sliced).abs() <= ulp + 1e-6 * sliced.abs().max()).all()
    assert len(gemms) == 1


@pytest.mark.parametrize("sizes", [[256, 256, 512], [40, 40, 16]])
def test_forward_split_gives_contiguous_parts(sizes):
    """``SVDQLinear.forward_split`` (fused projections): each part equals the layer's
    output columns and is contiguous — written by the GEMM directly when the bounds are
    multiples of 256, split and copied otherwise (``contiguous=False``: views, no copy)."""
    _, layer, calib = _layer("int4", "int4", k=64, n=sum(sizes))
    layer.backend = "triton"
    x = calib[:7].reshape(7, 1, 64)
    parts = layer.forward_split(x, sizes)
    y = layer(x)
    start = 0
    for p, w in zip(parts, sizes, strict=True):
        assert p.shape == (7, 1, w) and p.is_contiguous()
        assert torch.equal(p, y[..., start : start + w])
        start += w
    views = layer.forward_split(x, sizes, contiguous=False)  # the same values
    for p, v in zip(parts, views, strict=True):
        assert torch.equal(p, v)
    if sizes[0] % 256:  # not split by the GEMM: views of one output, no copy
        assert len({v.untyped_storage().data_ptr() for v in views}) == 1
        assert not views[0].is_contiguous()
    with pytest.raises(ValueError, match="add up"):
        layer.forward_split(x, [1, 2])
    for backend in ("triton", "reference"):  # the last part as its activation, either way
        layer.backend = backend
        acted, plain = layer.forward_split(x, sizes, last_act="silu"), layer.forward_split(x, sizes)
        want = ref.activation_ref(plain[-1], "silu").to(x.dtype)
        assert all(torch.equal(a, p) for a, p in zip(acted[:-1], plain, strict=False))
        assert acted[-1].is_contiguous() and rel_err(acted[-1], want) <= TOL
        with pytest.raises(ValueError, match="unknown activation"):
            layer.forward_split(x, sizes, last_act="relu6")
    layer.backend = "triton"
    if sizes[0] % 256:  # the engine's own split refuses what its GEMM cannot split
        with pytest.raises(ValueError, match="multiples of 256"):
            svdquant.kernels.svdq_linear_split_triton(layer, x, sizes)


def _append_lora_rows(part, extra: int, g: torch.Generator) -> None:
    """Give ``part`` a random rank-``extra`` LoRA of its own, rows after its base branch
    (as ``lora._rebuild`` appends a loaded one)."""
    k = part.in_features
    a = torch.randn(extra, k, generator=g).to(DEVICE, part.lowrank_down.dtype) * 0.1
    bu = torch.randn(part.out_features, extra, generator=g).to(DEVICE, a.dtype) * 0.1
    part.lowrank_down = torch.cat([part.lowrank_down, a])
    part.lowrank_up = torch.cat([part.lowrank_up, bu], dim=1)


@pytest.mark.parametrize("lora_parts", [False, True])
def test_fused_layer_with_loras_equals_its_parts(monkeypatch, lora_parts):
    """A fused group whose layers carry their own LoRAs (rows stacked after the shared
    base), split in the GEMM: each part's output is its layer's, with the stacked L_up or
    the compact one (``gemm.LORA_PARTS``: each part reads its own columns)."""
    from svdquant.fuse import _concat, _split
    from svdquant.kernels import gemm

    monkeypatch.setattr(gemm, "LORA_PARTS", lora_parts)
    sizes = [256, 256, 512]
    _, layer, calib = _layer("int4", "int4", k=64, n=sum(sizes), rank=8)
    layers = _split(layer, sizes)
    g = _gen(11)
    for part, extra in zip(layers, (4, 0, 12), strict=True):  # the middle one: no LoRA
        _append_lora_rows(part, extra, g)
    fused = _concat(layers)
    assert fused.lowrank_down.shape[0] == 8 + 16
    assert fused.lora_parts == [8, 4, 0, 12]
    # the compact L_up: made at fusing while the switch is on, else when first wanted
    assert hasattr(fused, "lowrank_up_parts") == lora_parts
    for m in (*layers, fused):
        m.backend = "triton"
    x = calib[:5]
    for lazy in (False, True):
        monkeypatch.setattr(gemm, "LORA_PARTS", lazy or lora_parts)
        outs = svdquant.kernels.svdq_linear_split_triton(fused, x, sizes)
        for out, part in zip(outs, layers, strict=True):
            assert rel_err(out, part(x)) < 1e-5
    assert fused.lowrank_up_parts.shape == (sum(sizes), 32)  # 8 + 12, padded to 16s
    assert "lowrank_up_parts" not in fused.state_dict()
    full = ref.expand_lowrank_parts(fused.lowrank_up_parts, fused.lora_parts, sizes)
    assert torch.equal(full, fused.lowrank_up)


def test_fused_group_stacks_past_max_rank_by_parts(monkeypatch):
    """A group whose LoRAs stack past ``lora.MAX_RANK`` fuses when each part reads only its
    own columns (``gemm.LORA_PARTS``) and each part's rank stays within it, up to
    ``gemm.MAX_STACKED_RANK`` stacked columns; each part's output is its layer's (the
    quantize's stacked sums in rank slices, the GEMM's parts in rank chunks on the GPU),
    the fused layer holding only the compact L_up."""
    from svdquant import lora
    from svdquant.fuse import _concat, _fusable, _split
    from svdquant.kernels import gemm

    sizes = [256, 256, 512]
    _, layer, calib = _layer("int4", "int4", k=64, n=sum(sizes), rank=16)
    layers = _split(layer, sizes)
    g = _gen(12)
    for part in layers:  # a rank-128 LoRA on each: 16 + 3 x 128 = 400 stacked, 144 a part
        _append_lora_rows(part, 128, g)
    monkeypatch.setattr(gemm, "MAX_STACKED_RANK", 256)
    assert "MAX_STACKED_RANK = 256" in _fusable(layers)
    monkeypatch.setattr(gemm, "MAX_STACKED_RANK", 400)
    assert _fusable(layers) is None
    with monkeypatch.context() as mp:
        mp.setattr(lora, "MAX_RANK", 128)  # a part's 144 columns past it
        assert "a part's LoRAs stacked to rank 144" in _fusable(layers)
        mp.setattr(gemm, "LORA_PARTS", False)  # the whole stacked L_up in every part
        assert "stacked to rank 400, above lora.MAX_RANK" in _fusable(layers)
    with monkeypatch.context() as mp:  # parts the GEMM cannot split: not past MAX_RANK
        mp.setattr(gemm, "SPLIT_ALIGN", 512)
        assert "do not split in the GEMM" in _fusable(layers)
    fused = _concat(layers)
    assert fused.lora_parts == [16, 128, 128, 128]
    # only the compact L_up [U_i, B_i] (16 + 128 columns), not the stacked [N, 400]
    assert fused.lowrank_up.shape == (sum(sizes), 144)
    assert not hasattr(fused, "lowrank_up_parts")
    for m in (*layers, fused):
        m.backend = "triton"
    x = torch.randn(600 if DEVICE == "cuda" else 70, 64, generator=g).to(DEVICE, calib.dtype)
    want = [part(x) for part in layers]
    for lora_parts in (True, False):  # (the compact L_up is read by parts either way)
        monkeypatch.setattr(gemm, "LORA_PARTS", lora_parts)
        outs = svdquant.kernels.svdq_linear_split_triton(fused, x, sizes)
        for out, w in zip(outs, want, strict=True):
            assert rel_err(out, w) < (1e-5 if DEVICE == "cpu" else TOL)
    # the paths that read the whole L_up get it expanded: the plain forward, dequantize
    whole = fused(x[:5])
    assert rel_err(whole, torch.cat([w[:5] for w in want], dim=-1)) < TOL
    weights = torch.cat([part.dequantize() for part in layers])
    assert rel_err(fused.dequantize(), weights) < 1e-3  # (fp32 sums of other lengths)
    for back, part in zip(_split(fused, sizes), layers, strict=True):  # unfused: the base
        assert torch.equal(back.lowrank_up, part.lowrank_up[:, :16])


@pytest.mark.parametrize("act_fmt", ["int4", "fp8"])
def test_fused_layer_equals_its_parts(act_fmt):
    """``svdquant.fuse_projections``'s concatenation on the engine: one quantize and one
    GEMM over N = 3n give each part's output, value for value."""
    from svdquant.fuse import _concat, _split

    _, layer, calib = _layer("int4", act_fmt, n=96)
    layer.backend = "triton"
    parts = _split(layer, [32, 32, 32])  # three layers sharing s, L_down and S
    fused = _concat(parts)
    x = calib[:19]
    y = fused(x)
    for ref_y in (torch.cat([p(x) for p in parts], dim=-1), layer(x)):
        if DEVICE == "cpu":
            assert torch.equal(y, ref_y)
        else:  # the GEMM autotunes per N: its tiles (and fp32 sum order) may differ
            assert rel_err(y, ref_y) <= TOL


@pytest.mark.parametrize(("fmt", "act_fmt"), ENGINE_CASES)
@pytest.mark.parametrize("m", [3, 257])
def test_layer_triton_matches_engine_reference(fmt, act_fmt, m):
    """backend="triton" computes exactly what ``svdq_linear_fp8_ref`` emulates."""
    _, layer, calib = _layer(fmt, act_fmt)
    x = calib[:m].reshape(1, m, -1)
    layer.backend = "triton"
    y = layer(x)
    s = ref.act_scale_from_amax(layer.act_amax)
    y_ref = ref.svdq_linear_fp8_ref(
        x, layer.qweight, layer.wscales, layer.wtensor_scale, layer.smooth, s,
        layer.lowrank_down, layer.lowrank_up, layer.bias, fmt, act_fmt,
    )  # fmt: skip
    assert y.shape == (1, m, 130) and y.dtype == x.dtype
    assert rel_err(y, y_ref) <= TOL


@pytest.mark.parametrize(("fmt", "act_fmt"), [*ENGINE_CASES, ("int4", "none"), ("nvfp4", "none")])
def test_layer_triton_vs_reference_backend(fmt, act_fmt):
    """The engine against the paper-exact reference: the fp8-container difference.

    W4A16 (``none``) has no containers: the two backends agree to bf16 rounding. W4A4 and
    W4A8 round the activation operand (and the widened weight) to fp8 E4M3, 3 mantissa
    bits: at most 1/16 relative per element, about 2% rms, and W4A8 uses a static scale
    where the reference scales per token. Over a dot product of K terms these independent
    roundings average out, so the layers differ by ~2-3% of the output (measured
    0.018-0.025 here), small against the quantization error itself (~0.05-0.09), which
    the engine raises by at most 10%.
    """
    lin, layer, calib = _layer(fmt, act_fmt)
    x = calib[:257] if act_fmt != "none" else calib[:4]
    layer.backend = "reference"
    y_ref = layer(x)
    layer.backend = "triton"
    y = layer(x)
    y16 = lin(x)
    if act_fmt == "none":
        assert rel_err(y, y_ref) <= TOL
    else:
        assert rel_err(y, y_ref) < 0.05
        assert rel_err(y, y16) < 1.1 * rel_err(y_ref, y16)


@pytest.mark.parametrize("act_fmt", ["int4", "fp8"])
def test_fused_mlp_matches_unfused(act_fmt):
    """svdq_mlp_triton = fc2(gelu_tanh(fc1(x))) on the engine, without the 16-bit middle."""
    g = _gen(11)
    fc1 = torch.nn.Linear(96, 192).to(DEVICE, torch.bfloat16)
    fc2 = torch.nn.Linear(192, 80).to(DEVICE, torch.bfloat16)
    x = (torch.randn(300, 96, generator=g) * 2).to(DEVICE, torch.bfloat16)
    h = torch.nn.functional.gelu(fc1(x), approximate="tanh")
    opts = dict(fmt="int4", act_fmt=act_fmt, rank=8, alpha=0.5)
    q1, q2 = svdquant.quantize_linear(fc1, x, **opts), svdquant.quantize_linear(fc2, h, **opts)
    q1.backend = q2.backend = "triton"
    x3 = x[:257].reshape(1, 257, 96)
    y = svdquant.kernels.svdq_mlp_triton(x3, q1, q2)
    y_unfused = q2(torch.nn.functional.gelu(q1(x3), approximate="tanh"))
    assert y.shape == (1, 257, 80)
    assert rel_err(y, y_unfused) <= TOL


def _mlp_pair(k: int, hidden: int, n: int, rows: int, rank: int, seed: int):
    """An input [rows, k] and a quantized MLP pair k -> hidden -> n (GELU-tanh between),
    each layer calibrated on its own input."""
    g = _gen(seed)
    fc1 = torch.nn.Linear(k, hidden).to(DEVICE, torch.bfloat16)
    fc2 = torch.nn.Linear(hidden, n).to(DEVICE, torch.bfloat16)
    x = torch.randn(rows, k, generator=g).to(DEVICE, torch.bfloat16)
    h = torch.nn.functional.gelu(fc1(x), approximate="tanh")
    q1 = svdquant.quantize_linear(fc1, x, rank=rank, alpha=0.5)
    q2 = svdquant.quantize_linear(fc2, h, rank=rank, alpha=0.5)
    return x, q1, q2


def test_fused_mlp_runs_apart_past_its_next_rank(monkeypatch):
    """``ops.MLP_NEXT_MAX_RANK``: an fc2 whose rank (a LoRA stacked on it) passes it runs
    apart — fc1, the activation in fc1's dtype, fc2 — the unfused modules' numbers; at or
    below it, the fused pair."""
    from svdquant.kernels import ops

    x, q1, q2 = _mlp_pair(64, 128, 48, rows=70, rank=8, seed=14)
    q1.backend = q2.backend = "triton"
    pairs = _count_calls(monkeypatch, ops, "_fused_pair")
    fused = ops.svdq_mlp_triton(x, q1, q2)
    monkeypatch.setattr(ops, "MLP_NEXT_MAX_RANK", 8)  # fc2's rank 8: still fused
    assert torch.equal(ops.svdq_mlp_triton(x, q1, q2), fused) and len(pairs) == 2
    monkeypatch.setattr(ops, "MLP_NEXT_MAX_RANK", 4)
    monkeypatch.setattr(ops, "ACT_IN_GEMM", False)
    apart = ops.svdq_mlp_triton(x, q1, q2)
    assert len(pairs) == 2
    assert torch.equal(apart, q2(torch.nn.functional.gelu(q1(x), approximate="tanh")))
    assert rel_err(apart, fused) <= TOL
    monkeypatch.setattr(ops, "ACT_IN_GEMM", True)  # (fc1's GELU in its GEMM's epilogue)
    assert rel_err(ops.svdq_mlp_triton(x, q1, q2), apart) <= TOL and len(pairs) == 2
    with pytest.raises(ValueError, match="unknown activation"):
        ops.svdq_mlp_triton(x, q1, q2, "relu6")


def test_fused_mlp_compiles_fullgraph():
    x, q1, q2 = _mlp_pair(64, 128, 64, rows=40, rank=4, seed=12)
    mlp = lambda t: svdquant.kernels.svdq_mlp_triton(t, q1, q2)  # noqa: E731
    torch._dynamo.reset()
    assert torch.equal(torch.compile(mlp, fullgraph=True, backend="aot_eager")(x), mlp(x))


def test_act_scale_is_computed_once_per_value():
    """The engine keeps S = act_amax / 224 per value of the buffer: the same tensor while
    the buffer is unchanged, a new one after an in-place update (``load_state_dict``)."""
    from svdquant.kernels import ops

    a = torch.tensor(448.0, device=DEVICE)
    s1 = ops._act_scale(a)
    assert s1 is ops._act_scale(a) and torch.equal(s1, ref.act_scale_from_amax(a))
    a.copy_(torch.tensor(224.0))
    s2 = ops._act_scale(a)
    assert s2 is not s1 and s2.item() == 1.0
    with torch.inference_mode():  # no version counter: computed every time
        b = torch.tensor(0.0, device=DEVICE)
    assert ops._act_scale(b).item() == 1.0
    # a layer whose calibration max is loaded again computes with the new scale
    _, layer, calib = _layer("int4", "int4", k=64, n=48)
    layer.backend = "triton"
    x = calib[:5]
    y1 = layer(x)
    state = layer.state_dict()
    state["act_amax"] = state["act_amax"] * 0.3  # not a power of two; some saturate
    layer.load_state_dict(state)
    y2 = layer(x)
    y_ref = ref.svdq_linear_fp8_ref(
        x, layer.qweight, layer.wscales, layer.wtensor_scale, layer.smooth,
        ref.act_scale_from_amax(layer.act_amax), layer.lowrank_down, layer.lowrank_up,
        layer.bias, "int4", "int4",
    )  # fmt: skip
    assert not torch.equal(y1, y2) and rel_err(y2, y_ref) <= TOL


def test_auto_backend_is_reference_on_cpu():
    layer = svdquant.SVDQLinear(64, 32)
    assert svdquant.kernels.resolve_backend(layer.backend, torch.device("cpu")) == "reference"


@pytest.fixture
def two_gpus(monkeypatch):
    """Two pretend CUDA GPUs for the backend choice: 0 a Hopper, 1 an Ampere (no fp8)."""
    kernels = svdquant.kernels
    monkeypatch.setattr(kernels, "_capability", {0: (9, 0), 1: (8, 0)}.__getitem__)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["NVIDIA H100", "NVIDIA A100"][i])
    monkeypatch.setattr(kernels, "_warned", set())
    return torch.device("cuda", 0), torch.device("cuda", 1)


def test_backend_needs_a_gpu_with_fp8(two_gpus):
    """``auto`` runs the engine on GPUs with fp8 E4M3 (compute capability 8.9+) and the
    reference on older ones, warning once; ``triton`` on an older GPU is a clear error,
    not Triton's compile error at the first forward."""
    import warnings

    resolve = svdquant.kernels.resolve_backend
    hopper, ampere = two_gpus
    assert resolve("auto", hopper) == "triton" and resolve("triton", hopper) == "triton"
    with pytest.warns(UserWarning, match=r"A100 \(compute capability 8\.0\) runs the exact"):
        assert resolve("auto", ampere) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per GPU
        assert resolve("auto", ampere) == "reference"
    with pytest.raises(RuntimeError, match=r"8\.9 or later.*A100.*use backend='auto'"):
        resolve("triton", ampere)
    assert resolve("reference", ampere) == "reference"


def test_backend_choice_is_a_constant_under_compile(two_gpus):
    """The capability check runs when torch.compile traces, not in the graph: a
    ``fullgraph=True`` compile of a forward that asks for the backend does not break."""
    resolve = svdquant.kernels.resolve_backend
    hopper, ampere = two_gpus

    def f(x):
        return x + 1 if resolve("auto", hopper) == "triton" else x + 2, resolve("auto", ampere)

    y, chosen = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2))
    assert torch.equal(y, torch.ones(2)) and chosen == "reference"


def test_host_integer_helpers_match_triton():
    """The launchers' ``cdiv`` / ``next_pow2`` (plain Python) give triton's values."""
    import triton

    from svdquant.kernels._triton_common import cdiv, next_pow2

    for n in range(0, 1100):
        assert next_pow2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 64, 128, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d)


def test_gemm_after_its_first_call_skips_the_autotuner(monkeypatch):
    """The GEMM's tile is tuned on a shape's first call and kept (``gemm._PICKED``): the
    next call launches the kernel itself with it — same output — and ``clear_tuning``
    forgets it."""
    from svdquant.kernels import gemm

    args = _small_gemm_args()
    gemm.clear_tuning()
    first = fp8_gemm(*args)
    assert len(gemm._PICKED) == 1

    def no_autotuner(*a, **k):
        raise AssertionError("the autotuner ran again")

    monkeypatch.setattr(gemm._fp8_gemm_kernel, "run", no_autotuner)
    assert torch.equal(fp8_gemm(*args), first)
    gemm.clear_tuning()
    assert not gemm._PICKED and not gemm._fp8_gemm_kernel.cache
    with pytest.raises(AssertionError, match="autotuner ran again"):
        fp8_gemm(*args)


def _small_gemm_args():
    _, layer, calib = _layer("int4", "int4", k=128, n=48)
    s = ref.act_scale_from_amax(layer.act_amax)
    xq, lora = quantize_act(calib[:9], layer.smooth, layer.lowrank_down, s, 128, "int4")
    wq, s_ch = widen_weight(layer.qweight, layer.wscales, layer.wtensor_scale, "int4")
    return (xq, wq, s_ch, s, lora, layer.lowrank_up, layer.bias, torch.bfloat16)


def test_gemm_tiles_are_kept_on_disk(monkeypatch, tmp_path):
    """A tuned tile is written to the tile cache (``kernels/tile_cache.py``) and a new
    process launches with it untimed; a corrupt cache warns and is rewritten; an empty
    ``SVDQUANT_CACHE_DIR`` keeps nothing on disk; an unwritable one warns and tunes."""
    from svdquant.kernels import gemm, tile_cache

    monkeypatch.setenv("SVDQUANT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tile_cache, "_entries", None)
    monkeypatch.setattr(tile_cache, "_warned", False)
    args = _small_gemm_args()
    gemm.clear_tuning()
    first = fp8_gemm(*args)
    file = tile_cache.path()
    assert file.parent == tmp_path and len(json.loads(file.read_text())) == 1

    def no_autotuner(*a, **k):
        raise AssertionError("the autotuner ran")

    real_run = gemm._fp8_gemm_kernel.run
    monkeypatch.setattr(gemm._fp8_gemm_kernel, "run", no_autotuner)
    gemm._PICKED.clear()  # a new process: nothing in memory
    gemm._fp8_gemm_kernel.cache.clear()
    tile_cache._entries = None
    assert torch.equal(fp8_gemm(*args), first)
    monkeypatch.setattr(gemm._fp8_gemm_kernel, "run", real_run)

    file.write_text("{not json")
    gemm._PICKED.clear()
    tile_cache._entries = None
    with pytest.warns(UserWarning, match="could not read the GEMM's tile cache"):
        assert torch.equal(fp8_gemm(*args), first)
    assert len(json.loads(file.read_text())) == 1  # rewritten whole

    monkeypatch.setenv("SVDQUANT_CACHE_DIR", "")
    gemm.clear_tuning()
    fp8_gemm(*args)
    assert tile_cache.path() is None and not list(tmp_path.glob("*.tmp"))

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("SVDQUANT_CACHE_DIR", str(blocked / "sub"))  # a path under a file
    gemm.clear_tuning()
    monkeypatch.setattr(tile_cache, "_warned", False)
    with pytest.warns(UserWarning, match="could not (read|write) the GEMM.s tile cache"):
        assert torch.equal(fp8_gemm(*args), first)


def test_eager_calls_skip_the_dispatcher(monkeypatch):
    """An eager layer call runs the ops' implementations directly (the dispatcher costs
    host time on every call), tracing and tensor subclasses get the registered ops — and
    the layer gives the same outputs both ways."""
    from svdquant.kernels import ops

    x = torch.randn(5, 64, device=DEVICE)
    assert ops._ops(x) is ops._EAGER
    assert ops._ops(torch.nn.Parameter(x)) is torch.ops.svdquant
    for name in ("quantize_and_widen", "fp8_gemm", "w4a16_linear", "fp8_gemm_split"):
        assert callable(getattr(ops._EAGER, name))
        assert hasattr(torch.ops.svdquant, name)
    _, layer, calib = _layer("int4", "int4", k=128, n=48)
    layer.backend = "triton"
    fc2 = _layer("int4", "int4", k=48, n=40)[1]
    fc2.backend = "triton"
    eager = (layer(calib[:33]), ops.svdq_mlp_triton(calib[:33], layer, fc2))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ops._ops(x) is torch.ops.svdquant
    dispatched = (layer(calib[:33]), ops.svdq_mlp_triton(calib[:33], layer, fc2))
    for a, b in zip(eager, dispatched, strict=True):
        assert rel_err(a, b) < 1e-6  # (the low-rank sums meet through atomics on a GPU)


def test_custom_ops_opcheck():
    """Schemas, fake implementations and real ones agree (torch.library.opcheck)."""
    _, layer, calib = _layer("int4", "int4", k=128, n=48)
    x = calib[:17]
    s = ref.act_scale_from_amax(layer.act_amax)
    ops = torch.ops.svdquant
    xq, lora = quantize_act(x, layer.smooth, layer.lowrank_down, s, 128, "int4")
    wq, s_ch = widen_weight(layer.qweight, layer.wscales, layer.wtensor_scale, "int4")
    w = (layer.qweight, layer.wscales, layer.wtensor_scale)
    cases = [
        (ops.quantize_act.default, (x, layer.smooth, layer.lowrank_down, s, 128, "int4")),
        (ops.widen_weight.default, (*w, "int4")),
        (
            ops.quantize_and_widen.default,
            (x, layer.smooth, layer.lowrank_down, s, 128, "int4", *w, "int4"),
        ),
        (ops.fp8_gemm.default, (xq, wq, s_ch, s, lora, layer.lowrank_up, layer.bias, x.dtype)),
        (
            ops.w4a16_linear.default,
            (x[:2], *w, layer.smooth, layer.lowrank_down, layer.lowrank_up, layer.bias, "int4"),
        ),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils="test_faketensor")
    # test_schema compares outputs arithmetically, which torch cannot do on fp8 tensors
    torch.library.opcheck(*cases[-1], test_utils="test_schema")


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("widen_first", [False, True])
@pytest.mark.parametrize("ws_quantize", [False, True])
def test_quantize_and_widen_is_the_two_ops(monkeypatch, fmt, widen_first, ws_quantize):
    """One op, two adjacent launches (on Hopper the widen is the quantize's programmatic
    dependent, or with ``WIDEN_FIRST`` the other way round, into buffers allocated before
    both): what the quantize and the widen give apart — called eagerly and, on a GPU,
    replayed from a CUDA graph (where the dependency is a graph edge). The overlap is
    forced on for these 77 rows (by default it starts at ``OVERLAP_MIN_M``). With
    ``quantize.WS_QUANTIZE`` the quantize beside the widen is the Gluon kernel where it
    runs (sm_90; elsewhere the switch changes nothing)."""
    from svdquant.kernels import quantize as qmod

    monkeypatch.setattr(svdquant.kernels.ops, "OVERLAP_MIN_M", 0)
    monkeypatch.setattr(svdquant.kernels.ops, "WIDEN_FIRST", widen_first)
    _, layer, calib = _layer(fmt, "int4", k=320, n=300, rank=16)
    x = calib[:77]
    s = ref.act_scale_from_amax(layer.act_amax)
    w = (layer.qweight, layer.wscales, layer.wtensor_scale)
    args = (x, layer.smooth, layer.lowrank_down, s, 320, "int4", *w, fmt)
    xq, lora = quantize_act(x, layer.smooth, layer.lowrank_down, s, 320, "int4")
    monkeypatch.setattr(qmod, "WS_QUANTIZE", ws_quantize)
    monkeypatch.setattr(qmod, "WS_QUANTIZE_MIN_M", 0)  # (these 77 rows on it too)
    wq, s_ch = widen_weight(*w, fmt)
    outs = [torch.ops.svdquant.quantize_and_widen(*args)]
    if x.is_cuda:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = torch.ops.svdquant.quantize_and_widen(*args)
        for t in static:
            t.zero_()
        graph.replay()
        torch.cuda.synchronize()
        outs.append(static)
    for got in outs:
        assert torch.equal(got[0].view(torch.uint8), xq.view(torch.uint8))
        assert torch.equal(got[3], s_ch)
        # (the low-rank partial sums meet through atomics on the GPU: any order)
        assert torch.allclose(got[1], lora, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[2].view(torch.uint8), wq.view(torch.uint8))


@pytest.mark.parametrize("case", ["k_split", "one_split", "wide_route"])
def test_quantize_and_widen_zeroes_only_sums_that_accumulate(monkeypatch, case):
    """The widen-first overlap allocates the quantize's buffers before both launches and
    zeroes the low-rank sums only where programs along K may add into them
    (``quantize.sums_accumulate``: planned for wide ranks, assumed for the others):
    otherwise every column is written once — one program along K, or a wide rank's cuBLAS
    sums — and buffers as they come (NaN here) are fine."""
    from svdquant.kernels import ops
    from svdquant.kernels import quantize as qmod

    monkeypatch.setattr(ops, "OVERLAP_MIN_M", 0)
    monkeypatch.setattr(ops, "WIDEN_FIRST", True)
    monkeypatch.setattr(qmod, "WIDE_BY_MM", True)
    like = ops._quantized_like

    def poisoned(x, lowrank_down, k_out):
        xq, lora = like(x, lowrank_down, k_out)
        return xq, lora.fill_(float("nan"))

    monkeypatch.setattr(ops, "_quantized_like", poisoned)
    if case == "one_split":
        monkeypatch.setattr(qmod, "PROGRAMS_PER_SM", 0)  # one program along K
    rank = {"k_split": 16, "one_split": 96, "wide_route": 160}[case]  # 96: two parts, no route
    _, layer, calib = _layer("int4", "int4", k=320, n=300, rank=rank)
    x = calib[:300]
    s = ref.act_scale_from_amax(layer.act_amax)
    w = (layer.qweight, layer.wscales, layer.wtensor_scale)
    assert qmod.sums_accumulate(x, layer.lowrank_down, 320) == (case == "k_split")
    assert qmod.sums_accumulate(x, layer.lowrank_down[:16], 320)  # a small rank: assumed
    xq, lora = quantize_act(x, layer.smooth, layer.lowrank_down, s, 320, "int4")
    got = ops.quantize_and_widen(x, layer.smooth, layer.lowrank_down, s, 320, "int4", *w, "int4")
    assert torch.equal(got[0].view(torch.uint8), xq.view(torch.uint8))
    assert not got[1].isnan().any() and torch.allclose(got[1], lora, rtol=1e-5, atol=1e-6)


def test_quantize_act_checks_its_output_buffers():
    """``out`` buffers of the wrong shape or dtype are refused, not written past."""
    x = torch.randn(5, 64, device=DEVICE)
    s = torch.ones(64, device=DEVICE)
    down = torch.zeros(4, 64, device=DEVICE)
    act = torch.tensor(1.0, device=DEVICE)
    good = (
        torch.empty(5, 64, dtype=torch.float8_e4m3fn, device=DEVICE),
        torch.zeros(5, 4, device=DEVICE),
    )
    xq, lora = quantize_act(x, s, down, act, 64, "int4", out=good)
    assert xq is good[0] and lora is good[1]
    with pytest.raises(ValueError, match="out must be"):
        quantize_act(x, s, down, act, 64, "int4", out=(good[0][:4], good[1]))
    with pytest.raises(ValueError, match="out must be"):
        quantize_act(x, s, down, act, 64, "int4", out=(good[0], good[1].double()))


def test_quantize_and_widen_refuses_bad_input():
    """The combined op says what is wrong (as the quantize does) and leaves its inputs as
    they were: an activation format the engine does not quantize, a smoothing vector of
    the wrong length."""
    _, layer, calib = _layer("int4", "int4", k=128, n=48)
    x = calib[:5]
    s = ref.act_scale_from_amax(layer.act_amax)
    w = (layer.qweight, layer.wscales, layer.wtensor_scale)
    before = [t.clone() for t in (x, layer.smooth, *w)]
    with pytest.raises(ValueError, match="int4 or fp8"):
        torch.ops.svdquant.quantize_and_widen(
            x, layer.smooth, layer.lowrank_down, s, 128, "nvfp4", *w, "int4"
        )
    with pytest.raises(ValueError, match="smooth has 127 entries"):
        torch.ops.svdquant.quantize_and_widen(
            x, layer.smooth[:127], layer.lowrank_down, s, 128, "int4", *w, "int4"
        )
    after = (x, layer.smooth, *w)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("act_fmt", ["int4", "none"])
def test_compile_fullgraph_matches_eager(act_fmt):
    """torch.compile(fullgraph=True): the custom ops trace with no graph break."""
    _, layer, calib = _layer("int4", act_fmt, k=128, n=48)
    layer.backend = "triton"
    x = calib[:2] if act_fmt == "none" else calib[:33]
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))


# --- larger sweeps on the GPU -----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 257, 1024])
@pytest.mark.parametrize(("n", "k"), [(130, 333), (3072, 3072), (1000, 1000)])
@pytest.mark.parametrize(("fmt", "act_fmt"), ENGINE_CASES)
def test_gpu_layer_pipeline_matches_reference(m, n, k, fmt, act_fmt):
    dtype = torch.bfloat16
    x = _acts(m, k, dtype)
    q = _weight(n, k, fmt)
    s = _smooth(k)
    down, up = _lowrank(n, k, 32, dtype)
    b = torch.randn(n, generator=_gen(5)).to(DEVICE, dtype)
    act_scale = ref.act_scale_from_amax((x.float() / s).abs().amax())
    kp = q.packed.shape[1] * 2
    xq, lora = quantize_act(x, s, down, act_scale, kp, act_fmt)
    xq_ref, lora_ref = ref.quantize_act_ref(x, s, down, act_scale, kp, act_fmt)
    assert fp8_close(xq, xq_ref)
    assert rel_err(lora, lora_ref) < 1e-5
    wq, s_ch = widen_weight(q.packed, q.scales, q.tensor_scale, fmt)
    wq_ref, s_ref = ref.widen_weight_ref(q.packed, q.scales, q.tensor_scale, fmt)
    assert fp8_close(wq, wq_ref) and torch.allclose(s_ch, s_ref, rtol=1e-6, atol=0)
    y = fp8_gemm(xq, wq, s_ch, act_scale, lora, up, b, dtype)
    assert rel_err(y, ref.fp8_gemm_ref(xq, wq, s_ch, act_scale, lora, up, b, dtype)) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "h", "k", "r"), [
    (1, 64, 128, 8), (3, 136, 200, 32), (257, 5120, 1280, 32), (1024, 5120, 1280, 32),
    (4096, 2560, 640, 32), (4608, 3000, 1000, 0),
])  # fmt: skip
@pytest.mark.parametrize("act_fmt2", ["int4", "fp8"])
def test_gpu_fp8_gemm_gated_next_matches_reference(m, h, k, r, act_fmt2):
    """The gated up projection on the GPU, SDXL's GEGLU shapes (C = 640 / 1280) among
    them (``_check_gated_next``: against the reference on the GPU's own up projection)."""
    from svdquant.kernels.gemm_gated import fp8_gemm_gated_next

    args = _gated_next_args(m, h, k, r, "gelu", act_fmt2, True)
    _check_gated_next(args, *fp8_gemm_gated_next(*args))


@pytest.mark.gpu
def test_gpu_gemm_tuning_waits_for_the_work_queued_before_it():
    """A shape's first call times the candidate tiles on a stream of Triton's own: it must
    wait for the kernels already queued on ours, or the candidates write the output's
    memory while an earlier kernel still reads what the allocator had there (v41: a
    model's first call on a new machine came out different, at times NaN)."""
    from svdquant.kernels import gemm

    m, n, k = 512, 1024, 1024
    args = _gemm_args(m, n, k, seed=5, r=16)
    expected = ref.fp8_gemm_ref(*args)
    for _ in range(3):
        gemm.clear_tuning()
        held = torch.ones(m, n, dtype=torch.bfloat16, device="cuda")  # the output's size
        torch.cuda._sleep(100_000_000)  # ~50 ms of queued work before the sum reads it
        total = held.sum(dtype=torch.float32)
        del held  # its memory is free for the GEMM's output, in our stream's order
        y = fp8_gemm(*args)
        assert total.item() == m * n
        assert rel_err(y, expected) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 257, 4608])
@pytest.mark.parametrize(("n", "k", "r"), [(130, 333, 7), (3072, 3072, 32), (1000, 1000, 0)])
@pytest.mark.parametrize("tma", [True, False])
def test_gpu_fp8_gemm_matches_reference(monkeypatch, m, n, k, r, tma):
    """The GEMM + low-rank + bias against the reference on the GPU, operands through
    tensor descriptors (from ``TMA_MIN_M`` rows) or pointer loads, the split-K tail where
    the shape takes it."""
    from svdquant.kernels import gemm

    monkeypatch.setattr(gemm, "TMA_LOADS", tma)
    args = _gemm_args(m, n, k, seed=m + n, r=r)
    assert rel_err(fp8_gemm(*args), ref.fp8_gemm_ref(*args)) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 257, 4608])
@pytest.mark.parametrize("r", [288, 544])
def test_gpu_fp8_gemm_adds_a_wide_branch_apart(m, r):
    """Past ``gemm.MAX_EPILOGUE_RANK`` on the GPU (rank 544 in the epilogue ran out of
    shared memory): the reference's output."""
    args = _gemm_args(m, 3072, 3072, seed=m + r, r=r)
    assert rel_err(fp8_gemm(*args), ref.fp8_gemm_ref(*args)) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 257, 4608])
@pytest.mark.parametrize(("n", "k", "r"), [(136, 336, 16), (3072, 3072, 32), (1000, 1008, 0),
                                          (264, 3072, 64), (520, 3072, 48), (136, 112, 16),
                                          (264, 240, 32), (264, 3072, 96), (1000, 1008, 128),
                                          (3072, 3072, 160), (520, 336, 256),
                                          (136, 240, 80)])  # fmt: skip
@pytest.mark.parametrize(("bias", "dtype"), [(True, torch.bfloat16), (False, torch.bfloat16),
                                             (True, torch.float16)])  # fmt: skip
def test_gpu_fp8_gemm_ws_matches_reference(monkeypatch, m, n, k, r, bias, dtype):
    """The warp-specialized Gluon GEMM (sm_90) against the reference: rows and columns
    that are not multiples of its tile, ranks 0, 16, 32 and 64, 48 (its low-rank rows
    copied under a column mask) and 80-256 in chunks of 64 (``gemm_ws.CHUNK_RANKS``, the
    last chunk masked where the rank is no multiple of 64), with and without a bias, a
    bf16 and an fp16 model; K of one, two and many steps."""
    from svdquant.kernels import gemm_ws

    if not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    monkeypatch.setattr(gemm_ws, "CHUNK_RANKS", True)
    args = list(_gemm_args(m, n, k, seed=m + n + r, r=r))
    args[5], args[6], args[7] = args[5].to(dtype), args[6].to(dtype) if bias else None, dtype
    assert rel_err(gemm_ws.fp8_gemm_ws(*args), ref.fp8_gemm_ref(*args)) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [pytest.param(t, id=tile_name(t)) for t in CANDIDATE_TILES])
@pytest.mark.parametrize("m", [3, 257, 4608])
@pytest.mark.parametrize(("n", "k", "r"), [(136, 336, 16), (1000, 1008, 0), (520, 3072, 48),
                                          (264, 240, 32), (640, 640, 64)])  # fmt: skip
def test_gpu_fp8_gemm_ws_tiles_match_reference(monkeypatch, tile, m, n, k, r):
    """Every candidate tile of the warp-specialized GEMM (one and two MMA warpgroups, 64-
    and 128-row tiles, 128 and 256 columns, two MMA partitions in turn) against the
    reference, and its split output; a rank the tile cannot hold runs on one that can
    (``pick_tile``). M = 4608 walks several tiles a program: the ping-ponged partitions'
    turns (v45: launch failures there before they took turns)."""
    from svdquant.kernels import gemm_ws

    if not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    monkeypatch.setattr(gemm_ws, "TILE_OVERRIDE", tile)
    args = _gemm_args(m, n, k, seed=m + n + r, r=r)
    want = ref.fp8_gemm_ref(*args)
    assert rel_err(gemm_ws.fp8_gemm_ws(*args), want) <= TOL
    if n > 256:
        flat = gemm_ws.fp8_gemm_ws_split(*args, [256, n - 256])
        got = torch.cat([flat[: m * 256].view(m, 256), flat[m * 256 :].view(m, n - 256)], 1)
        assert rel_err(got, want) <= TOL


def test_gemm_ws_pick_tile_takes_only_tiles_that_fit(monkeypatch):
    """``pick_tile``: the override where it holds the rank's operands (above rank 32 the
    fp32 low-rank rows live in the store buffer: 4 · BR columns), else the cost model's
    cheapest tile that does — which at v45's measured shapes is what was fastest."""
    from svdquant.kernels import gemm_ws

    small, default = (64, 128, 6, 4, 1), gemm_ws.DEFAULT_TILE
    assert gemm_ws.tile_fits(default, 64)
    assert gemm_ws.tile_fits(small, 32) and not gemm_ws.tile_fits(small, 48)
    assert not gemm_ws.tile_fits((64, 128, 3, 8, 1), 16)  # 64 rows are one warpgroup's
    assert not gemm_ws.tile_fits((128, 128, 4, 8, 2), 16)  # a partition is one warpgroup
    assert all(gemm_ws.tile_fits(t, 32) for t in gemm_ws.CANDIDATE_TILES)
    assert set(gemm_ws.TILE_COSTS) <= set(gemm_ws.CANDIDATE_TILES)
    monkeypatch.setattr(gemm_ws, "TILE_OVERRIDE", small)
    assert gemm_ws.pick_tile(1024, 1152, 1152, 32, 132) == small
    assert gemm_ws.pick_tile(1024, 1152, 1152, 64, 132) == default  # the model's, rank 64
    monkeypatch.setattr(gemm_ws, "TILE_OVERRIDE", None)
    # v45 (H200): few 128 x 256 tiles -> a smaller tile; several tiles a program at small
    # K -> two partitions in turn; many tiles of large K -> the default
    assert gemm_ws.pick_tile(1024, 1280, 5120, 32, 132) == (128, 128, 4, 4, 1)
    assert gemm_ws.pick_tile(512, 3072, 12288, 32, 132) == (128, 128, 4, 4, 1)
    assert gemm_ws.pick_tile(4096, 3456, 1152, 32, 132) == (128, 128, 4, 4, 2)
    assert gemm_ws.pick_tile(4096, 1152, 1152, 32, 132) == (64, 128, 6, 4, 2)
    assert gemm_ws.pick_tile(4608, 21504, 3072, 32, 132) == default
    assert gemm_ws.pick_tile(1024, 11200, 2240, 32, 132) == default
    assert gemm_ws.pick_tile(512, 3072, 12288, 64, 132) == default  # rank 64: only it fits
    # an epilogue writing the next layer's input: eight warps share it (v46, H200)
    assert gemm_ws.pick_tile(4096, 4608, 1152, 32, 132, next_layer=True) == gemm_ws.NEXT_TILE
    assert gemm_ws.tile_fits(gemm_ws.NEXT_TILE, 64)
    monkeypatch.setattr(gemm_ws, "PINGPONG", False)  # the A/B switch: one partition only
    assert gemm_ws.pick_tile(4096, 3456, 1152, 32, 132) == (128, 128, 4, 4, 1)
    monkeypatch.setattr(gemm_ws, "TILE_OVERRIDE", (128, 256, 3, 8))  # v44's four fields
    with pytest.raises(ValueError, match="add 1, one partition"):
        gemm_ws.pick_tile(4096, 3456, 1152, 32, 132)


def test_gemm_ws_chunked_ranks_policy(monkeypatch):
    """``gemm_ws.CHUNK_RANKS``: ranks over 64 (multiples of 16, up to 256) taken in chunks
    of 64 through rank 64's buffers — only by tiles that hold rank 64 — and not without
    the switch; ``RANKS`` as before."""
    from svdquant.kernels import gemm_ws

    bf = torch.bfloat16
    assert gemm_ws.CHUNK_RANKS  # (on by default)
    monkeypatch.setattr(gemm_ws, "CHUNK_RANKS", False)
    assert not gemm_ws.supports(3072, 3072, 128, bf, bf)
    assert gemm_ws.rank_chunks(160) == (256, 1) and gemm_ws.rank_chunks(48) == (64, 1)
    monkeypatch.setattr(gemm_ws, "CHUNK_RANKS", True)
    for r, want in ((48, (64, 1)), (64, (64, 1)), (80, (64, 2)), (96, (64, 2)),
                    (128, (64, 2)), (160, (64, 3)), (256, (64, 4)), (32, (32, 1))):  # fmt: skip
        assert gemm_ws.rank_chunks(r) == want
    assert all(gemm_ws.supports(3072, 3072, r, bf, bf) for r in (80, 96, 128, 160, 192, 256))
    assert not any(gemm_ws.supports(3072, 3072, r, bf, bf) for r in (36, 100, 272, 512))
    for t in gemm_ws.CANDIDATE_TILES:
        assert gemm_ws.tile_fits(t, 160) == gemm_ws.tile_fits(t, 64)
    pick = gemm_ws.pick_tile
    assert pick(4096, 3072, 3072, 160, 132) == pick(4096, 3072, 3072, 64, 132)
    # the next-layer epilogue keeps the Triton kernel for chunked ranks (v55: no faster)
    assert gemm_ws.supports_next(12288, 3072, 64, 32, 12288, bf, bf)
    assert not gemm_ws.supports_next(12288, 3072, 96, 32, 12288, bf, bf)


def test_gemm_ws_pingpong_tiles_fit_shared_memory():
    """The ping-ponged tiles: two MMA partitions, each with its own epilogue buffers —
    a tile whose two sets no longer fit shared memory is not taken (the estimate within
    1.1 KB of what triton 3.6 allocates, ``sass_report``); names as the probe's."""
    from svdquant.kernels import gemm_ws

    assert gemm_ws._smem_bytes((128, 128, 4, 4, 2), 32) == 229376  # compiled: 230472
    assert gemm_ws.tile_fits((128, 128, 4, 4, 2), 32)
    assert gemm_ws.tile_fits((64, 128, 6, 4, 2), 32)
    assert not gemm_ws.tile_fits((64, 256, 4, 4, 2), 32)  # two 64 x 256 epilogues: 248 KB
    assert not gemm_ws.tile_fits((128, 128, 4, 4, 2), 48)  # rank 64's rows: BLOCK_N 256
    names = [gemm_ws.tile_name(t) for t in gemm_ws.CANDIDATE_TILES]
    assert len(set(names)) == len(names) and "128x128x4x4pp" in names


@pytest.mark.gpu
@pytest.mark.parametrize("r", [96, 160])
def test_gpu_fp8_gemm_hands_chunked_ranks_to_gemm_ws(monkeypatch, r):
    """With ``CHUNK_RANKS`` ``fp8_gemm`` runs a rank over 64 on the Gluon kernel."""
    from svdquant.kernels import gemm_ws

    if not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    monkeypatch.setattr(gemm_ws, "CHUNK_RANKS", True)
    calls = _count_calls(monkeypatch, gemm_ws, "fp8_gemm_ws")
    args = _gemm_args(4096, 3072, 3072, seed=r, r=r)
    assert rel_err(fp8_gemm(*args), ref.fp8_gemm_ref(*args)) <= TOL
    assert calls


WS_CASES = [(4608, 3072, 3072, 32, True), (511, 3072, 3072, 32, False),
            (512, 3072, 3072, 32, True),
            (4608, 3072, 12288, 32, False), (4608, 100, 3072, 32, False),
            (4608, 3072, 3072, 64, True), (1024, 3072, 3072, 128, True),
            (1024, 3072, 3072, 100, False),
            (4096, 3072, 12288, 32, True)]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "n", "k", "r", "ws"), WS_CASES)
def test_gpu_fp8_gemm_hands_large_shapes_to_gemm_ws(monkeypatch, m, n, k, r, ws):
    """``fp8_gemm`` runs the Gluon kernel from ``WS_MIN_M`` rows where it takes the shape
    and the split-K tail does not pay, else its own (a base rank with a LoRA on top:
    64 fits its shared memory, 128 in chunks of 64 — ``CHUNK_RANKS`` —, 100 neither: not a
    multiple of 16); the numbers are the reference's either
    way."""
    from svdquant.kernels import gemm_ws

    if not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    calls = _count_calls(monkeypatch, gemm_ws, "fp8_gemm_ws")
    args = _gemm_args(m, n, k, seed=m + n, r=r)
    assert rel_err(fp8_gemm(*args), ref.fp8_gemm_ref(*args)) <= TOL
    assert bool(calls) == ws


WS_SPLITS = [(1, [256, 512, 256, 296]), (300, [512, 136]), (1100, [3072, 3072, 3072]),
             (4608, [256, 3072])]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "sizes"), WS_SPLITS)
def test_gpu_fp8_gemm_ws_split_writes_each_segment_contiguous(monkeypatch, m, sizes):
    """The Gluon GEMM's split output (one TMA descriptor per segment): segment i of the
    flat buffer is columns [c_i, c_i + sizes[i]) of its plain output, value for value, and
    ``fp8_gemm_split`` hands over to it where ``fp8_gemm`` would."""
    from svdquant.kernels import gemm, gemm_ws

    if not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    n, k = sum(sizes), 3072
    args = _gemm_args(m, n, k, seed=m + n, r=32)
    y = gemm_ws.fp8_gemm_ws(*args)
    assert rel_err(y, ref.fp8_gemm_ref(*args)) <= TOL
    calls = _count_calls(monkeypatch, gemm_ws, "fp8_gemm_ws_split")
    monkeypatch.setattr(gemm, "WS_MIN_M", 1)
    flat = fp8_gemm_split(*args, sizes)
    assert calls
    start = 0
    for w in sizes:
        assert torch.equal(flat[m * start : m * (start + w)].view(m, w), y[:, start : start + w])
        start += w
    with pytest.raises(ValueError, match="multiples of 256"):
        gemm_ws.fp8_gemm_ws_split(*args, [128, n - 128])


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "sizes"), [*WS_SPLITS, (4608, [3072, 3072, 3072, 12288])])
@pytest.mark.parametrize("ws", [False, True])
def test_gpu_fp8_gemm_split_applies_the_last_activation(monkeypatch, m, sizes, ws):
    """The split's last segment as its GELU-tanh on the GPU (FLUX's q/k/v/MLP: the MLP's
    GELU in the epilogue), on the Triton kernel and on gemm_ws: the other segments the
    plain split's, value for value; the last the activation of the plain one's."""
    from svdquant.kernels import gemm, gemm_ws

    monkeypatch.setattr(gemm, "WS_SPLIT", ws)
    monkeypatch.setattr(gemm, "WS_MIN_M", 1)
    n = sum(sizes)
    args = _gemm_args(m, n, 3072, seed=m + n, r=32)
    calls = _count_calls(monkeypatch, gemm_ws, "fp8_gemm_ws_split")
    plain = fp8_gemm_split(*args, sizes)
    flat = fp8_gemm_split(*args, sizes, None, "gelu_tanh")
    assert bool(calls) == ws  # (the GPU tests run on sm_90)
    last = m * (n - sizes[-1])
    assert torch.equal(flat[:last], plain[:last])
    want = ref.activation_ref(plain[last:], "gelu_tanh").to(plain.dtype)
    assert rel_err(flat[last:], want) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("m", [3, 257, 4608])
@pytest.mark.parametrize(("n", "r"), [(12288, 160), (1000, 32), (3072, 288)])
@pytest.mark.parametrize("activation", ["gelu_tanh", "silu"])
def test_gpu_fp8_gemm_applies_an_activation_as_written(m, n, r, activation):
    """``fp8_gemm(activation=...)`` on the GPU (gemm_ws from 512 rows, the Triton kernel
    below; a branch past the epilogues' rank after the GEMM): the reference's output."""
    args = _gemm_args(m, n, 3072, seed=m + n + r, r=r)
    assert rel_err(fp8_gemm(*args, activation), ref.fp8_gemm_ref(*args, activation)) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("ws", [False, True])
@pytest.mark.parametrize(
    ("m", "sizes", "parts"),
    [(4096, [3072, 3072, 3072], [32, 16, 16, 16]),
     (4096, [3072, 3072, 3072, 12288], [32, 16, 16, 16, 16]),
     (1100, [3072, 3072, 3072], [32, 4, 0, 12]), (7, [256, 512], [32, 8, 16]),
     (4096, [3072, 3072, 3072], [32, 64, 64, 64])],
)  # fmt: skip
def test_gpu_fp8_gemm_split_parts(monkeypatch, m, sizes, parts, ws):
    """A split's parts (each segment its shared prefix and own low-rank columns, a compact
    L_up) on the GPU, on the Triton kernel and on gemm_ws (``TAKES_PARTS``): the full
    L_up's product (``reference.expand_lowrank_parts``); a compact rank of 96 in chunks
    (``gemm_ws.CHUNK_RANKS``)."""
    from svdquant.kernels import gemm, gemm_ws

    if ws and not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    monkeypatch.setattr(gemm_ws, "TAKES_PARTS", ws)
    monkeypatch.setattr(gemm_ws, "CHUNK_RANKS", True)
    monkeypatch.setattr(gemm, "WS_MIN_M", 1 if ws else 1 << 30)
    monkeypatch.setattr(gemm, "TAIL_SPLIT", False)
    calls = _count_calls(monkeypatch, gemm_ws, "fp8_gemm_ws_split")
    n, k = sum(sizes), 3072
    xq, wq, s_ch, scale, _, _, b, dtype = _gemm_args(m, n, k, seed=m + n)
    g = _gen(n)
    lora = torch.randn(m, parts[0] + sum(parts[1:]), generator=g).to(DEVICE)
    up_rank = max(48, parts[0] + max(parts[1:]))
    compact = (torch.randn(n, up_rank, generator=g) * 0.1).to(DEVICE, dtype)
    full = ref.expand_lowrank_parts(compact, parts, sizes)
    flat = fp8_gemm_split(xq, wq, s_ch, scale, lora, compact, b, dtype, sizes, parts)
    assert bool(calls) == ws
    y_ref = ref.fp8_gemm_ref(xq, wq, s_ch, scale, lora, full, b, dtype)
    start = 0
    for w in sizes:
        seg = flat[m * start : m * (start + w)].view(m, w)
        assert rel_err(seg, y_ref[:, start : start + w]) <= TOL
        start += w


def _count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that each call appends 1 to the returned list (which
    kernel a shape was handed to), still calling it."""
    calls: list = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _record_ws_launches(monkeypatch, with_grid: bool = False) -> tuple[list, list[str]]:
    """Replace the Gluon GEMM's kernel by a recorder of its launches, on any machine
    (the kernel itself needs sm_90): ``(launches, the kernel's argument names)``, each
    launch ``(args, kwargs)`` or with ``with_grid`` ``(grid, args, kwargs)``."""
    from svdquant.kernels import gemm_ws

    if not gemm_ws.HAVE_GLUON:
        pytest.skip("this triton has no Gluon")
    launches: list = []

    class Kernel:  # records the launch instead of running it
        def __getitem__(self, grid):
            if with_grid:
                return lambda *a, **kw: launches.append((grid, a, kw))
            return lambda *a, **kw: launches.append((a, kw))

    names = gemm_ws._fp8_gemm_ws_kernel.arg_names
    monkeypatch.setattr(gemm_ws, "_fp8_gemm_ws_kernel", Kernel())
    return launches, names


def test_gemm_ws_split_launch_plan(monkeypatch):
    """The host side of the Gluon GEMM's split output, on any machine (the kernel itself
    needs sm_90): one store descriptor per segment, each a contiguous [M, width] view at
    its offset in the flat output, the inner bounds passed, the unused slots filled."""
    from svdquant.kernels import gemm_ws

    launches, names = _record_ws_launches(monkeypatch)
    monkeypatch.setattr(gemm_ws, "TILE_OVERRIDE", gemm_ws.DEFAULT_TILE)  # boxes below
    m, sizes = 300, [256, 256, 136]
    args = _gemm_args(m, sum(sizes), 64, seed=4, r=32)
    flat = gemm_ws.fp8_gemm_ws_split(*args, sizes)
    ((a, kw),) = launches
    assert list(names) == names[: len(a)] + list(kw)  # every parameter, in its place
    parts_of = ("LP", "O0", "O1", "O2", "O3", "W0", "W1", "W2", "W3")

    def named(a: tuple) -> dict:
        v = dict(zip(names, a, strict=False))
        return {**v, "bounds": (v["B1"], v["B2"], v["B3"]), "parts": tuple(map(v.get, parts_of))}

    v = named(a)
    descs, bounds = [v[f"c{i}_desc"] for i in range(4)], v["bounds"]
    assert v["parts"] == (0,) * 9 and kw["PARTS"] is False and kw["GATED"] is False
    assert v["g_desc"] is v["b_desc"] and not kw["NEXT"]  # one weight descriptor, twice
    assert v["R2"] == 0
    for d, w, start in zip(descs, sizes, (0, 256, 512), strict=False):
        assert tuple(d.shape) == (m, w) and tuple(d.strides) == (w, 1)
        assert d.base.data_ptr() == flat.data_ptr() + m * start * flat.element_size()
    assert descs[3] is descs[2] and bounds == (256, 512, 648)
    assert kw["SPLIT"] and kw["HAS_LORA"] and kw["BR"] == 32
    # the layouts are asked once per box and dtype: the same as asking each time
    box = [gemm_ws.BLOCK_M, gemm_ws.BLOCK_N // 2]
    assert descs[0].layout == gemm_ws.gl.NVMMASharedLayout.get_default_for(box, gemm_ws.gl.bfloat16)
    assert not kw["MASK_R"] and v["R"] == 32  # the rank is its power of two: no column mask
    gemm_ws.fp8_gemm_ws(*args)  # unsplit: the whole output, bounds at N
    a, kw = launches[-1]
    v = named(a)
    assert tuple(v["c0_desc"].shape) == (m, sum(sizes)) and v["bounds"] == (648,) * 3
    assert not kw["SPLIT"]
    # the cost model's tile: its boxes, its warps and stages
    monkeypatch.setattr(gemm_ws, "TILE_OVERRIDE", None)
    gemm_ws.fp8_gemm_ws(*args)
    a, kw = launches[-1]
    sms = gemm_ws.num_sms(args[0].device)
    bm, bn, stages, warps, parts = gemm_ws.pick_tile(m, 648, 64, 32, sms)
    assert list(a[0].block_shape) == [bm, gemm_ws.BLOCK_K] and a[1].block_shape[0] == bn
    assert list(a[3].block_shape) == [bm, bn // 2] and (kw["S"], kw["num_warps"]) == (stages, warps)
    assert kw["PINGPONG"] is (parts == 2) and kw["PP_REGS"] == gemm_ws.PP_REGS
    # rank 48: rows padded to 64
    gemm_ws.fp8_gemm_ws(*_gemm_args(m, 512, 64, seed=5, r=48))
    a, kw = launches[-1]
    assert kw["MASK_R"] and kw["BR"] == 64 and named(a)["R"] == 48
    # a split's parts (each segment's own low-rank columns): prefix, offsets, widths
    launches.clear()
    lora = torch.zeros(m, 8 + 4 + 12 + 8, device=DEVICE)
    up = args[5].new_zeros(sum(sizes), 32)
    gemm_ws.fp8_gemm_ws_split(*args[:4], lora, up, *args[6:], sizes, [8, 4, 12, 8])
    ((a, kw),) = launches
    assert named(a)["parts"] == (8, 0, 4, 16, 24, 4, 12, 8, 0) and kw["PARTS"] is True
    with pytest.raises(ValueError, match="multiples of 4"):
        gemm_ws.fp8_gemm_ws_split(*args[:4], lora, up, *args[6:], sizes, [8, 2, 14, 8])


def test_gemm_ws_gated_launch_plan(monkeypatch):
    """The host side of the GEGLU up projection on the Gluon GEMM (``fp8_gemm_ws_gated``),
    on any machine: the weight's value and gate halves as two descriptors of half-tile
    boxes, the [M, H] output's, N = H, the tiles counted over H; odd or misaligned widths
    refused."""
    from svdquant.kernels import gemm_ws

    launches, _ = _record_ws_launches(monkeypatch, with_grid=True)
    m, h, k = 300, 520, 64
    args = _gemm_args(m, 2 * h, k, seed=6, r=32)
    sms = gemm_ws.num_sms(args[0].device)
    bm, bn, stages, warps, parts = gemm_ws.pick_tile(m, 2 * h, k, 32, sms)
    out = gemm_ws.fp8_gemm_ws_gated(*args)
    ((grid, a, kw),) = launches
    assert out.shape == (m, h) and out.dtype == torch.bfloat16
    b, g, c = a[1], a[2], a[3]
    assert tuple(b.shape) == tuple(g.shape) == (h, k) and list(b.block_shape) == [bn // 2, 128]
    wq = args[1]
    assert b.base.data_ptr() == wq.data_ptr()
    assert g.base.data_ptr() == wq.data_ptr() + h * k * wq.element_size()
    assert tuple(c.shape) == (m, h) and c.base.data_ptr() == out.data_ptr()
    assert list(c.block_shape) == [bm, bn // 2]
    assert a[12:15] == (m, h, k) and kw["GATED"] is True
    assert not kw["SPLIT"] and kw["PARTS"] is False
    assert kw["PINGPONG"] is (parts == 2) and (kw["S"], kw["num_warps"]) == (stages, warps)
    assert grid == (min(-(-m // bm) * -(-h // (bn // 2)), sms),)
    with pytest.raises(ValueError, match="2H rows with H a multiple of 8"):
        gemm_ws.fp8_gemm_ws_gated(*_gemm_args(m, 2 * 516, k, seed=6, r=32))  # H = 516
    with pytest.raises(ValueError, match="2H rows"):
        gemm_ws.fp8_gemm_ws_gated(*_gemm_args(m, 1041, k, seed=6, r=32))  # odd


def test_gemm_ws_next_launch_plan(monkeypatch):
    """The host side of the Gluon GEMM writing the next layer's quantized input
    (``fp8_gemm_ws_next``), on any machine: the next layer's operands passed, its format
    and activation as constants, a box-sized stand-in for the unused output descriptor;
    the outputs are ``next_layer_input``'s buffers."""
    from svdquant.kernels import gemm, gemm_ws

    launches, names = _record_ws_launches(monkeypatch)
    m, n, k = 300, 640, 64
    args = _gemm_args(m, n, k, seed=7, r=32)
    down2, _ = _lowrank(8, n, 24, torch.bfloat16)
    xq2, lora2, nxt = gemm.next_layer_input(m, n, args[0].device, "gelu_tanh", _smooth(n),
                                            down2, torch.tensor(0.01), 640, "int4")  # fmt: skip
    got = gemm_ws.fp8_gemm_ws_next(*args, nxt)
    assert got[0] is xq2 and got[1] is lora2
    ((a, kw),) = launches
    v = dict(zip(names, a, strict=False))
    assert kw["NEXT"] and kw["NEXT_INT4"] and kw["ACT"] == 1 and kw["BR2"] == 32
    assert not kw["GATED"] and not kw["SPLIT"] and v["N"] == n
    assert v["ld2_ptr"] is nxt[1] and v["lora2_ptr"] is lora2
    assert (v["R2"], v["stride_ld2"], v["stride_l2m"]) == (24, n, 24)
    bm, bn = v["a_desc"].block_shape[0], v["b_desc"].block_shape[0]
    assert tuple(v["c0_desc"].shape) == (bm, bn // 2)  # a stand-in: nothing stored there
    # the codes go out by TMA, half a tile a box
    assert v["c1_desc"].base is xq2 and list(v["c1_desc"].block_shape) == [bm, bn // 2]
    # a GEGLU: the gate's GELU, h's width the next layer's K
    h = n // 2
    one = torch.tensor(0.01)
    xq2, lora2, nxt = gemm.next_layer_input(
        m, h, args[0].device, "gelu", _smooth(h), down2[:, :h], one, 320, "fp8"
    )
    gemm_ws.fp8_gemm_ws_next(*args, nxt, gated=True)
    a, kw = launches[-1]
    v = dict(zip(names, a, strict=False))
    assert kw["GATED"] and kw["NEXT"] and not kw["NEXT_INT4"] and kw["ACT"] == 3
    assert v["N"] == n // 2 and tuple(v["c1_desc"].shape) == (m, 320)
    assert gemm_ws.supports_next(n, k, 32, 64, 640, torch.bfloat16, torch.bfloat16)
    assert not gemm_ws.supports_next(n, k, 32, 80, 640, torch.bfloat16, torch.bfloat16)
    assert not gemm_ws.supports_next(n, k, 32, 64, 632, torch.bfloat16, torch.bfloat16)
    with pytest.raises(ValueError, match="multiple of 16"):
        gemm_ws.fp8_gemm_ws_next(*args, gemm.next_layer_input(
            m, 630, args[0].device, "gelu_tanh", _smooth(630), down2[:, :630], one, 632, "int4"
        )[2])  # fmt: skip


def test_quantize_next_epilogues_hand_over_to_gemm_ws(monkeypatch):
    """The epilogues that write the next layer's input run on the Gluon GEMM where
    ``fp8_gemm`` would, into the same buffers — a GELU MLP's fc1
    (``fp8_gemm_quantize_next``) with ``gemm.WS_NEXT``, a GEGLU's up projection
    (``fp8_gemm_gated_next``, one pass) with ``gemm_gated.WS_GATED``; off, on the Triton
    kernels. The Gluon kernel stood in for by the reference (the GPU tests run it)."""
    from svdquant.kernels import gemm, gemm_gated, gemm_ws

    calls = []

    def stand_in(xq, wq, s_ch, scale, lora, up, bias, dtype, nxt, gated=False):
        calls.append(gated)
        smooth2 = 1.0 / nxt[0]
        fn = ref.fp8_gemm_gated_next_ref if gated else ref.fp8_gemm_quantize_next_ref
        want = fn(xq, wq, s_ch, scale, lora, up, bias, dtype, nxt[5], smooth2, nxt[1],
                  nxt[2].reshape(()), nxt[3].shape[1], nxt[6])  # fmt: skip
        nxt[3].copy_(want[0])
        nxt[4].copy_(want[1])
        return nxt[3], nxt[4]

    monkeypatch.setattr(gemm, "WS_NEXT", True)
    monkeypatch.setattr(gemm_gated, "WS_GATED", True)
    monkeypatch.setattr(gemm, "_ws_wanted", lambda *a: True)
    monkeypatch.setattr(gemm_ws, "fp8_gemm_ws_next", stand_in)
    n, k = 192, 128
    down2, _ = _lowrank(8, n, 16, torch.bfloat16)
    args = (*_gemm_args(37, n, k, 9, r=16), "gelu_tanh", _smooth(n), down2,
            torch.tensor(0.01, device=DEVICE), n, "int4")  # fmt: skip
    xq2, lora2 = fp8_gemm_quantize_next(*args)
    assert calls == [False]
    want = ref.fp8_gemm_quantize_next_ref(*args)
    assert torch.equal(xq2.float(), want[0].float()) and torch.equal(lora2, want[1])
    gated = _gated_next_args(37, 136, 96, 16, "gelu", "int4", True)
    xq2, lora2 = gemm_gated.fp8_gemm_gated_next(*gated)
    assert calls == [False, True]
    _check_gated_next(gated, xq2, lora2)
    monkeypatch.setattr(gemm, "WS_NEXT", False)
    monkeypatch.setattr(gemm_gated, "WS_GATED", False)
    fp8_gemm_quantize_next(*args)
    gemm_gated.fp8_gemm_gated_next(*gated)
    assert len(calls) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [pytest.param(t, id=tile_name(t)) for t in CANDIDATE_TILES])
@pytest.mark.parametrize(("m", "n", "r2", "activation", "act_fmt2"), [
    (3, 640, 16, "gelu_tanh", "int4"), (257, 1000, 32, "silu", "fp8"),
    (4608, 1152, 32, "gelu_tanh", "int4"), (600, 264, 0, "none", "int4"),
])  # fmt: skip
def test_gpu_fp8_gemm_ws_next_matches_reference(monkeypatch, tile, m, n, r2, activation,
                                                 act_fmt2):  # fmt: skip
    """The Gluon GEMM writing the next layer's quantized input (``gemm.WS_NEXT``), every
    candidate tile: against the reference as the Triton epilogue is held to, and against
    the Triton epilogue itself (the same operations: codes differ only where the two
    GEMMs' fp32 sums round a 16-bit value differently)."""
    from svdquant.kernels import gemm, gemm_ws

    if not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    monkeypatch.setattr(gemm_ws, "TILE_OVERRIDE", tile)
    k = 336
    down2, _ = _lowrank(max(r2, 1), n, r2, torch.bfloat16)
    k_out2 = -(-n // 64) * 64
    args = (*_gemm_args(m, n, k, m + n, r=32), activation, _smooth(n), down2[:r2],
            torch.tensor(0.01, device=DEVICE), k_out2, act_fmt2)  # fmt: skip
    monkeypatch.setattr(gemm, "WS_NEXT", False)
    triton_q, triton_l = fp8_gemm_quantize_next(*args)
    monkeypatch.setattr(gemm, "WS_NEXT", True)
    calls = _count_calls(monkeypatch, gemm_ws, "fp8_gemm_ws_next")
    xq2, lora2 = fp8_gemm_quantize_next(*args)
    assert calls == ([1] if m >= gemm.WS_MIN_M else [])
    xq2_ref, lora2_ref = ref.fp8_gemm_quantize_next_ref(*args)
    assert (xq2.float() != xq2_ref.float()).float().mean().item() < 0.01
    assert rel_err(xq2, xq2_ref) < 0.01
    if r2:
        assert rel_err(lora2, lora2_ref) < 1e-3
    assert (xq2.float() != triton_q.float()).float().mean().item() <= 2e-3
    if r2:
        assert rel_err(lora2, triton_l) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [pytest.param(t, id=tile_name(t)) for t in CANDIDATE_TILES])
@pytest.mark.parametrize(("m", "h", "k"), [(600, 136, 96), (4096, 2560, 640), (1024, 5120, 1280)])
def test_gpu_fp8_gemm_gated_next_on_gemm_ws_one_pass(monkeypatch, tile, m, h, k):
    """A GEGLU's up projection writing the down projection's quantized input in gemm_ws's
    epilogue (``gemm_gated.WS_GATED``, one pass), every candidate tile, SDXL's shapes:
    the one-pass Triton kernel's outputs (``_check_gated_next``)."""
    from svdquant.kernels import gemm_gated, gemm_ws

    if not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    monkeypatch.setattr(gemm_ws, "TILE_OVERRIDE", tile)
    monkeypatch.setattr(gemm_gated, "WS_GATED", True)
    calls = _count_calls(monkeypatch, gemm_ws, "fp8_gemm_ws_next")
    args = _gated_next_args(m, h, k, 32, "gelu", "int4", True, torch.float16)
    xq2, lora2 = gemm_gated.fp8_gemm_gated_next(*args)
    assert calls == [1]
    _check_gated_next(args, xq2, lora2)


def test_fp8_gemm_gated_next_hands_geglu_to_gemm_ws(monkeypatch):
    """With ``gemm_gated.WS_GATED`` (on) a gated unit's up projection runs on the Gluon
    GEMM where ``fp8_gemm`` would: in one pass where its epilogue takes the down
    projection (rank ≤ 64; any gate activation, int4 or W4A8 — all run on the GPU in
    v47), else, for a GELU gate, writing h for the down projection's quantize — the same
    outputs as the one-pass kernel's reference; other gates past rank 64 stay on the
    Triton kernel. On the CPU the Gluon kernels are stood in for by references (the GPU
    tests run them)."""
    from svdquant.kernels import gemm, gemm_gated, gemm_ws

    calls, one_pass = [], []
    current: list = []

    def gated_ws(*a):
        calls.append(a[0].shape)
        return ref.fp8_gemm_gated_ref(*a)

    def next_ws(*a, gated=False):
        one_pass.append(gated)
        return ref.fp8_gemm_gated_next_ref(*current[0])

    def run(args):
        current[:] = [args]
        return gemm_gated.fp8_gemm_gated_next(*args)

    assert gemm_gated.WS_GATED  # the default
    monkeypatch.setattr(gemm, "_ws_wanted", lambda *a: True)
    monkeypatch.setattr(gemm_ws, "fp8_gemm_ws_gated", gated_ws)
    monkeypatch.setattr(gemm_ws, "fp8_gemm_ws_next", next_ws)
    args = _gated_next_args(37, 136, 96, 16, "gelu", "int4", True, r2=80)
    xq2, lora2 = run(args)
    assert calls == [(37, 96)] and one_pass == []
    _check_gated_next(args, xq2, lora2)
    run(_gated_next_args(37, 136, 96, 16, "silu", "int4", True, r2=80))
    assert len(calls) == 1 and one_pass == []  # h-writing: the GELU only
    for activation, fmt in (("gelu", "fp8"), ("silu", "int4"), ("gelu_tanh", "fp8")):
        run(_gated_next_args(37, 136, 96, 16, activation, fmt, True, r2=32))
    assert len(calls) == 1 and one_pass == [True] * 3
    monkeypatch.setattr(gemm_gated, "WS_GATED", False)
    gemm_gated.fp8_gemm_gated_next(*args)
    assert len(calls) == 1 and len(one_pass) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [pytest.param(t, id=tile_name(t)) for t in CANDIDATE_TILES])
@pytest.mark.parametrize(("m", "h", "k", "r", "bias", "dtype"), [
    (3, 520, 336, 16, True, torch.bfloat16), (257, 1280, 640, 32, True, torch.float16),
    (4608, 1000, 1008, 0, False, torch.bfloat16), (4608, 264, 240, 32, True, torch.bfloat16),
    (257, 1536, 3072, 160, False, torch.float16),
])  # fmt: skip
def test_gpu_fp8_gemm_ws_gated_matches_reference(monkeypatch, tile, m, h, k, r, bias, dtype):
    """The GEGLU up projection on the Gluon GEMM (``fp8_gemm_ws_gated``), every candidate
    tile: against the reference, and against the GELU and product of the same kernel's
    plain [M, 2H] output (the same MMA sums: some 16-bit roundings move by an ulp, the
    GELU's erf being Abramowitz & Stegun's, not torch's); rank 160 in chunks (on the tiles
    that hold rank 64's operands: ``pick_tile`` moves the others)."""
    from svdquant.kernels import gemm_ws

    if not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    monkeypatch.setattr(gemm_ws, "TILE_OVERRIDE", tile)
    xq, wq, s_ch, scale, lora, up, b, _ = _gemm_args(m, 2 * h, k, seed=m + h, r=r)
    args = (xq, wq, s_ch, scale, lora, up.to(dtype), b.to(dtype) if bias else None, dtype)
    got = gemm_ws.fp8_gemm_ws_gated(*args)
    assert got.shape == (m, h) and got.dtype == dtype
    assert rel_err(got, ref.fp8_gemm_gated_ref(*args)) <= TOL
    v, g = gemm_ws.fp8_gemm_ws(*args).float().chunk(2, dim=-1)
    own = ref.gated_ref(v.to(dtype), g.to(dtype), "gelu").float()
    # the pairing of value and gate columns exact: a few 16-bit ulps where the erf
    # approximation moves a rounding (v46 on the H200: 0.66% of fp16 values, 0.12% of bf16),
    # plus that approximation's own error, |Δerf| ≤ 1.5e-7, times v · g / 2: many ulps of a
    # gate deep in GELU's tail (g ≈ -4: gelu(g) ≈ -1e-4), which K = 3072's sums reach
    diff = (got.float() - own).abs()
    assert (diff <= 2 * torch.finfo(dtype).eps * own.abs() + (v * g).abs() * 1e-7 + 1e-6).all()
    # outside that tail few values move (a CPU emulation: 0.16% of rank 160's; in the tail,
    # g ≤ -3, 3.8% of all its values — 3.4% of everything on the H200 at v55)
    assert ((diff > 0) & (g.abs() < 3)).float().mean().item() <= 0.02


@pytest.mark.gpu
@pytest.mark.parametrize(("activation", "act_fmt2", "dtype"), [
    ("gelu", "fp8", torch.bfloat16), ("gelu", "fp8", torch.float16),
    ("silu", "int4", torch.bfloat16), ("gelu_tanh", "int4", torch.float16),
])  # fmt: skip
def test_gpu_fp8_gemm_ws_next_gated_other_formats(activation, act_fmt2, dtype):
    """The one pass on gemm_ws (``fp8_gemm_ws_next``, gated) for a W4A8 next layer and
    other gate activations, at its own tile and SDXL's shapes: the one-pass Triton
    kernel's outputs (``_check_gated_next``); v47 on the H200: passed."""
    from svdquant.kernels import gemm, gemm_ws

    if not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    for m, h, k in ((4096, 2560, 640), (1000, 136, 96)):
        args = _gated_next_args(m, h, k, 32, activation, act_fmt2, True, dtype, r2=32)
        nxt = gemm.next_layer_input(m, h, args[0].device, *args[8:])[2]
        xq2, lora2 = gemm_ws.fp8_gemm_ws_next(*args[:8], nxt, gated=True)
        _check_gated_next(args, xq2, lora2)


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "h", "k"), [(600, 136, 96), (4096, 2560, 640), (1024, 5120, 1280)])
def test_gpu_fp8_gemm_gated_next_on_gemm_ws(m, h, k):
    """``fp8_gemm_gated_next`` by default (``WS_GATED``): routed to the Gluon GEMM from
    ``gemm.WS_MIN_M`` rows (SDXL's feed-forward shapes among them) — one pass where the
    epilogue takes the down projection (rank ≤ 64), else h written and quantized — the
    outputs the one-pass Triton kernel's (``_check_gated_next``)."""
    from svdquant.kernels import gemm_gated, gemm_ws

    if not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    for r2, kernel in ((32, "fp8_gemm_ws_next"), (80, "fp8_gemm_ws_gated")):
        with pytest.MonkeyPatch.context() as mp:
            calls = _count_calls(mp, gemm_ws, kernel)
            args = _gated_next_args(m, h, k, 32, "gelu", "int4", True, torch.float16, r2)
            xq2, lora2 = gemm_gated.fp8_gemm_gated_next(*args)
            assert calls == [1]
            _check_gated_next(args, xq2, lora2)


def test_quantize_ws_launch_plan_and_route(monkeypatch):
    """The Gluon quantize's host side on any machine (the kernel needs sm_90): the Triton
    kernel's grid and K split, the flags, a zeroed ``lora_act`` where K is split, its
    arguments in the kernel's order; ``quantize.WS_QUANTIZE`` sends it only plain 16-bit
    inputs of ``WS_QUANTIZE_MIN_M`` rows or more, beside the widen too (a tail, a gated
    input or a folded L_down stay on the Triton kernel); a shape it does not take gets a
    clear error."""
    from svdquant.kernels import gemm_ws, quantize_ws
    from svdquant.kernels import quantize as qmod
    from svdquant.kernels._triton_common import cdiv

    if not gemm_ws.HAVE_GLUON:
        pytest.skip("this triton has no Gluon")
    launches: list = []

    class Kernel:  # records the launch instead of running it
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((grid, a, kw))

    names = quantize_ws._quantize_ws_kernel.arg_names
    monkeypatch.setattr(quantize_ws, "_quantize_ws_kernel", Kernel())
    monkeypatch.setattr(gemm_ws, "available", lambda device: True)
    monkeypatch.setattr(quantize_ws, "num_sms", lambda device: 132)  # an H100's
    m, k, r = 4608, 3072, 32
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    down = torch.zeros(r, k, dtype=torch.bfloat16)
    xq, lora = quantize_ws.quantize_act_ws(x, torch.ones(k), down, torch.tensor(1.0), k, "int4")
    (grid, args, kw), = launches  # fmt: skip
    split, per = qmod.k_split(cdiv(m, 64), k // 128, 132)
    assert grid == (cdiv(m, 64), split) and split > 1
    bound = dict(zip(names, args, strict=False))
    assert bound["k_per_split"] == per * 128 and bound["M"] == m and bound["R"] == r
    assert kw["INT4"] and kw["HAS_LORA"] and kw["ATOMIC"]
    assert bound["ld_desc"].block_shape == [r, 128]  # L_down's chunk by TMA beside x's tile
    assert xq.shape == (m, k) and xq.dtype == torch.float8_e4m3fn
    assert lora.shape == (m, r) and not lora.any()  # zeroed for the atomics
    # the route: only plain inputs from WS_QUANTIZE_MIN_M rows, only with the switch
    calls = _count_calls(monkeypatch, quantize_ws, "quantize_act_ws")
    small = torch.zeros(qmod.WS_QUANTIZE_MIN_M - 1, k, dtype=torch.bfloat16)
    args4 = (torch.ones(k), down, torch.tensor(1.0), k, "int4")
    monkeypatch.setattr(qmod, "WS_QUANTIZE", True)
    qmod.quantize_act(x, *args4)
    qmod.quantize_act(x, *args4, trigger=True)  # beside the widen, either way round
    given = (torch.empty(m, k, dtype=torch.float8_e4m3fn), torch.zeros(m, r))
    got = qmod.quantize_act(x, *args4, pdl=True, out=given)
    assert len(calls) == 3 and got[0] is given[0] and got[1] is given[1]
    assert launches[2][2]["PDL_TRIGGER"] is False  # (no PDL on the CPU)
    monkeypatch.setattr(qmod, "_quantize_act_kernel", Kernel())  # the Triton kernel's
    qmod.quantize_act(small, *args4)
    qmod.quantize_act(x, torch.ones(2 * k), down, torch.tensor(1.0), 2 * k, "int4", tail=x)
    qmod.quantize_act(x, *args4, gated=True, tail=x)
    qmod.quantize_act(x, *args4, folded=True)
    assert len(calls) == 3 and len(launches) == 4 + 4  # (the routed calls' launches too)
    monkeypatch.setattr(qmod, "WS_QUANTIZE", False)
    qmod.quantize_act(x, *args4)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="out must be"):
        quantize_ws.quantize_act_ws(x, *args4, out=(given[0], torch.zeros(m, r + 1)))
    with pytest.raises(ValueError, match="rank of"):
        quantize_ws.quantize_act_ws(x, torch.ones(k), down[:24], torch.tensor(1.0), k, "int4")
    with pytest.raises(ValueError, match="int4 or fp8"):
        quantize_ws.quantize_act_ws(x, torch.ones(k), down, torch.tensor(1.0), k, "nvfp4")


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "k", "k_out", "r"), [
    (65, 200, 256, 16), (257, 3072, 3072, 32), (1000, 1000, 1024, 64), (4608, 3072, 3072, 32),
    (4096, 12288, 12288, 32), (300, 1152, 1152, 0),
])  # fmt: skip
@pytest.mark.parametrize(("act_fmt", "dtype"), [
    ("int4", torch.bfloat16), ("fp8", torch.float16), ("int4", torch.float16),
])  # fmt: skip
def test_gpu_quantize_ws_matches_quantize_act(m, k, k_out, r, act_fmt, dtype):
    """The Gluon quantize against the Triton kernel: the codes bit for bit (rows and
    columns past M and K included: zeros up to k_out) and the low-rank sums within fp32
    rounding (the same 16-bit products, summed in another order)."""
    from svdquant.kernels import gemm_ws, quantize_ws

    if not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    x = _acts(m, k, dtype, seed=m + k)
    s = _smooth(k)
    down, _ = _lowrank(8, k, r, dtype)
    scale = ref.act_scale_from_amax((x.float() / s).abs().amax() * 0.8)  # some saturate
    assert quantize_ws.supports(x, down, k_out)
    xq, lora = quantize_ws.quantize_act_ws(x, s, down, scale, k_out, act_fmt)
    xq_t, lora_t = quantize_act(x, s, down, scale, k_out, act_fmt)
    assert torch.equal(xq.view(torch.uint8), xq_t.view(torch.uint8))
    assert lora.shape == (m, r)
    if r:
        assert rel_err(lora, lora_t) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize(("prefetch", "async_mma"), [(False, True), (True, False)])
def test_gpu_quantize_ws_probe_variants(monkeypatch, prefetch, async_mma):
    """The Gluon quantize's A/B variants (``PREFETCH``, ``ASYNC_MMA``) give the same codes
    and sums as the Triton kernel (an A/B times the same work)."""
    from svdquant.kernels import gemm_ws, quantize_ws

    if not gemm_ws.available(torch.device(DEVICE)):
        pytest.skip("needs sm_90 and a triton with Gluon of a tested version")
    monkeypatch.setattr(quantize_ws, "PREFETCH", prefetch)
    monkeypatch.setattr(quantize_ws, "ASYNC_MMA", async_mma)
    x = _acts(4608, 3072, torch.bfloat16, seed=3)
    s = _smooth(3072)
    down, _ = _lowrank(8, 3072, 32, torch.bfloat16)
    scale = ref.act_scale_from_amax((x.float() / s).abs().amax())
    xq, lora = quantize_ws.quantize_act_ws(x, s, down, scale, 3072, "int4")
    xq_t, lora_t = quantize_act(x, s, down, scale, 3072, "int4")
    assert torch.equal(xq.view(torch.uint8), xq_t.view(torch.uint8))
    assert rel_err(lora, lora_t) < 1e-5


def test_gemm_ws_is_not_used_without_a_hopper_gpu(monkeypatch):
    """On the CPU (and under the interpreter) ``fp8_gemm`` never hands over to the Gluon
    kernel, which has no interpreter; its shape rules hold everywhere."""
    from svdquant.kernels import gemm, gemm_ws

    assert not gemm_ws.available(torch.device("cpu"))
    # wgmma is Hopper's alone: a Blackwell GPU (sm_100, sm_120) keeps the Triton kernel
    monkeypatch.setattr(gemm_ws, "interpreting", lambda: False)
    for major, want in ((9, gemm_ws.HAVE_GLUON), (10, False), (12, False), (8, False)):
        monkeypatch.setattr(gemm_ws, "capability_major", lambda d, m=major: m)
        monkeypatch.setattr(gemm_ws.triton, "__version__", "3.6.0")
        assert gemm_ws.available(torch.device("cuda", 0)) == want
    monkeypatch.undo()
    if DEVICE == "cpu":
        args = _gemm_args(4096, 64, 64, seed=1, r=32)
        assert not gemm._ws_wanted(args[0], args[1], args[4], args[5], torch.bfloat16)
    assert gemm_ws.supports(3072, 3072, 32, torch.bfloat16, torch.bfloat16)
    assert not gemm_ws.supports(3072, 3072, 7, torch.bfloat16, torch.bfloat16)  # rank 7
    assert gemm_ws.supports(3072, 3072, 128, torch.bfloat16, torch.bfloat16)  # in chunks
    assert not gemm_ws.supports(3072, 3072, 272, torch.bfloat16, torch.bfloat16)  # > 256
    assert not gemm_ws.supports(3072, 3072, 100, torch.bfloat16, torch.bfloat16)  # 16s
    assert not gemm_ws.supports(130, 3072, 32, torch.bfloat16, torch.bfloat16)  # N % 8
    assert not gemm_ws.supports(3072, 3072, 32, torch.float32, torch.bfloat16)  # fp32 L_up
    with pytest.raises(ValueError, match="rank 5"):  # refused before anything is launched
        gemm_ws.fp8_gemm_ws(*_gemm_args(8, 64, 64, seed=2, r=5))
    with pytest.raises(ValueError, match="multiples of 256"):  # a tile would straddle a bound
        gemm_ws.fp8_gemm_ws_split(*_gemm_args(8, 512, 64, seed=3, r=32), [128, 384])


@pytest.mark.usefixtures("no_dp4a")
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 4, 5, 16])
@pytest.mark.parametrize(("n", "k"), [(130, 333), (18432, 3072), (3072, 3072)])
@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
@pytest.mark.parametrize("packed", [True, False])
def test_gpu_w4a16_matches_reference(monkeypatch, m, n, k, fmt, packed):
    """The default path (``packed``: int4 above ``FMA_MAX_M`` on the packed kernel) and
    ``PACKED_MMA`` off (int4 on ``_w4a16_mma_kernel``)."""
    from svdquant.kernels import gemv

    if not packed and (fmt != "int4" or m <= gemv.FMA_MAX_M):
        pytest.skip("the same kernel as with PACKED_MMA on")
    monkeypatch.setattr(gemv, "PACKED_MMA", packed)
    x, args = _w4a16_case(m, n, k, 32, fmt, torch.bfloat16, bias_seed=None)
    assert rel_err(w4a16_linear(x, *args), ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 16])
@pytest.mark.parametrize(("n", "k"), [(130, 333), (18432, 3072), (9216, 3072), (3072, 3072)])
def test_gpu_w4a16_dp4a_kernel(monkeypatch, m, n, k):
    """The dp4a kernel (the default for int4 up to ``DP4A_MAX_M`` tokens; here up to 16)
    with PTX ``dp4a``, at FLUX's modulation shapes and an odd one."""
    from svdquant.kernels import gemv

    monkeypatch.setattr(gemv, "DP4A_MAX_M", 16)
    monkeypatch.setattr(gemv, "GLUON", False)
    assert gemv._path(m, "int4") == "dp4a"
    x, args = _w4a16_case(m, n, k, 32, "int4", torch.bfloat16, bias_seed=9)
    assert rel_err(w4a16_linear(x, *args), ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.usefixtures("no_gluon")
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize(
    "tile",
    [(4, 512, 1), (8, 2048, 2), (16, 1024, 1), (2, 1024, 2), (32, 512, 4), (64, 512, 8)],
)
def test_gpu_w4a16_dp4a_kernel_over_tiles(monkeypatch, m, tile):
    """The dp4a kernel's tiles on the GPU (those ``bench/probe_gemv_dp4a.py`` sweeps, and
    the multi-warp tiles v30's SASS reading found lean)."""
    from svdquant.kernels import gemv

    monkeypatch.setitem(gemv.TILES, "dp4a", tile)
    monkeypatch.setitem(gemv.TILES, "dp4a_multi", tile)
    x, args = _w4a16_case(m, 18432, 3072, 32, "int4", torch.bfloat16, bias_seed=9)
    assert rel_err(w4a16_linear(x, *args), ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.usefixtures("no_gluon")
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize(("n", "k", "r"), [(18432, 3072, 32), (130, 333, 40), (9216, 3072, 0)])
def test_gpu_w4a16_prep_loads_first(monkeypatch, m, n, k, r):
    """``gemv.PREP_LD_FIRST`` on the GPU: loads reordered, the same outputs — to one unit in
    the last place of the bf16 output, as where K is split the fp32 partial sums meet
    through atomics in any order and may round either way (v36: a norm-wise 1e-5 failed
    once at M = 8 on one such flip)."""
    from svdquant.kernels import gemv

    x, args = _w4a16_case(m, n, k, r, "int4", torch.bfloat16, bias_seed=9)
    monkeypatch.setattr(gemv, "PREP_LD_FIRST", False)
    y0 = w4a16_linear(x, *args)
    monkeypatch.setattr(gemv, "PREP_LD_FIRST", True)
    y1 = w4a16_linear(x, *args)
    a, b = y1.float(), y0.float()
    assert ((a - b).abs() <= b.abs() * 2**-7 + 1e-6 * b.abs().max()).all()
    assert rel_err(y1, ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.usefixtures("no_gluon")
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("tile", [(8, 512, 1), (16, 512, 1), (16, 512, 2), (32, 512, 2)])
@pytest.mark.parametrize(("n", "k"), [(18432, 3072), (130, 333)])
def test_gpu_w4a16_dp4a_x_rows(monkeypatch, m, tile, n, k):
    """``gemv.DP4A_X_ROWS_MAX_M`` on the GPU: the same output at the tiles its probe sweeps, to
    fp32 rounding — the integer sums are the same, but the fp32 sums over a step's
    groups and the low-rank partials follow the new register layout's order (the
    interpreter's are bit-identical), and with a K split meet through atomics."""
    from svdquant.kernels import gemv

    monkeypatch.setitem(gemv.TILES, "dp4a", tile)
    monkeypatch.setitem(gemv.TILES, "dp4a_multi", tile)
    x, args = _w4a16_case(m, n, k, 32, "int4", torch.bfloat16, bias_seed=9)
    monkeypatch.setattr(gemv, "DP4A_X_ROWS_MAX_M", 0)
    y0 = w4a16_linear(x, *args)
    monkeypatch.setattr(gemv, "DP4A_X_ROWS_MAX_M", 4)
    y1 = w4a16_linear(x, *args)
    assert rel_err(y1, y0) <= 1e-3
    assert rel_err(y1, ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.usefixtures("no_dp4a")
@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 4, 16])
@pytest.mark.parametrize(("n", "k"), [(18432, 3072), (130, 333)])
def test_gpu_w4a16_packed_kernel(monkeypatch, m, n, k):
    """The packed kernel with its PTX decode (``gemv.PACKED_MMA`` forced on)."""
    from svdquant.kernels import gemv

    monkeypatch.setattr(gemv, "PACKED_MMA", True)
    monkeypatch.setattr(gemv, "FMA_MAX_M", 1)
    x, args = _w4a16_case(m, n, k, 32, "int4", torch.bfloat16, bias_seed=9)
    assert rel_err(w4a16_linear(x, *args), ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.usefixtures("no_dp4a")
@pytest.mark.gpu
@pytest.mark.parametrize("m", [5, 16])
@pytest.mark.parametrize(("n", "k"), [(18432, 3072), (130, 333), (300, 4500)])
@pytest.mark.parametrize("tile", [(32, 2, 4), (64, 4, 4), (128, 2, 8), (256, 4, 8)])
def test_gpu_w4a16_packed_kernel_over_tiles(monkeypatch, m, n, k, tile):
    """The packed kernel's tiles on the GPU, with the PTX decode."""
    from svdquant.kernels import gemv

    monkeypatch.setattr(gemv, "PACKED_MMA", True)
    monkeypatch.setattr(gemv, "FMA_MAX_M", 1)
    monkeypatch.setitem(gemv.TILES, "packed", tile)
    x, args = _w4a16_case(m, n, k, 32, "int4", torch.bfloat16, bias_seed=9)
    assert rel_err(w4a16_linear(x, *args), ref.w4a16_linear_ref(x, *args)) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("act_fmt", ["int4", "fp8"])
def test_gpu_fused_mlp_matches_unfused(act_fmt):
    g = _gen(13)
    fc1 = torch.nn.Linear(1024, 4096).to(DEVICE, torch.bfloat16)
    fc2 = torch.nn.Linear(4096, 1024).to(DEVICE, torch.bfloat16)
    x = torch.randn(1000, 1024, generator=g).to(DEVICE, torch.bfloat16)
    h = torch.nn.functional.gelu(fc1(x), approximate="tanh")
    opts = dict(act_fmt=act_fmt, rank=32, alpha=0.5)
    q1, q2 = svdquant.quantize_linear(fc1, x, **opts), svdquant.quantize_linear(fc2, h, **opts)
    y = svdquant.kernels.svdq_mlp_triton(x, q1, q2)
    y_unfused = q2(torch.nn.functional.gelu(q1(x), approximate="tanh"))
    assert rel_err(y, y_unfused) <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("r", [112, 128, 160, 256, 544, 928])
@pytest.mark.parametrize(("m", "k"), [(4096, 3072), (512, 3072), (4608, 15360), (100, 3072)])
def test_gpu_quantize_rank_slices_match_reference(monkeypatch, m, k, r):
    """The rank in slices of 64 (``RANK_SLICES``) at FLUX's sizes on the GPU: the one-program
    kernel's codes and the reference's sums — up to the stacked LoRA columns of a fused
    group (544: a rank-128 LoRA on FLUX's four single-block parts; 928: every part at
    ``lora.MAX_RANK``, within ``gemm.MAX_STACKED_RANK``)."""
    from svdquant.kernels import quantize as qmod

    x = _acts(m, k, torch.bfloat16, seed=7)
    s = _smooth(k)
    down, _ = _lowrank(8, k, r, torch.bfloat16)
    act_scale = ref.act_scale_from_amax((x.float() / s).abs().amax())
    monkeypatch.setattr(qmod, "RANK_SLICES", False)
    one = quantize_act(x, s, down, act_scale, k, "int4")
    monkeypatch.setattr(qmod, "RANK_SLICES", True)
    monkeypatch.setattr(qmod, "WIDE_BY_MM", False)
    assert qmod.rank_slices(r, m, 64) > 1  # (the sliced kernel runs)
    sliced = quantize_act(x, s, down, act_scale, k, "int4")
    _, lora_ref = ref.quantize_act_ref(x, s, down, act_scale, k, "int4")
    assert torch.equal(sliced[0].view(torch.uint8), one[0].view(torch.uint8))
    assert rel_err(sliced[1], lora_ref) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("r", [160, 416, 544])
@pytest.mark.parametrize(("m", "k"), [(4608, 3072), (512, 3072), (4608, 15360), (100, 3072)])
def test_gpu_quantize_wide_rank_by_mm_matches_reference(monkeypatch, m, k, r):
    """``WIDE_BY_MM`` at FLUX's sizes on the GPU (cuBLAS's fp32-output GEMM for the
    columns past the first slice): the slices' codes and the reference's sums, also
    after the widen as its programmatic dependent (``pdl``, into given buffers)."""
    from svdquant.kernels import quantize as qmod
    from svdquant.kernels.widen import widen_weight

    gemms = _count_calls(monkeypatch, qmod, "lowrank_mm")
    x, s = _acts(m, k, torch.bfloat16, seed=7), _smooth(k)
    down, _ = _lowrank(8, k, r, torch.bfloat16)
    act_scale = ref.act_scale_from_amax((x.float() / s).abs().amax())
    monkeypatch.setattr(qmod, "WIDE_BY_MM", False)
    sliced = quantize_act(x, s, down, act_scale, k, "int4")
    _, lora_ref = ref.quantize_act_ref(x, s, down, act_scale, k, "int4")
    monkeypatch.setattr(qmod, "WIDE_BY_MM", True)
    xq, lora = quantize_act(x, s, down, act_scale, k, "int4")
    assert torch.equal(xq.view(torch.uint8), sliced[0].view(torch.uint8))
    assert rel_err(lora, lora_ref) < 1e-4
    w = _weight(256, k, "int4")
    given = (torch.empty_like(xq), torch.zeros_like(lora))
    widen_weight(w.packed, w.scales, w.tensor_scale, "int4", trigger=True)
    got = quantize_act(x, s, down, act_scale, k, "int4", pdl=True, out=given)
    torch.cuda.synchronize()
    assert torch.equal(got[0].view(torch.uint8), sliced[0].view(torch.uint8))
    assert rel_err(got[1], lora_ref) < 1e-4 and len(gemms) == 2  # (the route, both times)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [160, 544])
@pytest.mark.parametrize("m", [4608, 512, 100])
def test_gpu_quantize_wide_tailed_rank_by_mm_matches_reference(monkeypatch, m, r):
    """``WIDE_TAIL_BY_MM`` at FLUX's ``proj_out`` (attention output 3072 + GELU-tanh of
    the MLP's 12288) on the GPU: the slices' codes, the reference's sums."""
    from svdquant.kernels import quantize as qmod

    x, t = _acts(m, 3072, torch.bfloat16, seed=7), _acts(m, 12288, torch.bfloat16, seed=8)
    s = _smooth(15360)
    down, _ = _lowrank(8, 15360, r, torch.bfloat16)
    h = torch.cat([x, ref.activation_ref(t, "gelu_tanh").to(x.dtype)], -1)
    act_scale = ref.act_scale_from_amax((h.float() / s).abs().amax())
    kw = {"tail": t, "tail_act": "gelu_tanh"}
    monkeypatch.setattr(qmod, "WIDE_TAIL_BY_MM", False)
    sliced = quantize_act(x, s, down, act_scale, 15360, "int4", **kw)
    monkeypatch.setattr(qmod, "WIDE_TAIL_BY_MM", True)
    xq, lora = quantize_act(x, s, down, act_scale, 15360, "int4", **kw)
    _, lora_ref = ref.quantize_act_cat_ref(x, t, "gelu_tanh", s, down, act_scale, 15360, "int4")
    assert torch.equal(xq.view(torch.uint8), sliced[0].view(torch.uint8))
    assert rel_err(lora, lora_ref) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("r", [48, 80, 96, 192])
@pytest.mark.parametrize(("m", "k"), [(4096, 3072), (512, 3072), (4608, 15360), (3, 3072)])
def test_gpu_quantize_split_rank_matches_reference(monkeypatch, m, k, r):
    """The two-part low-rank quantize at FLUX's sizes on the GPU (the slices off: 192 runs
    in slices by default): the one-part kernel's codes and the reference's sums."""
    from svdquant.kernels import quantize as qmod

    x = _acts(m, k, torch.bfloat16, seed=7)
    s = _smooth(k)
    down, _ = _lowrank(8, k, r, torch.bfloat16)
    act_scale = ref.act_scale_from_amax((x.float() / s).abs().amax())
    monkeypatch.setattr(qmod, "RANK_SLICES", False)  # (the parts, not the slices, at 192)
    monkeypatch.setattr(qmod, "SPLIT_RANK", False)
    one = quantize_act(x, s, down, act_scale, k, "int4")
    monkeypatch.setattr(qmod, "SPLIT_RANK", True)
    assert qmod.rank_parts(r)[1] > 0  # (the two-part kernel runs)
    two = quantize_act(x, s, down, act_scale, k, "int4")
    _, lora_ref = ref.quantize_act_ref(x, s, down, act_scale, k, "int4")
    assert torch.equal(two[0].view(torch.uint8), one[0].view(torch.uint8))
    assert rel_err(two[1], lora_ref) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("act_fmt", "k", "m"),
    [
        ("int4", 3072, 512),
        ("fp8", 3072, 512),
        ("none", 3072, 4),
        ("int4", 12288, 512),
        ("int4", 3072, 64),
    ],
)
def test_gpu_compile_inductor_and_cuda_graph(act_fmt, k, m, monkeypatch):
    """Compiled (Inductor) and compiled into CUDA graphs (``reduce-overhead``: CUDA-graph
    trees, whose warm-up allocates from the graph's pool — a tensor an op kept from there
    breaks the replay, as kept row scales did at K >= 8192 in v29 and the GEMM's unused
    buffer at M < WS_MIN_M in v36): the eager output. The graphed layer runs first,
    before any eager call has touched it, as in a fresh process."""
    from svdquant.kernels import gemm

    monkeypatch.setattr(gemm, "_DUMMIES", {})  # made in the graph's warm-up, as in v36
    _, layer, calib = _layer("int4", act_fmt, k=k, n=3072, rank=32)
    layer.backend = "auto"
    x = calib[:m]
    torch._dynamo.reset()
    graphed = torch.compile(layer, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        out = graphed(x).clone()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(x)
    eager = layer(x)
    assert rel_err(got, eager) <= TOL
    assert rel_err(out, eager) <= TOL


def _count_kernel_calls(monkeypatch, **keys: str) -> dict[str, int]:
    """Count the calls of ``svdquant.kernels``' entry points named by ``keys`` (name ->
    key of the returned, live dict), each still calling through."""
    calls = dict.fromkeys(keys.values(), 0)
    for name, key in keys.items():
        real = getattr(svdquant.kernels, name)

        def counted(*a, _real=real, _key=key, **k):
            calls[_key] += 1
            return _real(*a, **k)

        monkeypatch.setattr(svdquant.kernels, name, counted)
    return calls


def _tiny_denoiser_on_the_engine(arch: str, dtype: torch.dtype | None = None):
    """A tiny ``arch`` denoiser quantized (rank 8) on its pipeline, on ``DEVICE`` with the
    Triton backend (its floating tensors and inputs cast to ``dtype`` if given), and one
    step's call arguments: ``(model, args, kwargs)``."""
    from svdquant.models.tiny import tiny_call_kwargs, tiny_pipeline
    from svdquant.pipeline import denoiser, pipeline_calibration
    from svdquant.quantize_model import QuantizeConfig, quantize_model

    pipe = tiny_pipeline(arch)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**tiny_call_kwargs(arch), "num_inference_steps": 1}
    _, model = denoiser(pipe)
    calib = pipeline_calibration(pipe, ["a red fox asleep in fresh snow"], progress=False, **kwargs)
    quantize_model(model, calib, QuantizeConfig(rank=8, alpha=0.5, progress=False))
    seen = []
    model.register_forward_pre_hook(lambda _m, a, kw: seen.append((a, kw)), with_kwargs=True)
    pipe(prompt=["a lighthouse"], generator=torch.Generator().manual_seed(0), **kwargs)
    args, kw = seen[0]
    model.to(DEVICE, dtype)

    def to_device(v):  # SDXL's added_cond_kwargs: a dict of tensors
        if isinstance(v, dict):
            return {k: to_device(t) for k, t in v.items()}
        if not torch.is_tensor(v):
            return v
        return v.to(DEVICE, dtype) if dtype is not None and v.is_floating_point() else v.to(DEVICE)

    args = [to_device(a) for a in args]
    kw = {k: to_device(v) for k, v in kw.items()}
    for m in model.modules():
        if isinstance(m, svdquant.SVDQLinear):
            m.backend = "triton"
    return model, args, kw


@torch.no_grad()
def test_fused_flux_takes_the_wide_rank_route_alike(monkeypatch):
    """A fused tiny FLUX transformer whose quantizes take the wide-rank route
    (``quantize.WIDE_BY_MM``, ``WIDE_TAIL_BY_MM``; forced on its rank-8 branches, which
    take it only past rank 128): the fused groups' stacked inputs, the out projections and
    ``proj_out``'s concatenated one — the kernels' own sums' output within bf16 rounding."""
    from svdquant.kernels import quantize as qmod

    model, args, kw = _tiny_denoiser_on_the_engine("flux", torch.bfloat16)
    svdquant.fuse_projections(model)
    monkeypatch.setattr(qmod, "WIDE_BY_MM", False)
    want = model(*args, **kw)[0]
    monkeypatch.setattr(qmod, "WIDE_BY_MM", True)
    monkeypatch.setattr(qmod, "WIDE_TAIL_BY_MM", True)
    real = qmod.rank_slices
    monkeypatch.setattr(qmod, "rank_slices", lambda r, m, bm: max(real(r, m, bm), 2 * (r > 0)))
    gemms = _count_calls(monkeypatch, qmod, "lowrank_mm")
    got = model(*args, **kw)[0]
    assert len(gemms) >= len(model.single_transformer_blocks) * 3  # (two for a tail)
    assert rel_err(got, want) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("gate_norm", [False, True])
def test_fused_flux_runtime_on_the_engine(monkeypatch, gate_norm):
    """``fuse_projections`` on a tiny FLUX transformer, on the engine: the single blocks'
    ``proj_out`` quantizes the attention output and the MLP's GELU where they lie, the
    double blocks' feed-forwards run as fused MLPs, q and k take the norm + rotary kernel —
    the unfused engine's output within bf16 rounding, under ``torch.compile(fullgraph=True)``
    too; unfusing restores diffusers' classes."""
    model, args, kw = _tiny_denoiser_on_the_engine("flux")
    unfused = model(*args, **kw)[0]
    from svdquant.kernels import modulate

    monkeypatch.setattr(modulate, "ENABLED", True)
    monkeypatch.setattr(modulate, "FUSE_GATE_NORM", gate_norm)
    calls = _count_kernel_calls(
        monkeypatch,
        svdq_mlp_triton="mlp",
        svdq_linear_cat_triton="cat",
        rms_norm_rope="rope",
        layer_norm_modulate="norm",
        gate_residual="gate",
        gate_residual_modulate="gate_norm",
    )
    svdquant.fuse_projections(model)
    assert type(model.transformer_blocks[0].ff).__name__ == "FusedGeluFeedForward"
    fused = model(*args, **kw)[0]
    n_double, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
    # q and k of every attention normalized, concatenated and rotated in one pass each
    # and the blocks' adaptive norms modulate (norm1, norm1_context, norm2, norm2_context;
    # the single block's norm) and their gated residuals join in one pass each
    # (kernels.modulate.ENABLED) — with FUSE_GATE_NORM, each attention output's gated sum
    # and the feed-forward's norm after it in one pass (two a double block)
    fused_pairs = 2 * n_double if gate_norm else 0
    assert calls == {"mlp": 2 * n_double, "cat": n_single, "rope": 2 * (n_double + n_single),
                     "norm": 4 * n_double + n_single - fused_pairs,
                     "gate": 4 * n_double + n_single - fused_pairs,
                     "gate_norm": fused_pairs}  # fmt: skip
    assert rel_err(fused, unfused) <= TOL
    split = svdquant.SVDQLinear.forward_split
    # the MLP's GELU in the fused GEMM (ops.ACT_IN_GEMM), or in proj_out's quantize
    for in_gemm in (True, False) if not gate_norm else ():
        with monkeypatch.context() as mp:
            acts: list[str] = []
            mp.setattr(svdquant.kernels.ops, "ACT_IN_GEMM", in_gemm)
            mp.setattr(svdquant.SVDQLinear, "forward_split",
                       lambda *a, acts=acts, **k: acts.append(k.get("last_act", a[-1]))
                       or split(*a, **k))  # fmt: skip
            assert rel_err(model(*args, **kw)[0], fused) <= TOL
            assert acts.count("gelu_tanh") == (n_single if in_gemm else 0)
    # kept fp8 weights (svdquant.keep_fp8_weights): the same step, no widen; compiled too
    layers = [m for m in model.modules() if isinstance(m, svdquant.SVDQLinear)]
    layers = [m for m in layers if m.act_fmt != "none"]  # the modulation's W4A16: none
    assert svdquant.keep_fp8_weights(model) == len(layers)
    with monkeypatch.context() as mp:
        banned = lambda *a, **k: pytest.fail("widened at the call")  # noqa: E731
        mp.setattr(svdquant.kernels.ops._EAGER, "widen_weight", banned)
        mp.setattr(svdquant.kernels.ops._EAGER, "quantize_and_widen", banned)
        assert torch.equal(model(*args, **kw)[0], fused)
    torch._dynamo.reset()  # Inductor on the GPU; the CPU checks the trace (no C++ build)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    assert rel_err(compiled(*args, **kw)[0], fused) <= TOL
    if DEVICE == "cuda":  # the codes in host memory: the same step, eager and compiled
        svdquant.keep_fp8_weights(model, codes_on_host=True)
        assert all(m.codes_on_host() for m in layers)
        assert torch.equal(model(*args, **kw)[0], fused)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        assert rel_err(compiled(*args, **kw)[0], fused) <= TOL
    svdquant.unfuse_projections(model)  # the unfused layers keep theirs
    layers = [m for m in model.modules() if isinstance(m, svdquant.SVDQLinear)]
    assert all((m.fp8_weights() is not None) == (m.act_fmt != "none") for m in layers)
    assert type(model.transformer_blocks[0].ff).__name__ == "FeedForward"
    assert type(model.transformer_blocks[0].norm1).__name__ == "AdaLayerNormZero"
    assert type(model.transformer_blocks[0]).__name__ == "FluxTransformerBlock"
    assert type(model.single_transformer_blocks[0].norm).__name__ == "AdaLayerNormZeroSingle"
    assert not svdquant.fuse.is_fused(model)


@torch.no_grad()
def test_fused_pixart_runtime_on_the_engine(monkeypatch):
    """``fuse_projections`` on a tiny PixArt-Σ transformer, on the engine: q/k/v of each
    self-attention and k/v of each cross-attention as one layer, each feed-forward as a
    fused MLP, each block's norms and residual sums in four kernel passes — the unfused
    engine's output within bf16 rounding (in bf16: the norm and residual kernels take
    16-bit streams, not the tiny model's fp32), with ``modulate.ENABLED`` off too
    (diffusers' passes); unfusing restores diffusers' block class."""
    from svdquant.kernels import modulate, reference

    model, args, kw = _tiny_denoiser_on_the_engine("pixart", torch.bfloat16)
    calls = _count_kernel_calls(
        monkeypatch,
        svdq_linear_triton="linear",
        svdq_linear_split_triton="split",
        svdq_mlp_triton="mlp",
        layer_norm_modulate="norm",
        gate_residual="gate",
        gate_residual_modulate="gate_norm",
    )
    unfused = model(*args, **kw)[0]
    separate = dict(calls)
    n_blocks = len(model.transformer_blocks)
    assert svdquant.fuse_projections(model) == 2 * n_blocks
    assert {type(b).__name__ for b in model.transformer_blocks} == {"FusedAdaNormSingleBlock"}
    calls.update(dict.fromkeys(calls, 0))
    for name in ("layer_norm_modulate_ref", "gate_residual_ref", "gate_residual_modulate_ref"):
        monkeypatch.setattr(reference, name, None)  # the kernels run, not diffusers' passes
    fused = model(*args, **kw)[0]
    # a block's 8 quantized projections (q, k, v, out; the cross-attention's too) and 2
    # MLP layers; fused: qkv, out, cross q, cross kv, cross out and one fused MLP
    assert separate == {"linear": 10 * n_blocks, "split": 0, "mlp": 0, "norm": 0, "gate": 0,
                        "gate_norm": 0}  # fmt: skip
    assert calls["linear"] + calls["split"] == 5 * n_blocks and calls["mlp"] == n_blocks
    assert (calls["norm"], calls["gate"], calls["gate_norm"]) == (n_blocks, 2 * n_blocks, n_blocks)
    assert rel_err(fused, unfused) <= TOL
    monkeypatch.setattr(modulate, "ENABLED", False)  # diffusers' passes in the fused block
    assert rel_err(model(*args, **kw)[0], unfused) <= TOL
    assert calls["norm"] + calls["gate"] + calls["gate_norm"] == 4 * n_blocks  # none more
    monkeypatch.undo()
    svdquant.unfuse_projections(model)
    assert {type(b).__name__ for b in model.transformer_blocks} == {"BasicTransformerBlock"}
    assert rel_err(model(*args, **kw)[0], unfused) == 0


@torch.no_grad()
def test_fused_sana_blocks_on_the_engine(monkeypatch):
    """``fuse_projections`` on a tiny SANA transformer (bf16), on the engine: each block's
    norms and residual sums in four kernel passes (its GLUMBConv feed-forward in between,
    on NCHW views), its linear self-attention's q/k/v as one layer — the unfused engine's
    output within bf16 rounding; unfusing restores diffusers' block class."""
    from svdquant.kernels import modulate, reference

    monkeypatch.setattr(modulate, "TILE", (64, 4))  # 512 rows: the interpreter's programs
    model, args, kw = _tiny_denoiser_on_the_engine("sana", torch.bfloat16)
    unfused = model(*args, **kw)[0]
    calls = _count_kernel_calls(
        monkeypatch, layer_norm_modulate="norm", gate_residual="gate",
        gate_residual_modulate="gate_norm",
    )  # fmt: skip
    svdquant.fuse_projections(model)
    n = len(model.transformer_blocks)
    assert {type(b).__name__ for b in model.transformer_blocks} == {"FusedSanaTransformerBlock"}
    for name in ("layer_norm_modulate_ref", "gate_residual_ref", "gate_residual_modulate_ref"):
        monkeypatch.setattr(reference, name, None)  # the kernels run, not diffusers' passes
    fused = model(*args, **kw)[0]
    assert calls == {"norm": n, "gate": 2 * n, "gate_norm": n}
    attn1 = model.transformer_blocks[0].attn1  # the linear self-attention: one q/k/v layer
    assert type(attn1.processor).__name__ == "FusedLinearAttnProcessor"
    assert rel_err(fused, unfused) <= TOL
    monkeypatch.undo()
    svdquant.unfuse_projections(model)
    assert {type(b).__name__ for b in model.transformer_blocks} == {"SanaTransformerBlock"}


@torch.no_grad()
def test_fused_sdxl_runtime_on_the_engine(monkeypatch):
    """``fuse_projections`` on a tiny SDXL UNet, on the engine: each GEGLU feed-forward's
    up projection writes the down projection's input (``svdq_geglu_triton``; without
    ``ops.GEGLU_EPILOGUE`` the down projection quantizes ``x · gelu(gate)`` from the up
    projection's two halves, ``forward_gated``) — each feed-forward the unfused engine's
    within bf16 rounding both ways (the whole random tiny UNet amplifies a single fp8
    rounding flip, from the kernel's erf against torch's, to the size of the quantization
    noise); unfusing restores diffusers' classes (``test_forward_gated_on_the_engine`` and
    ``test_fused_geglu_matches_unfused`` compile the fused paths)."""
    from svdquant.kernels import ops

    monkeypatch.setattr(ops, "GATED_MIN_ROWS", 1)  # the tiny model's few tokens too
    model, args, kw = _tiny_denoiser_on_the_engine("sdxl")
    calls = _count_kernel_calls(
        monkeypatch, svdq_geglu_triton="epilogue", svdq_linear_gated_triton="quantize"
    )
    ffs = [m for m in model.modules() if type(m).__name__ == "FeedForward"]
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        ff.register_forward_pre_hook(lambda _m, a, i=i: inputs.setdefault(i, a[0]))
        for i, ff in enumerate(ffs)
    ]
    unfused = model(*args, **kw)[0]
    for h in hooks:
        h.remove()
    separate = [ffs[i](x) for i, x in sorted(inputs.items())]
    assert ffs and len(inputs) == len(ffs) and calls == {"epilogue": 0, "quantize": 0}
    svdquant.fuse_projections(model)
    assert all(type(m).__name__ == "FusedGegluFeedForward" for m in ffs)
    for epilogue in (True, False):
        monkeypatch.setattr(ops, "GEGLU_EPILOGUE", epilogue)
        for (i, x), y in zip(sorted(inputs.items()), separate, strict=True):
            assert rel_err(ffs[i](x), y) <= TOL
    assert calls == {"epilogue": len(ffs), "quantize": len(ffs)}
    monkeypatch.setattr(ops, "GEGLU_EPILOGUE", True)
    fused = model(*args, **kw)[0]
    assert rel_err(fused, unfused) <= 0.05
    svdquant.unfuse_projections(model)
    assert all(type(m).__name__ == "FeedForward" for m in ffs)
    assert torch.equal(ffs[0](inputs[0]), separate[0])


def test_eager_calls_on_a_gpu_get_one_hint(monkeypatch):
    """A model whose quantized layers keep running eagerly on a GPU (a user's own
    ``pipe(...)`` loop) gets one hint to replay its steps (``cuda_graphed`` or
    ``torch.compile``), once per process; not on the CPU, not while a graph is captured."""
    import warnings

    from svdquant.kernels import ops

    _, layer, calib = _layer("int4", "int4", k=64, n=16)
    layer.backend = "triton"
    monkeypatch.setattr(ops, "EAGER_HINT_AFTER", 5)
    monkeypatch.setattr(ops, "_EAGER_CALLS", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):  # two ops a call
            layer(calib[:3])
    assert DEVICE == "cuda" or not [w for w in caught if "cuda_graphed" in str(w.message)]
    monkeypatch.setattr(ops, "_EAGER_CALLS", 0)
    monkeypatch.setattr(ops, "_on_gpu_eagerly", lambda x: True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(8):
            layer(calib[:3])
    hints = [w for w in caught if "cuda_graphed" in str(w.message)]
    assert len(hints) == 1 and "torch.compile" in str(hints[0].message)


def test_act_code_takes_the_fast_reciprocal_only_where_kernels_compile(monkeypatch):
    """``_triton_common.act_code``: GELU-tanh's fast-reciprocal form (4) only with
    ``FAST_RCP`` on and the kernels compiled (inline PTX does not run in triton's
    interpreter); every other activation keeps its code."""
    from svdquant.kernels import _triton_common as tc

    assert tc.FAST_RCP  # the default since v47
    monkeypatch.setattr(tc, "FAST_RCP", False)
    monkeypatch.setattr(tc, "interpreting", lambda: False)
    assert {n: tc.act_code(n) for n in tc.ACTIVATIONS} == tc.ACTIVATIONS
    monkeypatch.setattr(tc, "FAST_RCP", True)
    monkeypatch.setattr(tc, "interpreting", lambda: False)
    assert tc.act_code("gelu_tanh") == 4
    assert [tc.act_code(n) for n in ("none", "silu", "gelu")] == [0, 2, 3]
    monkeypatch.setattr(tc, "interpreting", lambda: True)
    assert tc.act_code("gelu_tanh") == 1
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        tc.act_code("relu")


@pytest.mark.gpu
def test_gpu_fast_rcp_gives_the_same_bytes(monkeypatch):
    """``_triton_common.FAST_RCP`` (GELU-tanh's ``1 / (exp(2u) + 1)`` without the
    division's range check): the same codes, bit for bit, as the division in every kernel
    that applies GELU-tanh — the Triton GEMM's next-layer epilogue, the gated GEMM, the
    gated quantize and gemm_ws's next-layer epilogue — on inputs reaching the range
    check's side (y past ~10); the low-rank sums (fp32 atomics, in any order) within
    rounding."""
    from svdquant.kernels import _triton_common as tc
    from svdquant.kernels import gemm, gemm_gated, gemm_ws, quantize

    def both(fn):
        outs = []
        for fast in (False, True):
            monkeypatch.setattr(tc, "FAST_RCP", fast)
            outs.append(fn())
        return outs

    def same(a, b):
        assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8))
        if a[1].numel():
            assert rel_err(a[1], b[1]) < 1e-6

    m, n, k = 1000, 640, 336
    down2, _ = _lowrank(8, n, 32, torch.bfloat16)
    xq, wq, s_ch, *rest = _gemm_args(m, n, k, 11, r=32)
    args = (xq, wq, s_ch * 8, *rest, "gelu_tanh", _smooth(n), down2,
            torch.tensor(0.05, device=DEVICE), n, "int4")  # fmt: skip
    same(*both(lambda: fp8_gemm_quantize_next(*args)))
    gated = list(_gated_next_args(m, 320, k, 32, "gelu_tanh", "int4", True, r2=32))
    gated[2] = gated[2] * 8  # outputs past the division's range check (y > ~10)
    same(*both(lambda: gemm_gated.fp8_gemm_gated_next(*gated)))
    x = (torch.randn(m, 2 * n, generator=_gen(12)) * 20).to(DEVICE, torch.bfloat16)
    v, g = x.chunk(2, dim=-1)
    s = torch.tensor(0.05, device=DEVICE)
    same(*both(lambda: quantize.quantize_act(v, _smooth(n), down2, s, n, "int4", g,
                                             "gelu_tanh", gated=True)))  # fmt: skip
    if gemm_ws.available(torch.device(DEVICE)):
        for fmt in ("int4", "fp8"):
            a = (*args[:13], fmt)

            def ws(a=a):
                nxt = gemm.next_layer_input(m, n, args[0].device, *a[8:])[2]
                return gemm_ws.fp8_gemm_ws_next(*a[:8], nxt)

            same(*both(ws))
