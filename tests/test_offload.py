"""``svdquant.keep_host_copy``: model CPU offload that moves in from pinned host copies and
out without copying unchanged weights. On the CPU the "device" is ``meta`` (no data: a
tensor that had to be copied out of it fails, which shows which ones were); the GPU tests
move real weights under diffusers' ``enable_model_cpu_offload``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import svdquant
from svdquant.offload import _target

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).requires_grad_(False)
    m.register_buffer("scale", torch.rand(4))
    return m


def _tensors(m: nn.Module) -> list[torch.Tensor]:
    return [*m.parameters(), *m.buffers()]


def test_round_trip_gives_back_the_host_tensors():
    m = svdquant.keep_host_copy(_model())
    before = [(t.data_ptr(), t.clone()) for t in _tensors(m)]
    for _ in range(2):
        m.to("meta")
        assert all(t.device.type == "meta" for t in _tensors(m))
        m.to("cpu")  # meta holds no data: only the kept host copies can come back
        for t, (ptr, value) in zip(_tensors(m), before, strict=True):
            assert t.data_ptr() == ptr and torch.equal(t, value)
    plain = _model().to("meta")
    with pytest.raises(NotImplementedError):
        plain.to("cpu")


def test_a_quantized_layer_round_trips_with_its_format_dtypes():
    """An ``SVDQLinear`` (uint8 codes, fp16 scales, fp32 smoothing) keeps every buffer's
    dtype and values through a move to the device and back; its output is unchanged."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = svdquant.quantize_linear(linear, torch.randn(16, 64), rank=4)
    x = torch.randn(3, 64)
    ref = layer(x)
    before = {k: (v.dtype, v.clone()) for k, v in layer.state_dict().items()}
    svdquant.keep_host_copy(layer).to("meta").to("cpu")
    for k, v in layer.state_dict().items():
        assert v.dtype == before[k][0] and torch.equal(v, before[k][1]), k
    assert torch.equal(layer(x), ref)


def test_a_tensor_changed_or_added_on_the_device_is_copied_out():
    m = svdquant.keep_host_copy(_model()).to("meta")
    with torch.no_grad():
        m[0].weight.mul_(2)  # in place: its version moves
    with pytest.raises(NotImplementedError):
        m.to("cpu")
    m = svdquant.keep_host_copy(_model()).to("meta")
    m.register_buffer("scale", torch.ones(4, device="meta"))  # replaced
    with pytest.raises(NotImplementedError):
        m.to("cpu")


def test_moves_under_inference_mode_copy_back():
    """Moved in under ``torch.inference_mode`` the device tensors keep no version counter:
    whether they changed cannot be told, so they are copied out (here: from meta, which
    fails — no stale host copy comes back)."""
    m = svdquant.keep_host_copy(_model())
    with torch.inference_mode():
        m.to("meta")
    with pytest.raises(NotImplementedError):
        m.to("cpu")


def test_casts_and_partial_moves_drop_the_host_copies():
    m = svdquant.keep_host_copy(_model()).to("meta")
    m.half()  # a cast on the device: the host copies are stale
    with pytest.raises(NotImplementedError):
        m.to("cpu")
    m = svdquant.keep_host_copy(_model())
    m.half()  # on the host: an ordinary cast
    assert m[0].weight.dtype == torch.float16
    m.to("meta").to("cpu")
    assert m[0].weight.dtype == torch.float16 and m[0].weight.device.type == "cpu"
    m.to("meta").to("meta")  # a move to where it is keeps them
    m.to("cpu")
    out = m.float()(torch.randn(2, 8))
    assert out.shape == (2, 4) and torch.isfinite(out).all()


def test_undo_and_bad_input():
    m = svdquant.keep_host_copy(_model())
    assert svdquant.keep_host_copy(m) is m  # twice: the same
    svdquant.keep_host_copy(m, enabled=False)
    assert "_apply" not in m.__dict__
    m.to("meta")
    with pytest.raises(NotImplementedError):
        m.to("cpu")
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        svdquant.keep_host_copy(torch.zeros(2))


