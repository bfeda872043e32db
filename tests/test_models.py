"""End to end on the real diffusers classes (tiny random configs, CPU): calibrate on a
pipeline, quantize, save, load on the meta device, generate; compare with 16-bit."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from svdquant import SVDQLinear, checkpoint
from svdquant.models import ADAPTERS, PointwiseConv, UnsupportedModelError, get_adapter
from svdquant.models.tiny import ARCHITECTURES, tiny_call_kwargs, tiny_pipeline
from svdquant.pipeline import (
    denoiser,
    load_quantized_model,
    pipeline_calibration,
    quantize_pipeline,
    save_pretrained_quantized,
)
from svdquant.prompts import load_prompts
from svdquant.quantize_model import QuantizeConfig, quantize_model

PROMPTS = ["a red fox asleep in fresh snow", "a lighthouse on a cliff in a storm"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops: threads only contend (a 2-core CI box runs ~50x slower oversubscribed).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def plant_outliers(model: nn.Module, seed: int = 0) -> None:
    """Random weights have no outliers; real diffusion models do. Scale 1/32 of the input
    channels of every layer to be quantized by 8 (weight outlier channels), seeded."""
    gen = torch.Generator().manual_seed(seed)
    adapter = get_adapter(model)
    adapter.prepare(model)
    with torch.no_grad():
        for group in adapter.plan(model):
            for name in group.names:
                w = model.get_submodule(name).weight
                idx = torch.randperm(w.shape[1], generator=gen)[: max(1, w.shape[1] // 32)]
                w[:, idx] *= 8


def _sample(out):
    return out[0] if isinstance(out, tuple) else out.sample


def record_denoiser(pipe, kwargs):
    """Run the 16-bit pipeline; keep every denoiser call (inputs and output) and the
    final latents."""
    _, model = denoiser(pipe)
    calls = []

    def hook(_m, args, kw, out):
        calls.append((args, kw, _sample(out).detach().clone()))

    h = model.register_forward_hook(hook, with_kwargs=True)
    try:
        gen = torch.Generator().manual_seed(1)
        latents = pipe(prompt=PROMPTS, generator=gen, output_type="latent", **kwargs).images
    finally:
        h.remove()
    return calls, latents


@torch.no_grad()
def denoiser_error(model, calls) -> float:
    """Relative error of ``model`` against the recorded 16-bit outputs, on their inputs."""
    num = den = 0.0
    for args, kw, y in calls:
        out = _sample(model(*args, **kw)).float()
        num += (out - y.float()).pow(2).sum().item()
        den += y.float().pow(2).sum().item()
    return (num / den) ** 0.5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _quantize(pipe, model, method: str, kwargs):
    q = copy.deepcopy(model)
    calib = pipeline_calibration(
        pipe,
        load_prompts(n=8),
        batch_size=4,
        progress=False,
        **{**kwargs, "num_inference_steps": 2},
    )
    cfg = QuantizeConfig(rank=16, method=method, max_samples=512, progress=False)
    return quantize_model(q, calib, cfg)


#: Upper bounds of the denoiser's relative error (measured: flux 0.027, pixart 0.013,
#: sdxl 0.034, sana 0.068; naive 0.12, 0.085, 0.17, 0.24).
MAX_ERROR = {"flux": 0.06, "pixart": 0.04, "sdxl": 0.08, "sana": 0.12}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_end_to_end(arch, tmp_path):
    pipe = tiny_pipeline(arch)
    pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs(arch)
    component, model = denoiser(pipe)
    plant_outliers(model)
    calls, ref_latents = record_denoiser(pipe, kwargs)

    quant = _quantize(pipe, model, "svdquant", kwargs)
    naive = _quantize(pipe, model, "naive", kwargs)
    assert any(isinstance(m, SVDQLinear) for m in quant.modules())
    assert not any(isinstance(m, SVDQLinear) for m in model.modules())  # original untouched

    save_pretrained_quantized(quant, tmp_path / "q", component=component)
    assert {p.name for p in (tmp_path / "q").iterdir()} >= {
        "svdquant.safetensors",
        "config.json",
        "svdquant.json",
    }
    loaded = load_quantized_model(tmp_path / "q")
    assert type(loaded) is type(model)

    err_svd = denoiser_error(loaded, calls)
    err_naive = denoiser_error(naive, calls)
    print(f"{arch}: denoiser relative error svdquant {err_svd:.4f} naive {err_naive:.4f}")
    assert err_svd == pytest.approx(denoiser_error(quant, calls), abs=1e-6)  # load is exact
    assert err_svd < MAX_ERROR[arch]
    assert err_svd < 0.5 * err_naive

    # The loaded model in a full pipeline call: same seed, batch of 2, through the VAE.
    qpipe = type(pipe)(**{**pipe.components, component: loaded})
    qpipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(1)
    latents = qpipe(prompt=PROMPTS, generator=gen, output_type="latent", **kwargs).images
    npipe = type(pipe)(**{**pipe.components, component: naive})
    npipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(1)
    naive_latents = npipe(prompt=PROMPTS, generator=gen, output_type="latent", **kwargs).images
    assert latents.shape == ref_latents.shape
    lat_svd, lat_naive = rel(latents, ref_latents), rel(naive_latents, ref_latents)
    print(f"{arch}: final latents relative error svdquant {lat_svd:.4f} naive {lat_naive:.4f}")
    assert lat_svd < min(0.5, lat_naive)
    images = qpipe(prompt=PROMPTS, generator=gen, output_type="pt", **kwargs).images
    assert images.shape[0] == 2 and torch.isfinite(images).all()


def _quantized_flux(tmp_path):
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs("flux")
    _, model = denoiser(pipe)
    calib = pipeline_calibration(
        pipe, PROMPTS, progress=False, **{**kwargs, "num_inference_steps": 1}
    )
    quantize_model(model, calib, QuantizeConfig(rank=8, alpha=0.5, progress=False))
    save_pretrained_quantized(model, tmp_path / "q")
    return pipe, model, kwargs


def test_adapter_decisions_flux(tmp_path):
    _, model, _ = _quantized_flux(tmp_path)
    blk = model.transformer_blocks[0]
    single = model.single_transformer_blocks[0]
    # 16-bit: embedders and the final projection
    for m in (model.x_embedder, model.context_embedder, model.proj_out):
        assert type(m) is nn.Linear
    assert type(model.time_text_embed.timestep_embedder.linear_1) is nn.Linear
    # W4A16: modulation linears
    for m in (blk.norm1.linear, blk.norm1_context.linear, single.norm.linear):
        assert isinstance(m, SVDQLinear) and m.act_fmt == "none"
    # W4A4 with one shared activation quantization for q/k/v (and proj_mlp in single blocks)
    for group in (
        [blk.attn.to_q, blk.attn.to_k, blk.attn.to_v],
        [blk.attn.add_q_proj, blk.attn.add_k_proj, blk.attn.add_v_proj],
        [single.attn.to_q, single.attn.to_k, single.attn.to_v, single.proj_mlp],
    ):
        assert all(isinstance(m, SVDQLinear) and m.act_fmt == "int4" for m in group)
        for m in group[1:]:
            assert torch.equal(m.smooth, group[0].smooth)
            assert torch.equal(m.lowrank_down, group[0].lowrank_down)
    assert isinstance(blk.ff.net[2], SVDQLinear) and isinstance(single.proj_out, SVDQLinear)


@torch.no_grad()
def test_fused_projections_flux(tmp_path):
    """fuse_projections runs each attention's q/k/v (and the text stream's) as one layer:
    the same outputs, unfuse restores the layers bit for bit, saving refuses a fused model
    (a LoRA load unfuses and fuses again around itself); the quantized FLUX transformer,
    fused or not, compiles with fullgraph=True and matches eager."""
    import svdquant

    pipe, model, kwargs = _quantized_flux(tmp_path)
    calls, _ = record_denoiser(pipe, kwargs)
    args, kw, _ = calls[0]
    before = _sample(model(*args, **kw))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n_attn = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert svdquant.fuse_projections(model) == n_attn
    assert svdquant.fuse_projections(model) == 0  # already fused: nothing more to do
    blk, single = model.transformer_blocks[0], model.single_transformer_blocks[0]
    assert blk.attn.fused_projections and not hasattr(blk.attn, "to_q")
    assert blk.attn.to_qkv.out_features == 3 * blk.attn.inner_dim
    assert isinstance(blk.attn.to_added_qkv.linear, SVDQLinear)
    # single blocks: q/k/v and the MLP's up projection as one layer, parts contiguous
    assert not hasattr(single, "proj_mlp") and not hasattr(single.attn, "to_q")
    width = single.attn.inner_dim
    assert single.qkv_mlp.sizes == [width] * 3 + [single.mlp_hidden_dim]
    parts = single.qkv_mlp(torch.randn(2, 5, width, dtype=torch.bfloat16))
    assert [p.shape[-1] for p in parts] == single.qkv_mlp.sizes
    assert all(p.is_contiguous() for p in parts)
    assert rel(_sample(model(*args, **kw)), before) < 1e-5
    with pytest.raises(ValueError, match="joint_attention_kwargs"):
        model(*args, **{**kw, "joint_attention_kwargs": {"unused": 1}})
    with pytest.raises(ValueError, match="unfuse_projections"):
        checkpoint.save_quantized(model, tmp_path / "fused")
    with pytest.raises(FileNotFoundError, match="no LoRA file"):  # a failed load: still fused
        svdquant.load_lora(model, tmp_path / "none.safetensors")
    assert blk.attn.fused_projections and isinstance(blk.attn.to_qkv.linear, SVDQLinear)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert rel(_sample(compiled(*args, **kw)), before) < 1e-5
    with pytest.raises(ValueError, match="unfuse_projections"):
        model.set_attn_processor(blk.attn.processor)  # diffusers' own call, on every module
    assert svdquant.unfuse_projections(model) == n_attn
    assert not blk.attn.fused_projections and not hasattr(blk.attn, "to_qkv")
    assert type(single).__name__ == "FluxSingleTransformerBlock"
    assert type(single.attn.processor).__name__ == "FluxAttnProcessor"
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    # and the separate layers compile with fullgraph=True too (the custom ops, no breaks)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert rel(_sample(compiled(*args, **kw)), before) < 1e-5
    # an attention with another processor (an IP-adapter's) is left alone
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class OtherProcessor(FluxAttnProcessor):
        pass

    single.attn.processor = OtherProcessor()
    blk.attn.processor = OtherProcessor()
    assert svdquant.fuse_projections(model) == n_attn - 2
    assert hasattr(single, "proj_mlp") and isinstance(single.attn.processor, OtherProcessor)
    # that double block runs diffusers' own forward (its attention is not fused), the
    # others the fused one: the same outputs
    assert isinstance(blk.attn.processor, OtherProcessor) and hasattr(blk.attn, "to_q")
    assert rel(_sample(model(*args, **kw)), before) < 1e-5
    assert svdquant.unfuse_projections(model) == n_attn - 2


@torch.no_grad()
@pytest.mark.parametrize("arch", ["pixart", "sdxl", "sana"])
def test_fused_projections_generic_attention(arch, tmp_path):
    """diffusers' generic ``Attention`` (PixArt-Σ, SDXL, SANA's cross-attention): q/k/v of
    each self-attention and k/v of each cross-attention run as one layer, and PixArt's
    GELU-tanh feed-forwards as fused MLPs — the same outputs; fullgraph compiles; unfuse
    restores the layers bit for bit and diffusers' processors and classes. SANA's linear
    self-attention takes its q/k/v from one layer too; its cross-attention normalizes q
    and k across heads, before splitting them (``SanaAttnProcessor2_0``)."""
    import svdquant

    pipe = tiny_pipeline(arch)
    pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs(arch)
    _, model = denoiser(pipe)
    calib = pipeline_calibration(
        pipe, PROMPTS, progress=False, **{**kwargs, "num_inference_steps": 1}
    )
    quantize_model(model, calib, QuantizeConfig(rank=8, alpha=0.5, progress=False))
    attns = [m for m in model.modules() if type(m).__name__ == "Attention"]
    if arch == "sana":  # SANA 1.5's q/k norms across heads (qk_norm="rms_norm_across_heads")
        gen = torch.Generator().manual_seed(0)
        for a in attns:
            a.norm_q, a.norm_k = (nn.RMSNorm(a.inner_dim, eps=1e-6) for _ in range(2))
            for norm in (a.norm_q, a.norm_k):
                norm.weight.copy_(torch.rand(a.inner_dim, generator=gen) + 0.5)
    calls, _ = record_denoiser(pipe, kwargs)
    args, kw, _ = calls[0]
    before = _sample(model(*args, **kw))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    generic = ("AttnProcessor2_0", "SanaAttnProcessor2_0", "SanaLinearAttnProcessor2_0")
    plain = [a for a in attns if type(a.processor).__name__ in generic]
    selfs = [a for a in plain if not a.is_cross_attention]
    assert plain and selfs and len(plain) == len(attns)
    assert svdquant.fuse_projections(model) == len(plain)
    assert svdquant.fuse_projections(model) == 0
    for a in plain:
        fused = a.to_kv if a.is_cross_attention else a.to_qkv
        assert a.fused_projections and isinstance(fused.linear, SVDQLinear)
        assert not hasattr(a, "to_k") and hasattr(a, "to_q") == a.is_cross_attention
    for a in set(attns) - set(plain):
        assert hasattr(a, "to_q") and not a.fused_projections
    ffs = [type(m).__name__ for m in model.modules() if type(m).__name__.endswith("FeedForward")]
    assert ("FusedGeluFeedForward" in ffs) == (arch == "pixart")
    fused = _sample(model(*args, **kw))
    assert rel(fused, before) < 1e-5
    with pytest.MonkeyPatch.context() as mp:  # q/k/v copied out, not views: the same
        mp.setattr(svdquant.fuse, "GENERIC_CONTIGUOUS", True)
        assert torch.equal(_sample(model(*args, **kw)), fused)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert rel(_sample(compiled(*args, **kw)), before) < 1e-5
    from diffusers.models.attention_processor import AttnProcessor2_0

    with pytest.raises(ValueError, match="unfuse_projections"):  # not a traceback later
        plain[0].set_processor(AttnProcessor2_0())
    assert plain[0].fused_projections
    assert svdquant.unfuse_projections(model) == len(plain)
    plain[0].set_processor(plain[0].processor)  # unfused: diffusers' own again
    assert all(type(a.processor).__name__ in generic for a in plain)
    assert not any(t.startswith("Fused") for t in map(lambda m: type(m).__name__, model.modules()))
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in state)
    torch._dynamo.reset()


def test_fuse_projections_leaves_other_models_alone():
    """Nothing to fuse (16-bit layers, no supported attention): 0, and nothing changes."""
    import svdquant

    pipe = tiny_pipeline("flux")
    _, model = denoiser(pipe)  # not quantized: its q/k/v are nn.Linear
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert svdquant.fuse_projections(model) == 0
    assert svdquant.unfuse_projections(model) == 0
    assert not model.transformer_blocks[0].attn.fused_projections
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_sana_pointwise_convs_become_linear():
    pipe = tiny_pipeline("sana")
    _, model = denoiser(pipe)
    ff = model.transformer_blocks[0].ff
    x = torch.randn(2, ff.conv_inverted.in_channels, 4, 4)
    ref = ff.conv_inverted(x)
    get_adapter(model).prepare(model)
    assert isinstance(ff.conv_inverted, PointwiseConv) and isinstance(ff.conv_point, PointwiseConv)
    assert isinstance(ff.conv_depth, nn.Conv2d)  # depthwise 3x3 stays a convolution
    torch.testing.assert_close(ff.conv_inverted(x), ref)
    get_adapter(model).prepare(model)  # idempotent
    assert isinstance(ff.conv_inverted.linear, nn.Linear)


def test_every_adapter_plans_its_tiny_model():
    for arch in ARCHITECTURES:
        _, model = denoiser(tiny_pipeline(arch))
        adapter = get_adapter(model)
        assert adapter is ADAPTERS[type(model).__name__]
        adapter.prepare(model)
        groups = adapter.plan(model)
        names = [n for g in groups for n in g.names]
        assert len(names) == len(set(names))
        assert any(len(g.names) >= 3 for g in groups)  # q/k/v share an input
        assert "proj_out" not in names
        skipped = adapter.plan(model, skip=[r"transformer_blocks\.0", r".*attn2.*"])
        assert all(
            not n.startswith("transformer_blocks.0.") and "attn2" not in n
            for g in skipped
            for n in g.names
        )
        assert adapter.describe().startswith(adapter.name)


def test_unsupported_model_is_named():
    with pytest.raises(UnsupportedModelError, match="FluxTransformer2DModel"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), lambda m: None)


def test_shared_input_claim_is_checked():
    """An adapter whose shared-input groups are wrong is caught during calibration."""
    pipe = tiny_pipeline("pixart")
    pipe.set_progress_bar_config(disable=True)
    _, model = denoiser(pipe)
    wrong = dataclasses.replace(
        get_adapter(model), shared_inputs=(r"(.*\.attn2)\.to_[qkv]",)
    )  # attn2.to_q reads the image tokens, to_k/to_v the caption
    calib = pipeline_calibration(
        pipe,
        PROMPTS[:1],
        progress=False,
        **{**tiny_call_kwargs("pixart"), "num_inference_steps": 1},
    )
    with pytest.raises(ValueError, match="share their input"):
        quantize_model(
            model, calib, QuantizeConfig(rank=4, alpha=0.5, progress=False), adapter=wrong
        )


def test_calibration_in_passes_gives_the_same_model():
    """A small statistics budget splits calibration into passes; the result is the same."""
    pipe = tiny_pipeline("pixart")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**tiny_call_kwargs("pixart"), "num_inference_steps": 1}
    _, model = denoiser(pipe)
    runs = []

    def make(budget):
        q = copy.deepcopy(model)
        calib = pipeline_calibration(pipe, PROMPTS, progress=False, **kwargs)

        def counted(m):
            runs.append(budget)
            calib(m)

        cfg = QuantizeConfig(rank=4, progress=False, max_samples=64, stats_budget_bytes=budget)
        return quantize_model(q, counted, cfg)

    one, many = make(1 << 30), make(1)
    assert runs.count(1 << 30) == 1 and runs.count(1) > 1
    for (n, a), (_, b) in zip(one.state_dict().items(), many.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_gptq_and_nvfp4_w4a8(tmp_path):
    """The other formats through ``quantize_pipeline`` (the one-call front end)."""
    pipe = tiny_pipeline("pixart")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**tiny_call_kwargs("pixart"), "num_inference_steps": 1}
    cfg = QuantizeConfig(fmt="nvfp4", act_fmt="fp8", rank=4, gptq=True, progress=False)
    model = quantize_pipeline(pipe, PROMPTS, cfg, **kwargs)
    assert model is pipe.transformer
    layer = model.transformer_blocks[0].attn1.to_q
    assert (layer.fmt, layer.act_fmt) == ("nvfp4", "fp8")
    save_pretrained_quantized(model, tmp_path)
    loaded = load_quantized_model(tmp_path)
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(loaded.transformer_blocks[0].attn1.to_q(x), layer(x))


def test_rank_is_clamped_to_narrow_layers():
    pipe = tiny_pipeline("pixart")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**tiny_call_kwargs("pixart"), "num_inference_steps": 1}
    _, model = denoiser(pipe)
    adapter = dataclasses.replace(get_adapter(model), keep=())  # proj_out: 32 -> 8, 4-bit
    calib = pipeline_calibration(pipe, PROMPTS[:1], progress=False, **kwargs)
    cfg = QuantizeConfig(rank=16, alpha=0.5, progress=False)
    quantize_model(model, calib, cfg, adapter=adapter)
    assert isinstance(model.proj_out, SVDQLinear) and model.proj_out.rank == 8
    assert model.transformer_blocks[0].ff.net[2].rank == 16


def test_load_never_materializes_quantized_weights(tmp_path, monkeypatch):
    """The model is built on the meta device: when the quantized layers are swapped for
    their 4-bit shells, their nn.Linear weights hold no data, and nothing stays on meta."""
    _, model, _ = _quantized_flux(tmp_path)
    names = [n for n, m in model.named_modules() if isinstance(m, SVDQLinear)]
    seen = {}
    real_swap = checkpoint._swap_in_shells

    def spy(m, layers, file):
        for name in layers:
            seen[name] = m.get_submodule(name).weight.device.type
        return real_swap(m, layers, file)

    monkeypatch.setattr(checkpoint, "_swap_in_shells", spy)
    loaded = load_quantized_model(tmp_path / "q")
    assert sorted(seen) == sorted(names)
    assert set(seen.values()) == {"meta"}
    assert all(not t.is_meta for t in loaded.state_dict().values())
    qbytes = sum(
        t.numel() * t.element_size()
        for m in loaded.modules()
        if isinstance(m, SVDQLinear)
        for t in m.state_dict().values()
    )
    fbytes = sum(
        model.get_submodule(n).in_features * model.get_submodule(n).out_features * 2 for n in names
    )
    assert qbytes < fbytes  # the quantized layers hold less than their 16-bit weights


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_of_loading_stays_near_the_4bit_size(tmp_path):
    """Measured in a fresh process: peak RSS while loading a checkpoint whose fp32 model
    is ~50 MB stays far below that (no full-precision copy is ever allocated)."""
    import json
    import subprocess
    import sys
    import textwrap

    import diffusers

    torch.manual_seed(0)
    cfg = dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=64,
        num_attention_heads=8,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        axes_dims_rope=(16, 24, 24),
    )
    model = diffusers.FluxTransformer2DModel(**cfg)
    full = sum(p.numel() * 4 for p in model.parameters())
    width = 512

    def calib(m):
        m(
            hidden_states=torch.randn(1, 16, 16),
            encoder_hidden_states=torch.randn(1, 8, 64),
            pooled_projections=torch.randn(1, 64),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(8, 3),
        )

    assert model.config.num_attention_heads * model.config.attention_head_dim == width
    quantize_model(model, calib, QuantizeConfig(rank=8, alpha=0.5, max_samples=16, progress=False))
    save_pretrained_quantized(model, tmp_path)
    del model
    ckpt = (tmp_path / "svdquant.safetensors").stat().st_size
    code = textwrap.dedent(
        """
        import json, sys, torch, diffusers, accelerate
        from svdquant.pipeline import load_quantized_model

        def rss(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024

        def grown(fn):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
            before = rss("VmRSS")
            out = fn()
            return rss("VmHWM") - before, out

        cfg = json.loads(sys.argv[2])
        with accelerate.init_empty_weights():  # warm up: diffusers' lazy imports
            diffusers.FluxTransformer2DModel(**cfg)
        loaded, m = grown(lambda: load_quantized_model(sys.argv[1]))
        built, _ = grown(lambda: diffusers.FluxTransformer2DModel(**cfg))  # the control
        print(loaded, built)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path), json.dumps(cfg)],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded, built = map(int, out.stdout.split()[-2:])
    print(
        f"fp32 model {full / 2**20:.1f} MiB, checkpoint {ckpt / 2**20:.1f} MiB; peak RSS "
        f"growth: loading {loaded / 2**20:.1f} MiB, building the fp32 model {built / 2**20:.1f}"
    )
    assert built > 0.8 * full  # the measurement sees a full-precision model
    assert ckpt < full / 3
    assert loaded < ckpt + full / 8
