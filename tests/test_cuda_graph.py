"""``svdquant.cuda_graphed``: a denoiser's forward replayed from CUDA graphs.

On the CPU the wrapper passes every call through (what runs in CI: a real diffusers
pipeline accepts it); the capture and replay run with ``pytest -m gpu`` on the device.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import svdquant
from svdquant.cuda_graph import CUDAGraphed, _clone, _flatten, _Uncapturable

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _tiny_flux(quantized: bool):
    from svdquant.models.tiny import tiny_call_kwargs, tiny_pipeline
    from svdquant.pipeline import pipeline_calibration
    from svdquant.quantize_model import QuantizeConfig, quantize_model

    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs("flux")
    if quantized:
        calib = pipeline_calibration(pipe, ["a red fox"], progress=False, **kwargs)
        quantize_model(pipe.transformer, calib, QuantizeConfig(rank=8, alpha=0.5, progress=False))
    return pipe.to(DEVICE), kwargs


def _generate(pipe, kwargs) -> torch.Tensor:
    gen = torch.Generator("cpu").manual_seed(0)
    out = pipe(prompt=["a lighthouse at dusk"], generator=gen, output_type="latent", **kwargs)
    return out.images.float().cpu()


@pytest.mark.parametrize("quantized", [False, True])
def test_pipeline_with_a_graphed_denoiser_gives_the_same_latents(quantized):
    """The FLUX pipeline calls the wrapped transformer as before (its ``config``,
    ``cache_context``, ... come from the module inside); on a GPU the steps after the
    first two replay one graph, and the latents are the eager ones."""
    pipe, kwargs = _tiny_flux(quantized)
    eager = _generate(pipe, kwargs)
    inner = pipe.transformer
    pipe.transformer = svdquant.cuda_graphed(inner)
    assert svdquant.cuda_graphed(pipe.transformer) is pipe.transformer
    assert pipe.transformer.config is inner.config
    graphed = _generate(pipe, kwargs)
    assert pipe.transformer.num_graphs == (1 if CUDA else 0)
    assert torch.allclose(graphed, eager, rtol=1e-4, atol=1e-5)
    again = _generate(pipe, kwargs)  # replayed from the first step on
    assert torch.allclose(again, eager, rtol=1e-4, atol=1e-5)
    pipe.transformer.reset()
    assert pipe.transformer.num_graphs == 0


def test_fusing_a_graphed_model_drops_its_graphs():
    """``fuse_projections`` / ``unfuse_projections`` reach the layers inside the wrapper
    and drop its graphs, which read the layers they replace."""
    pipe, _ = _tiny_flux(quantized=True)
    graphed = svdquant.cuda_graphed(pipe.transformer)
    resets = []
    graphed.reset = lambda: resets.append(1)
    assert svdquant.fuse_projections(graphed) > 0 and len(resets) == 1
    assert svdquant.unfuse_projections(graphed) > 0 and len(resets) == 2


def test_moving_the_wrapper_drops_its_graphs_only_when_a_tensor_moves():
    """A move or cast of the wrapper drops the graphs, which read the old tensors; a move
    that leaves every tensor where it was (accelerate's CPU offload moves the model to its
    device before each call) keeps them."""
    g = svdquant.cuda_graphed(torch.nn.Linear(4, 3))
    g._graphs["sentinel"] = None
    g.to("cpu")
    assert g.num_graphs == 1
    g.to(torch.float64)
    assert g.num_graphs == 0 and g.module.weight.dtype == torch.float64
    g._graphs["sentinel"] = None
    g.module.to(torch.float32)  # the inner module moved behind the wrapper's back:
    assert g.num_graphs == 1  # unseen (``reset()`` is for that; offload hooks the wrapper)
    g.float()
    assert g.num_graphs == 1


def test_bad_arguments_are_refused():
    """A wrapper of something that is not a module, or of no graphs, is refused clearly."""
    with pytest.raises(TypeError, match=r"wraps a torch\.nn\.Module, got function"):
        svdquant.cuda_graphed(lambda x: x)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_graphs must be a positive int"):
            svdquant.cuda_graphed(torch.nn.Linear(2, 2), max_graphs=bad)


def test_signatures_and_outputs():
    """A signature is the tensors' shapes, dtypes and devices and every other value;
    arguments a graph cannot take are refused; outputs are copied."""
    x = torch.zeros(2, 3, device=DEVICE)

    def key(*args, **kwargs):
        return _flatten((args, kwargs), [])

    if CUDA:
        assert key(x, t=1.0) == key(x + 1, t=1.0)
        assert key(x, t=1.0) != key(x, t=2.0)
        assert key(x) != key(x[:1])
        assert key(x) != key(x.half())
        with pytest.raises(_Uncapturable, match="an argument of type"):
            key(x, [1], extra={"a": set()})
    with pytest.raises(_Uncapturable, match="cpu tensor"):
        key(torch.zeros(2))

    @dataclasses.dataclass
    class Output:
        sample: torch.Tensor

    out = (Output(x), {"a": x}, [x, 3])
    copy = _clone(out)
    assert isinstance(copy[0], Output) and copy[0].sample is not x
    assert torch.equal(copy[0].sample, x) and copy[1]["a"] is not x and copy[2][1] == 3


class _Sync(torch.nn.Module):
    def forward(self, x):
        return x * x.sum().item()  # a host sync: not capturable


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device: pytest -m gpu)")
@torch.no_grad()
def test_gpu_graphs_per_signature_and_fallbacks():
    """One graph per signature up to ``max_graphs`` (then eager); changed inputs are
    copied in before each replay; a forward that cannot be captured warns once and runs
    eagerly from then on; gradients enabled run eagerly."""
    lin = torch.nn.Linear(64, 32).cuda()
    g = svdquant.cuda_graphed(lin, max_graphs=1)
    xs = [torch.randn(5, 64, device="cuda") for _ in range(4)]
    for x in xs:
        assert torch.allclose(g(x), lin(x), rtol=1e-5, atol=1e-6)
    assert g.num_graphs == 1
    for x in (torch.randn(7, 64, device="cuda"),) * 3:  # a second signature: eager
        assert torch.allclose(g(x), lin(x), rtol=1e-5, atol=1e-6)
    assert g.num_graphs == 1
    y = g(xs[0])
    g(xs[1])
    assert torch.allclose(y, lin(xs[0]), rtol=1e-5, atol=1e-6)  # a copy, not the buffer
    h = svdquant.cuda_graphed(torch.nn.Module())
    h.module.forward = lambda x, t: x * t
    for t in range(200):  # a Python number that changes on every call: never captured
        assert torch.equal(h(xs[0], t=float(t)), xs[0] * float(t))
    assert h.num_graphs == 0 and len(h._seen) <= 64
    with torch.enable_grad():
        assert g(xs[0]).requires_grad
    s = CUDAGraphed(_Sync())
    x = torch.randn(3, device="cuda")
    s(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.allclose(s(x), x * x.sum().item())
        assert torch.allclose(s(x), x * x.sum().item())
    assert len([w for w in caught if "could not be captured" in str(w.message)]) == 1
    assert s.num_graphs == 0
    # the failed capture leaves the device's random numbers usable (it did not, v35)
    assert torch.randn(3, device="cuda").isfinite().all()
    assert torch.allclose(g(xs[2]), lin(xs[2]), rtol=1e-5, atol=1e-6)  # graphs still replay


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device: pytest -m gpu)")
@pytest.mark.parametrize("host_copy", [False, True])
def test_gpu_graphed_and_fused_under_cpu_offload(host_copy):
    """A quantized FLUX pipeline with fused projections and a graphed transformer under
    ``enable_model_cpu_offload`` (the wrapper installed first, so that the offload hook
    moves it): two images, each the same latents as the pipeline on the GPU without
    offload, each captured once (the hook's move before every step keeps the graph);
    after each image the transformer leaves the GPU and its graph goes with it. With
    ``keep_host_copy`` the transformer comes back to its pinned host copies."""
    pipe, kwargs = _tiny_flux(quantized=True)
    svdquant.fuse_projections(pipe.transformer)
    reference = _generate(pipe, kwargs)
    pipe.to("cpu")
    if host_copy:
        svdquant.keep_host_copy(pipe.transformer)
    graphed = svdquant.cuda_graphed(pipe.transformer)
    captures = []
    real = graphed._capture
    graphed._capture = lambda *a: captures.append(1) or real(*a)
    pipe.transformer = graphed
    pipe.enable_model_cpu_offload(device="cuda")
    for i in range(2):
        out = _generate(pipe, kwargs)
        assert torch.allclose(out, reference, rtol=1e-4, atol=1e-5)
        assert len(captures) == i + 1  # one capture an image, replayed for its later steps
        assert graphed.num_graphs == 0 and graphed.module.device.type == "cpu"
        if host_copy:
            assert all(t.is_pinned() for t in graphed.module.parameters())


def test_kept_copies_record_their_sources():
    """``kernels.kept``: inside ``recording`` (a capture) a kept copy used — the folded
    L_down served again, not made — notes its sources; they count as unchanged until
    changed in place or freed."""
    from svdquant.kernels import kept
    from svdquant.kernels import quantize as qmod

    ld, s = torch.randn(160, 64).bfloat16(), torch.rand(64) + 0.5
    with kept.recording() as sources:
        qmod.folded_down(ld, s)  # made now (a graph would replay the making): not noted
        assert not sources
        qmod.folded_down(ld, s)
    assert len(sources) == 2 and kept.unchanged(sources)
    kept.used(ld)  # outside a recording: nothing
    assert len(sources) == 2
    s.mul_(2)
    assert not kept.unchanged(sources)
    t = torch.ones(3)
    with kept.recording() as gone:
        kept.used(t)
    assert kept.unchanged(gone)
    del t
    assert not kept.unchanged(gone)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device: pytest -m gpu)")
@torch.no_grad()
@pytest.mark.parametrize("keep_fp8", [False, True])
def test_gpu_graphs_never_replay_a_stale_kept_copy(keep_fp8):
    """A graphed layer whose replay uses a copy the engine keeps — the folded L_down of a
    rank-160 branch (``quantize.WIDE_BY_MM``), a kept fp8 weight — and whose source then
    changes in place (``load_state_dict``): the next call gives the eager numbers of the
    changed layer, and the graph is captured again."""
    g = torch.Generator().manual_seed(3)
    layers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        lin = torch.nn.Linear(192, 176).to(DEVICE, torch.bfloat16)
        calib = (torch.randn(256, 192, generator=g) * 2).to(DEVICE, torch.bfloat16)
        layers.append(svdquant.quantize_linear(lin, calib, rank=160, alpha=0.5))
    layer, other = layers
    if keep_fp8:
        layer.keep_fp8_weights()
    graphed = svdquant.cuda_graphed(layer)
    x = calib[:70]

    def close(a, b):  # (a stale copy gives another layer's numbers: far off)
        return (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max()

    for _ in range(3):
        y = graphed(x)
    assert graphed.num_graphs == 1 and close(y, layer(x))
    assert all(e.sources for e in graphed._graphs.values())  # (the kept copy was replayed)
    layer.load_state_dict(other.state_dict())  # in place
    assert close(graphed(x), other(x))
    assert graphed.num_graphs == 0
    for _ in range(3):
        y = graphed(x)
    assert graphed.num_graphs == 1 and close(y, other(x))