def test_target_tells_moves_from_casts():
    assert _target(lambda t: t.to("meta")) == torch.device("meta")
    assert _target(lambda t: t.cpu()) == torch.device("cpu")
    assert _target(lambda t: t.share_memory_()) == torch.device("cpu")
    assert _target(lambda t: t.half() if t.is_floating_point() else t) is None
    assert _target(lambda t: t.to(torch.bfloat16)) is None
    assert _target(lambda t: t.float()) is None
    assert _target(lambda t: t.to(memory_format=torch.channels_last)) is None
    assert _target(lambda t: 3) is None


@gpu
@pytest.mark.gpu
def test_gpu_moves_in_from_pinned_and_out_without_copies():
    m = svdquant.keep_host_copy(_model())
    x = torch.randn(3, 8)
    ref = m(x)
    m.to("cuda")
    hosts = [t for t in m.__dict__["_svdq_host_copies"].values()]
    assert len(hosts) == len(_tensors(m)) and all(k.host.is_pinned() for k in hosts)
    assert torch.allclose(m(x.cuda()).cpu(), ref, atol=1e-6)
    ptrs = [k.host.data_ptr() for k in hosts]
    m.to("cpu")
    assert sorted(t.data_ptr() for t in _tensors(m)) == sorted(ptrs)  # the pinned copies
    assert all(t.is_pinned() for t in _tensors(m))
    m.to("cuda")
    with torch.no_grad():
        m[2].bias.add_(1.0)  # changed in place on the device: copied out
    m[0].weight.data = m[0].weight.data * 1  # new data, same parameter (meta cannot tell)
    m.to("cpu")
    assert torch.allclose(m(x), ref + 1.0, atol=1e-5)
    assert m[0].weight.data_ptr() not in ptrs and m[2].weight.data_ptr() in ptrs


@gpu
@pytest.mark.gpu
def test_gpu_large_weights_are_page_locked_in_place(monkeypatch):
    """A weight of at least 1 MiB is page-locked where it lies (``cudaHostRegister``: no
    copy, v40: 12x faster than pinned copies), a smaller one copied into pinned memory; both
    come back after a round trip, and the registration ends when the memory is freed."""
    from svdquant import offload

    unregistered: list[int] = []
    unregister = offload._unregister
    monkeypatch.setattr(offload, "_unregister", lambda p: (unregistered.append(p), unregister(p)))
    m = nn.Sequential(nn.Linear(1024, 512), nn.Linear(512, 4)).requires_grad_(False)
    ptr_big, ptr_small = m[0].weight.data_ptr(), m[1].weight.data_ptr()
    x = torch.randn(2, 1024)
    ref = m(x)
    svdquant.keep_host_copy(m).to("cuda")
    assert torch.allclose(m(x.cuda()).cpu(), ref, atol=1e-5)
    m.to("cpu")
    assert m[0].weight.data_ptr() == ptr_big and m[0].weight.is_pinned()
    assert m[1].weight.data_ptr() != ptr_small and m[1].weight.is_pinned()
    assert torch.equal(m(x), ref)
    del m
    import gc

    gc.collect()
    assert unregistered == [ptr_big]


@gpu
@pytest.mark.gpu
def test_gpu_refused_registration_leaves_no_cuda_error(monkeypatch):
    """Where the driver refuses to register memory (here: already registered), the weight
    falls back to a pinned copy and the refusal does not surface as the next kernel's
    error."""
    from svdquant import offload

    t = torch.randn(1 << 19)  # 2 MiB
    assert offload._register(t.untyped_storage())
    assert not offload._register(t.untyped_storage())
    y = torch.ones(4, device="cuda") + 1  # launches cleanly
    torch.cuda.synchronize()
    assert y.sum().item() == 8
    u = torch.randn(1 << 19)
    monkeypatch.setattr(offload, "_register", lambda s: False)  # refused: a pinned copy
    v = offload._page_locked(u)
    assert v.is_pinned() and v.data_ptr() != u.data_ptr() and torch.equal(v, u)
