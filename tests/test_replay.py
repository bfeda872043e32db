"""``kernels.replay``: an eager layer call recorded twice alike, then replayed — the same
kernels on the new input's and fresh buffers' addresses, nothing else — and every call it
cannot redo left on its own path. On the CPU against a stand-in kernel (whose runs the
interpreter path makes) and real layers in the Triton interpreter; on the GPU against the
real kernels."""

from __future__ import annotations

import copy
import dataclasses
import gc
import pickle
import weakref

import pytest
import torch

import svdquant
from svdquant.kernels import replay
from svdquant.kernels.launch import launch


class _Kernel:
    """Stands in for a kernel: ``k[grid](x, out, sums, w, n, SCALE=...)`` writes
    ``out = x · w · SCALE`` and adds ``x``'s row sums into ``sums``; records each run."""

    def __init__(self) -> None:
        self.runs: list[tuple] = []

    def __getitem__(self, grid):
        def run(x, out, sums, w, n, SCALE=1.0):
            self.runs.append((grid, x, out, sums, w, n, SCALE))
            out.copy_(x * w * SCALE)
            sums.add_(x.sum(-1))

        return run


class _Owner:
    """A layer's stand-in: a weight and what a call of it does."""

    def __init__(self, kernel: _Kernel, body=None) -> None:
        self.w = torch.randn(8)
        self.kernel = kernel
        self.body = body or self.plain

    def plain(self, x):
        x2 = x.reshape(-1, 8)
        out = torch.empty(x2.shape[0], 8)
        sums = torch.zeros(x2.shape[0])
        launch(self.kernel, (x2.shape[0], 1), x2, out, sums, self.w, x2.shape[0], SCALE=2.0)
        return out.view(x.shape), sums

    def __call__(self, x):
        return replay.call(self, ("plain",), (x,), self.body, lambda: (self.w,))


def _plans(owner) -> dict:
    return owner.__dict__.get(replay._ATTR, (None, None, {}))[2]


def _has_plan(owner) -> bool:
    return any(isinstance(p, replay._Plan) for p in _plans(owner).values())


def test_a_call_recorded_twice_alike_is_replayed_on_new_buffers():
    k = _Kernel()
    owner = _Owner(k)
    xs = [torch.randn(2, 3, 8) for _ in range(4)]
    outs = [owner(x) for x in xs]
    assert _has_plan(owner)
    assert len(k.runs) == 4
    for x, (out, sums) in zip(xs, outs, strict=True):
        assert torch.equal(out, x * owner.w * 2.0)
        assert torch.equal(sums, x.reshape(-1, 8).sum(-1))  # the zeroed buffer came zeroed
    grid, x2, out, sums, w, n, scale = k.runs[3]  # the replay's run
    assert grid == (6, 1) and n == 6 and scale == 2.0 and w is owner.w
    assert x2.data_ptr() == xs[3].data_ptr() and x2.shape == (6, 8)
    assert out.data_ptr() == outs[3][0].data_ptr()  # what it returns is what it launched on
    assert out.data_ptr() != outs[2][0].data_ptr()  # fresh buffers: an output lives on


def test_the_first_recording_holds_no_buffers():
    owner = _Owner(_Kernel())
    owner(torch.randn(4, 8))
    (entry,) = _plans(owner).values()

    def tensors(v):
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, tuple):
            for e in v:
                yield from tensors(e)

    assert isinstance(entry, tuple) and not list(tensors(entry))


def test_a_new_signature_is_recorded_apart():
    k = _Kernel()
    owner = _Owner(k)
    for _ in range(3):
        owner(torch.randn(4, 8))
    assert _has_plan(owner)
    base = torch.randn(41)
    odd = base[1:33].view(4, 8)  # 4-byte aligned, not 16: another kernel specialization
    out, _ = owner(odd)
    assert torch.equal(out, odd * owner.w * 2.0)
    assert len(_plans(owner)) == 2
    out, _ = owner(torch.randn(5, 8))
    assert len(_plans(owner)) == 3 and out.shape == (5, 8)


