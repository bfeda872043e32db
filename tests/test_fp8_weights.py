"""``keep_fp8_weights``: layers that keep their widened fp8 weight instead of widening the
4-bit codes at every call — the same numbers bit for bit, no widen kernel, never stale.

Without CUDA the engine runs in triton's interpreter (``TRITON_INTERPRET=1``) on small
layers; the tiny FLUX model's fused runtime checks it too (``test_kernels.py``).
"""

import copy
import io
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import svdquant
from svdquant import kernels
from svdquant.kernels import ops
from svdquant.nn import _FIXED_DTYPE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(k: int, n: int, act_fmt: str = "int4", fmt: str = "int4", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the same weights in whichever worker runs it
        torch.manual_seed(seed)
        lin = torch.nn.Linear(k, n).to(DEVICE, torch.bfloat16)
    calib = (torch.randn(64, k, generator=g) * 2).to(DEVICE, torch.bfloat16)
    layer = svdquant.quantize_linear(lin, calib, fmt=fmt, act_fmt=act_fmt, rank=8, alpha=0.5)
    layer.backend = "triton"
    return layer, calib


def _through_fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    """State ``name`` as ``.to(torch.float16).to(torch.bfloat16)`` of a layer leaves it:
    cast there and back, but for the buffers whose dtype is the format's."""
    fixed = name in _FIXED_DTYPE or t.dtype != torch.bfloat16
    return t if fixed else t.to(torch.float16).to(t.dtype)


def _no_widen(monkeypatch):
    """Make any widen of the engine (alone or beside the quantize) fail the test."""

    def banned(*a, **k):
        raise AssertionError("widened at the call")

    monkeypatch.setattr(ops._EAGER, "widen_weight", banned)
    monkeypatch.setattr(ops._EAGER, "quantize_and_widen", banned)


@pytest.mark.parametrize(("fmt", "act_fmt"), [("int4", "int4"), ("nvfp4", "fp8")])
def test_kept_weights_give_the_same_numbers_without_a_widen(monkeypatch, fmt, act_fmt):
    """The plain call, the split, the concatenated and the gated input, the fused MLP and
    the fused gated unit: equal bit for bit with and without kept weights, and no widen
    runs with them."""
    layer, x = _layer(96, 512, act_fmt, fmt)
    fc2, _ = _layer(512, 72, act_fmt, fmt, seed=1)
    down, _ = _layer(256, 40, act_fmt, fmt, seed=2)
    x3 = x[:7].reshape(1, 7, 96)
    half, gate = x3[..., :48], x3[..., 48:]
    cat, _ = _layer(96, 40, act_fmt, fmt, seed=3)
    gated, _ = _layer(48, 40, act_fmt, fmt, seed=4)

    def outputs():
        return [
            layer(x3),
            *layer.forward_split(x3, [256, 256]),  # split by the GEMM
            *layer.forward_split(x3, [100, 412], contiguous=False),
            cat.forward_cat(half, gate, "gelu_tanh"),
            kernels.svdq_linear_gated_triton(gated, half, gate, "gelu"),
            kernels.svdq_mlp_triton(x3, layer, fc2),
            kernels.svdq_geglu_triton(x3, layer, down, "gelu"),
        ]

    monkeypatch.setattr(ops, "GATED_MIN_ROWS", 1)  # the gated quantize at 7 rows
    want = outputs()
    layers = (layer, fc2, down, cat, gated)
    assert all(m.keep_fp8_weights() for m in layers)
    with monkeypatch.context() as mp:
        _no_widen(mp)
        got = outputs()
    for a, w in zip(got, want, strict=True):
        assert torch.equal(a, w)
    assert layer.fp8_weight.dtype == torch.float8_e4m3fn
    assert layer.fp8_weight.shape == (512, layer.qweight.shape[1] * 2)


def test_kept_weights_follow_the_layer_and_never_run_stale(monkeypatch):
    """Outside the state dict (checkpoints unchanged), not cast by ``.to(dtype)``, moved
    with the layer (still its weight's after the move); a weight loaded or replaced since
    is widened at the call again (new numbers, not the kept ones) until kept anew; copies
    and pickles widen per call; ``enabled=False`` releases them; layers off the fp8
    engine keep none; ``svdquant.keep_fp8_weights`` counts the layers that keep them."""
    layer, x = _layer(64, 48)
    keys = set(layer.state_dict())
    assert svdquant.keep_fp8_weights(torch.nn.Sequential(layer)) == 1
    assert set(layer.state_dict()) == keys
    layer.to(torch.float16)
    assert layer.fp8_weight.dtype == torch.float8_e4m3fn and layer.fp8_weights() is not None
    layer.to(torch.bfloat16)
    other, _ = _layer(64, 48, seed=9)
    layer.load_state_dict(other.state_dict())  # in place: the kept operand is stale
    assert layer.fp8_weights() is None
    want = other(x)
    assert torch.equal(layer(x), want)
    layer.keep_fp8_weights()
    with monkeypatch.context() as mp:
        _no_widen(mp)
        assert torch.equal(layer(x), want)
    layer.qweight = other.qweight.clone()  # a new tensor: stale too
    assert layer.fp8_weights() is None
    for _ in range(3):  # however often replaced (a freed tensor's address reused)
        layer.qweight = other.qweight.clone()
        assert layer.fp8_weights() is None
    layer.keep_fp8_weights()
    layer._apply(lambda t: t.clone())  # a move: every tensor anew, copy and codes together
    assert layer.fp8_weights() is not None
    assert layer.fp8_weights()[0].dtype == torch.float8_e4m3fn
    with monkeypatch.context() as mp:
        _no_widen(mp)
        assert torch.equal(layer(x), want)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        assert twin.fp8_weights() is None and torch.equal(twin(x), want)  # widened per call
    assert not layer.keep_fp8_weights(False) and not hasattr(layer, "fp8_weight")
    for act_fmt, backend in (("none", "triton"), ("int4", "reference")):
        m, _ = _layer(64, 48, act_fmt)
        m.backend = backend
        assert not m.keep_fp8_weights() and m.fp8_weights() is None
    with pytest.raises(TypeError, match="takes a torch"):
        svdquant.keep_fp8_weights(layer.state_dict())
    graphed = svdquant.cuda_graphed(torch.nn.Sequential(layer))  # its graphs would widen
    resets = []
    graphed.reset = lambda: resets.append(1)
    assert svdquant.keep_fp8_weights(graphed) == 1 and resets == [1]


def test_a_byte_budget_keeps_the_smallest_layers():
    """``max_bytes``: the smallest layers whose copies fit together keep them, the others
    (kept before included) widen at the call; a budget of 0 keeps none; below 0 refused."""
    from svdquant.nn import fp8_weight_bytes

    small, _ = _layer(64, 16)
    mid, _ = _layer(64, 48, seed=1)
    big, _ = _layer(128, 64, seed=2)
    model = torch.nn.ModuleList([big, small, mid])
    assert svdquant.keep_fp8_weights(model) == 3
    two = fp8_weight_bytes(small) + fp8_weight_bytes(mid)
    assert fp8_weight_bytes(small) < fp8_weight_bytes(mid) < fp8_weight_bytes(big)
    assert svdquant.keep_fp8_weights(model, max_bytes=two + 1) == 2
    assert [m.fp8_weights() is not None for m in (small, mid, big)] == [True, True, False]
    assert svdquant.keep_fp8_weights(model, max_bytes=0) == 0
    assert all(m.fp8_weights() is None for m in model)
    with pytest.raises(ValueError, match="max_bytes"):
        svdquant.keep_fp8_weights(model, max_bytes=-1)


def test_kept_weights_carry_loras(monkeypatch, tmp_path):
    """A LoRA loaded, rescaled and unloaded on a layer that keeps its fp8 weight (a LoRA
    adds low-rank terms and leaves the 4-bit weight as it is): the same outputs as the
    layer without kept weights, and still no widen."""
    from test_lora import lora_factors, write_lora

    layer, x = _layer(64, 48)
    plain = torch.nn.Module()
    plain.to_q = layer
    kept = copy.deepcopy(plain)
    assert svdquant.keep_fp8_weights(kept) == 1
    a, b = lora_factors(48, 64, 4, 0.05, seed=0)
    write_lora(tmp_path / "l.safetensors", {"to_q": (a, b)}, "peft")
    for model in (plain, kept):
        svdquant.load_lora(model, tmp_path / "l.safetensors", strength=0.7)
    with monkeypatch.context() as mp:
        _no_widen(mp)
        got = kept.to_q(x)
        svdquant.set_lora_strength(kept, "l", 0.3)
        got_03 = kept.to_q(x)
        svdquant.unload_lora(kept, "l")
        got_none = kept.to_q(x)
    assert torch.equal(got, plain.to_q(x)) and not torch.equal(got, got_none)
    svdquant.set_lora_strength(plain, "l", 0.3)
    assert torch.equal(got_03, plain.to_q(x))
    svdquant.unload_lora(plain, "l")
    assert torch.equal(got_none, plain.to_q(x))


def test_codes_on_host_budget_and_cpu_layers():
    """``codes_on_host``: the budget counts what the copies add on the GPU less the codes
    that leave; a layer on the CPU keeps its codes where they are (already host memory)
    and gives the same numbers."""
    from svdquant.nn import fp8_weight_bytes

    layer, x = _layer(64, 48)
    codes = layer.qweight.numel()
    assert fp8_weight_bytes(layer) - fp8_weight_bytes(layer, codes_on_host=True) == codes
    want = layer(x)
    assert svdquant.keep_fp8_weights(torch.nn.Sequential(layer), codes_on_host=True) == 1
    assert layer.codes_on_host() == (DEVICE != "cpu")
    assert layer.qweight.device.type == "cpu"
    assert torch.equal(layer(x), want)


@pytest.mark.gpu
def test_gpu_codes_on_host(monkeypatch):
    """``keep_fp8_weights(codes_on_host=True)`` on a GPU: the codes in host memory, the GPU
    holding the kept copy alone (the codes' bytes fewer), the same outputs with no widen;
    the state dict the same values; casts and moves leave the codes on the host (also
    after a trip through the CPU) and the copy current; a weight loaded in place makes a
    new copy from the host codes (the new numbers); fusing and unfusing keep the codes on
    the host; ``enabled=False`` brings them back."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from svdquant.fuse import _concat, _split

    layer, x = _layer(64, 48)
    other, _ = _layer(64, 48, seed=9)
    want, state = layer(x), {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.keep_fp8_weights()
    before = torch.cuda.memory_allocated()
    assert layer.keep_fp8_weights(codes_on_host=True) and layer.codes_on_host()
    assert layer.qweight.device.type == "cpu"
    assert before - torch.cuda.memory_allocated() >= layer.qweight.numel()
    with monkeypatch.context() as mp:
        _no_widen(mp)
        assert torch.equal(layer(x), want)
        layer.to(torch.float16).to(torch.bfloat16).to(DEVICE)
        assert layer.codes_on_host() and layer.fp8_weights() is not None
        assert torch.equal(layer(x), want)
        layer.cpu()  # a trip through the CPU: the codes do not come back to the GPU
        assert not layer.codes_on_host() and layer.fp8_weights() is not None
        layer.to(DEVICE)
        assert layer.codes_on_host() and torch.equal(layer(x), want)
    got = layer.state_dict()
    # the values the casts left: bf16 -> fp16 -> bf16 rounds a 16-bit value below fp16's
    # normal range (6.1e-5: a few of the low-rank factors' entries, by the seed)
    assert set(got) == set(state) and all(
        torch.equal(got[k].cpu(), _through_fp16(k, v).cpu()) for k, v in state.items()
    )
    layer.load_state_dict(other.state_dict())  # into the host codes: a new copy from them
    assert layer.codes_on_host() and torch.equal(layer(x), other(x))
    parts = [_layer(64, 48, seed=s)[0] for s in (1, 2)]
    twins = copy.deepcopy(parts)
    for p, t in zip(parts, twins, strict=True):
        p.keep_fp8_weights(codes_on_host=True)
        t.keep_fp8_weights()
    fused, fused_twin = _concat(parts), _concat(twins)
    assert fused.codes_on_host() and fused.fp8_weights() is not None
    assert not fused_twin.codes_on_host()
    assert torch.equal(fused(x), fused_twin(x))
    for part in _split(fused, [48, 48]):  # unfused: each part kept, its codes on the host
        assert part.codes_on_host() and part.fp8_weights() is not None
    assert not layer.keep_fp8_weights(False) and not layer.codes_on_host()
    assert layer.qweight.device == layer.wscales.device and torch.equal(layer(x), other(x))
    assert layer.quantized_residual().packed.device == layer.wscales.device


@pytest.mark.gpu
def test_gpu_codes_on_host_keep_cuda_graphs(monkeypatch):
    """``torch.compile(mode="reduce-overhead")`` (``generate --compile --fp8-weights``) of
    layers whose codes wait in host memory still runs as CUDA graphs — no host tensor
    reaches the graph, so Inductor skips no graph — with the eager numbers and no widen."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch._dynamo.utils import counters

    fc1, x = _layer(64, 96)
    fc2, _ = _layer(96, 48, seed=1)
    model = torch.nn.Sequential(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    for layer in (fc1, fc2):
        assert layer.keep_fp8_weights(codes_on_host=True) and layer.codes_on_host()
    want = model(x)
    _no_widen(monkeypatch)
    torch._dynamo.reset()
    counters.clear()
    graphed = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        got = graphed(x).clone()
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() <= 4e-3
    assert fc1.qweight.device.type == "cpu" and fc2.qweight.device.type == "cpu"


def test_kept_weights_note_their_sources_for_graphs():
    """A kept fp8 weight used inside ``kernels.kept.recording`` (a CUDA graph's capture)
    notes the 4-bit weight's tensors, so that ``cuda_graphed`` captures again once they
    change: unchanged until a weight is loaded in place."""
    from svdquant.kernels import kept

    layer, x = _layer(64, 48)
    other, _ = _layer(64, 48, seed=9)
    layer.keep_fp8_weights()
    with kept.recording() as sources:
        layer(x)
    assert len(sources) == 3 and kept.unchanged(sources)
    layer.load_state_dict(other.state_dict())
    assert not kept.unchanged(sources)