def test_a_changed_weight_drops_the_replays():
    owner = _Owner(_Kernel())
    for _ in range(3):
        owner(torch.randn(4, 8))
    owner.w.mul_(3.0)  # in place: a new version
    x = torch.randn(4, 8)
    assert torch.equal(owner(x)[0], x * owner.w * 2.0)
    assert not _has_plan(owner)
    owner.w = torch.randn(8)  # replaced
    for _ in range(3):
        x = torch.randn(4, 8)
        assert torch.equal(owner(x)[0], x * owner.w * 2.0)
    assert _has_plan(owner)
    replay.clear()  # (the engine's constants changed)
    owner(x)
    assert not _has_plan(owner)


def test_setting_an_engine_constant_drops_the_replays(monkeypatch):
    from svdquant.kernels import gemm

    owner = _Owner(_Kernel())
    for _ in range(3):
        owner(torch.randn(4, 8))
    assert _has_plan(owner)  # (each recording set launch.RECORDER: not an engine constant)
    monkeypatch.setattr(gemm, "WS_GEMM", not gemm.WS_GEMM)
    owner(torch.randn(4, 8))
    assert not _has_plan(owner)


def test_calls_it_cannot_redo_stay_on_their_own_path():
    k = _Kernel()

    def with_product(self, x):  # a cuBLAS product beside the kernel
        out, sums = self.plain(x)
        return out + torch.mm(x, torch.eye(8)), sums

    def zeroed_late(self, x):  # a zero fill after a launch used the buffer
        out, sums = self.plain(x)
        sums.zero_()
        return out, sums

    def returns_input(self, x):
        self.plain(x)
        return x

    def no_launch(self, x):
        return torch.empty_like(x)

    for body in (with_product, zeroed_late, returns_input, no_launch):
        owner = _Owner(k)
        owner.body = body.__get__(owner)
        for _ in range(4):
            x = torch.randn(4, 8)
            got = owner(x)
            if body is with_product:
                assert torch.equal(got[0], x * owner.w * 2.0 + x)
        assert not _has_plan(owner), body.__name__


def test_off_and_nested_calls_take_their_own_path(monkeypatch):
    k = _Kernel()
    inner = _Owner(k)
    outer = _Owner(k, body=lambda x: inner(x))
    for _ in range(3):
        outer(torch.randn(4, 8))
    assert _has_plan(outer) and not _plans(inner)  # the inner call ran inside the recording
    monkeypatch.setattr(replay, "ENABLED", False)
    owner = _Owner(k)
    for _ in range(3):
        owner(torch.randn(4, 8))
    assert not _plans(owner)


@dataclasses.dataclass
class _Descriptor:
    base: torch.Tensor
    shape: list
    strides: list
    block_shape: list


def test_descriptors_of_fresh_buffers_are_made_anew():
    seen = []

    class K:
        def __getitem__(self, grid):
            def run(d, x):
                seen.append(d)
                d.base.copy_(x)

            return run

    kernel = K()

    def body(x):
        out = torch.empty(4, 8)
        launch(kernel, (1,), _Descriptor(out, [4, 8], [8, 1], [2, 8]), x)
        return out

    owner = object.__new__(_Owner)
    xs = [torch.randn(4, 8) for _ in range(3)]
    outs = [replay.call(owner, (), (x,), body, tuple) for x in xs]
    assert _has_plan(owner)
    assert all(torch.equal(o, x) for o, x in zip(outs, xs, strict=True))
    assert seen[2].base is outs[2] and seen[2].block_shape == [2, 8]


def _layer(act_fmt: str = "int4", rank: int = 16, n: int = 80, k: int = 96):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n).bfloat16()
    q = svdquant.quantize_linear(lin, torch.randn(64, k).bfloat16(), act_fmt=act_fmt, rank=rank)
    q.backend = "triton"
    return q


def _calls(q, method: str, inputs):
    fn = getattr(q, method)
    with torch.no_grad():
        return [fn(*args) for args in inputs]


@pytest.mark.parametrize("case", ["forward", "kept", "w4a16", "split", "gated", "cat"])
def test_layers_replay_their_own_numbers(case, monkeypatch):
    """A layer's calls on the engine (Triton interpreter) replayed from the third on: the
    same numbers as its own path, bit for bit (the interpreter runs the atomics in order)."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).bfloat16()

    q = _layer("none" if case == "w4a16" else "int4", n=512 if case == "split" else 80)
    method, inputs = "forward", [(rnd(2, 3, 96),) for _ in range(3)]
    if case == "kept":
        svdquant.keep_fp8_weights(q)
    elif case == "w4a16":
        inputs = [(rnd(2, 96),) for _ in range(3)]
    elif case == "split":
        method = "forward_split"
        inputs = [(rnd(5, 96), [256, 256]) for _ in range(3)]
    elif case == "gated":  # (the quantize reads both halves: from 2048 rows on the GPU)
        monkeypatch.setattr(svdquant.kernels.ops, "GATED_MIN_ROWS", 1)
        method = "forward_gated"
        inputs = [(h[..., :96], h[..., 96:]) for h in (rnd(5, 192) for _ in range(3))]
    elif case == "cat":
        q = _layer(k=96 + 64)
        method = "forward_cat"
        inputs = [(rnd(5, 96), rnd(5, 64), "gelu_tanh") for _ in range(3)]
    got = _calls(q, method, inputs)
    assert _has_plan(q), case
    monkeypatch.setattr(replay, "ENABLED", False)
    want = _calls(q, method, inputs)
    for a, b in zip(got, want, strict=True):
        for ta, tb in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,),
                          strict=True):  # fmt: skip
            assert torch.equal(ta, tb)


def test_a_layer_follows_its_weights_and_copies():
    q = _layer()
    xs = [torch.randn(3, 96).bfloat16() for _ in range(3)]
    _calls(q, "forward", [(x,) for x in xs])
    assert _has_plan(q)
    with torch.no_grad():
        q.lowrank_up.mul_(2.0)  # in place: the replays are dropped
        got = q(xs[0])
        q.bias = torch.nn.Parameter(torch.zeros_like(q.bias))
        got2 = q(xs[0])
        replay.ENABLED = False
        try:
            assert torch.equal(got2, q(xs[0]))
        finally:
            replay.ENABLED = True
    assert not torch.equal(got, got2)
    _calls(q, "forward", [(x,) for x in xs])
    assert _has_plan(q)
    old = weakref.ref(q.bias)
    q.bias = torch.nn.Parameter(torch.ones_like(q.bias))  # replaced: the replays let it go
    gc.collect()
    assert old() is None and not _has_plan(q)
    with torch.no_grad():
        got3 = q(xs[0])
    assert torch.allclose(got3.float(), got2.float() + 1.0, atol=0.07)
    for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert replay._ATTR not in clone.__dict__
        with torch.no_grad():
            assert torch.equal(clone(xs[0]), got3)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["forward", "kept", "w4a16", "gated", "rows1024"])
def test_gpu_replayed_layers_match_their_own_path(case, monkeypatch):
    """The real kernels: replayed calls within the atomics' rounding of the layer's own path
    (the quantize's K splits add in any order), through each compiled kernel's launcher."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(320, 200).cuda().bfloat16()
    q = svdquant.quantize_linear(
        lin, torch.randn(64, 320, device="cuda").bfloat16(), rank=16,
        act_fmt="none" if case == "w4a16" else "int4",
    )  # fmt: skip
    q.backend = "triton"
    rows = {"w4a16": 3, "rows1024": 1024}.get(case, 70)
    if case == "kept":
        svdquant.keep_fp8_weights(q)
    if case == "gated":
        rows = 2048  # (the quantize reads both halves)
        q2 = svdquant.quantize_linear(
            torch.nn.Linear(320, 200).cuda().bfloat16(),
            torch.randn(64, 320, device="cuda").bfloat16(),
            rank=16,
        )
        q2.backend = "triton"
        hs = [torch.randn(rows, 640, device="cuda").bfloat16() for _ in range(4)]
        inputs = [(h[:, :320], h[:, 320:]) for h in hs]
        fn = q2.forward_gated
        q = q2
    else:
        inputs = [(torch.randn(rows, 320, device="cuda").bfloat16(),) for _ in range(4)]
        fn = q.forward
    with torch.no_grad():
        got = [fn(*a) for a in inputs]
        assert _has_plan(q)
        monkeypatch.setattr(replay, "ENABLED", False)
        want = [fn(*a) for a in inputs]
    for a, b in zip(got, want, strict=True):
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert err < 4e-3, err
