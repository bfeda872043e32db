"""LoRAs on quantized models (svdquant.lora), on the CPU: the exact delta on one layer in
both file formats, a whole tiny FLUX.1 against the 16-bit model with the LoRA merged,
load/unload/strength bookkeeping, and every error a bad file gets."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from svdquant import SVDQLinear, quantize_linear
from svdquant.kernels import gemm_ws
from svdquant.lora import (
    LoraError,
    LoraFileError,
    LoraMismatchError,
    LoraRankError,
    list_loras,
    load_lora,
    lora_rows,
    set_lora_strength,
    unload_lora,
)
from svdquant.models.tiny import tiny_call_kwargs, tiny_pipeline
from svdquant.pipeline import (
    denoiser,
    load_quantized_model,
    pipeline_calibration,
    save_pretrained_quantized,
)
from svdquant.quantize_model import QuantizeConfig, quantize_model
from svdquant.testing import planted_outlier_inputs, planted_outlier_layer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny ops: threads only contend (a 2-core CI box runs ~50x slower oversubscribed).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def lora_factors(n: int, k: int, r: int, w_std: float, seed: int, size: float = 0.3):
    """Random A [r, k], B [n, r] whose product is ``size`` times the weight's scale."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, k, generator=g) / k**0.5
    b = torch.randn(n, r, generator=g) * size * w_std * (k / r) ** 0.5
    return a, b


def write_lora(path, factors: dict[str, tuple], fmt: str, alpha: float | None = None) -> None:
    """Write ``{module name as the format spells it: (A, B)}`` in ``fmt`` (peft/kohya)."""
    tensors = {}
    for key, (a, b) in factors.items():
        if fmt == "peft":
            tensors[f"transformer.{key}.lora_A.weight"] = a.contiguous()
            tensors[f"transformer.{key}.lora_B.weight"] = b.contiguous()
            if alpha is not None:
                tensors[f"transformer.{key}.alpha"] = torch.tensor(alpha)
        else:
            tensors[f"lora_unet_{key}.lora_down.weight"] = a.contiguous()
            tensors[f"lora_unet_{key}.lora_up.weight"] = b.contiguous()
            if alpha is not None:
                tensors[f"lora_unet_{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))


# --- one layer --------------------------------------------------------------------------


class Two(nn.Module):
    """A quantized layer and a 16-bit one, as in a real model."""

    def __init__(self, q: SVDQLinear, lin: nn.Linear) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q = q
        self.proj_out = lin


@pytest.fixture(scope="module")
def two() -> Two:
    lin = planted_outlier_layer(k=256, n=192)
    g = torch.Generator().manual_seed(1)
    q = quantize_linear(lin, planted_outlier_inputs(512, k=256, generator=g), rank=16)
    out = nn.Linear(256, 96).eval()
    return Two(q, out).eval()


def _x(k: int = 256) -> torch.Tensor:
    return planted_outlier_inputs(64, k=k, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_delta_is_exact(two, tmp_path, fmt, dtype):
    """With LoRA minus without = strength · alpha/r · (x Aᵀ) Bᵀ from the file's tensors."""
    model = copy.deepcopy(two)
    assert model.attn.to_q.smooth.std() > 0.1  # smoothing is real: the LoRA must see it
    model.attn.to_q.to(dtype)  # the 16-bit branch's dtype; the 4-bit buffers keep theirs
    a, b = lora_factors(192, 256, 8, 0.05, seed=0)
    a2, b2 = lora_factors(96, 256, 4, 0.05, seed=1)
    key = "attn.to_q" if fmt == "peft" else "attn_to_q"
    factors = {key: (a.to(dtype), b.to(dtype)), "proj_out": (a2.to(dtype), b2.to(dtype))}
    write_lora(tmp_path / "l.safetensors", factors, fmt, alpha=4.0)
    x = _x()
    with torch.no_grad():
        y0, z0 = model.attn.to_q(x), model.proj_out(x)
        assert load_lora(model, tmp_path / "l.safetensors", strength=0.7) == "l"
        y1, z1 = model.attn.to_q(x), model.proj_out(x)
    # expected, in 16-bit from the file's tensors (then fp32 to compare)
    xd = x.to(dtype)
    ref = 0.7 * (4.0 / 8) * ((xd @ a.to(dtype).t()) @ b.to(dtype).t()).float()
    ref2 = 0.7 * (4.0 / 4) * ((xd @ a2.to(dtype).t()) @ b2.to(dtype).t()).float()
    tol = 4 * torch.finfo(dtype).eps  # rounding of A·s and of the scaled B to 16 bit
    err, err2 = rel(y1 - y0, ref), rel(z1 - z0, ref2)
    print(f"{fmt} {dtype}: delta error {err:.2e} (SVDQLinear), {err2:.2e} (nn.Linear)")
    assert err < tol and err2 < tol  # nn.Linear: the fp32 add-on vs the 16-bit reference
    # rank 16 + 8 padded with zeros to 32 (``lora.RANK_MULTIPLE``: the GEMM's ranks)
    q = model.attn.to_q
    assert q.lowrank_down.shape == (32, 256) and q.lowrank_up.shape == (192, 32)
    assert lora_rows(q) == 8 and not q.lowrank_down[24:].any() and not q.lowrank_up[:, 24:].any()
    sixteen = (torch.bfloat16, torch.bfloat16)  # on the GPU: the warp-specialized GEMM
    assert gemm_ws.supports(192, 256, 32, *sixteen) and not gemm_ws.supports(192, 256, 24, *sixteen)


def test_unload_strength_and_sum(two, tmp_path):
    model = copy.deepcopy(two)
    q = model.attn.to_q
    base_down, base_up = q.lowrank_down.clone(), q.lowrank_up.clone()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    a, b = lora_factors(192, 256, 8, 0.05, seed=0)
    c, d = lora_factors(192, 256, 12, 0.05, seed=2)
    e, f = lora_factors(96, 256, 4, 0.05, seed=3)
    g, h = lora_factors(96, 256, 6, 0.05, seed=4)
    write_lora(tmp_path / "one.safetensors", {"attn.to_q": (a, b), "proj_out": (e, f)}, "peft")
    write_lora(
        tmp_path / "two.safetensors",
        {"attn_to_q": (c, d), "proj_out": (g, h)},
        "kohya",
        alpha=6.0,
    )
    x = _x()

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return q(x), model.proj_out(x)

    y0 = run()
    load_lora(model, tmp_path / "one.safetensors", strength=0.5)
    y_one = run()
    unload_lora(model, "one")
    assert all(torch.equal(u, v) for u, v in zip(run(), y0, strict=True))  # bit for bit
    assert torch.equal(q.lowrank_down, base_down) and torch.equal(q.lowrank_up, base_up)
    load_lora(model, tmp_path / "two.safetensors", strength=1.0)
    y_two = run()

    # both at once: the sum of the separate deltas
    load_lora(model, tmp_path / "one.safetensors", strength=0.5)
    assert [i.name for i in list_loras(model)] == ["two", "one"]
    assert q.lowrank_down.shape[0] == 48 and lora_rows(q) == 12 + 8  # 16 + 20, padded
    y_both = run()
    for i in range(2):
        want = y0[i] + (y_one[i] - y0[i]) + (y_two[i] - y0[i])
        assert rel(y_both[i] - y0[i], want - y0[i]) < 1e-5

    # saving while LoRAs are loaded saves the base model only
    sd = model.state_dict()
    assert sd.keys() == base_sd.keys()
    assert all(torch.equal(sd[k], base_sd[k]) for k in sd)
    with pytest.raises(LoraError, match="unload"):
        model.load_state_dict(base_sd)

    # strength: rebuilt from the kept factors, so the same as loading at that strength
    set_lora_strength(model, "one", 1.0)
    unload_lora(model, "two")
    y_one_full = run()
    set_lora_strength(model, "one", 0.5)
    assert all(torch.equal(u, v) for u, v in zip(run(), y_one, strict=True))
    set_lora_strength(model, "one", 0.0)
    assert all(torch.allclose(u, v, rtol=0, atol=1e-5) for u, v in zip(run(), y0, strict=True))
    assert rel(y_one_full[0] - y0[0], 2 * (y_one[0] - y0[0])) < 1e-2
    unload_lora(model, "one")
    assert list_loras(model) == []
    assert all(torch.equal(u, v) for u, v in zip(run(), y0, strict=True))
    assert not model.proj_out._forward_hooks and not q._state_dict_hooks
    assert torch.equal(q.lowrank_down, base_down) and torch.equal(q.lowrank_up, base_up)
    with pytest.raises(KeyError, match="one"):
        unload_lora(model, "one")


def test_loras_reach_a_cuda_graphed_model(two, tmp_path):
    """``load_lora`` / ``set_lora_strength`` / ``unload_lora`` given a ``cuda_graphed``
    model act on the module inside (its layer names) and drop the wrapper's graphs, which
    read the low-rank factors a LoRA replaces; ``list_loras`` keeps them."""
    import svdquant

    model = copy.deepcopy(two)
    graphed = svdquant.cuda_graphed(model)
    a, b = lora_factors(192, 256, 8, 0.05, seed=0)
    write_lora(tmp_path / "one.safetensors", {"attn.to_q": (a, b)}, "peft")
    resets = []
    graphed.reset = lambda: resets.append(1)
    load_lora(graphed, tmp_path / "one.safetensors", strength=0.5)
    assert [i.name for i in list_loras(graphed)] == ["one"] and len(resets) == 1
    assert [i.name for i in list_loras(model)] == ["one"]
    set_lora_strength(graphed, "one", 1.0)
    unload_lora(graphed, "one")
    assert len(resets) == 3 and list_loras(model) == []


# --- errors -------------------------------------------------------------------------------


def test_errors(two, tmp_path):
    model = copy.deepcopy(two)
    a, b = lora_factors(192, 256, 8, 0.05, seed=0)

    def check(err, match, tensors=None, path=None, **kw):
        path = path or tmp_path / f"bad{len(list(tmp_path.iterdir()))}.safetensors"
        if tensors is not None:
            save_file({k: v.clone() for k, v in tensors.items()}, str(path))
        with pytest.raises(err, match=match) as info:
            load_lora(model, path, **kw)
        assert path.name in str(info.value)  # every error names the file
        assert isinstance(info.value, ValueError)
        assert list_loras(model) == [] and model.attn.to_q.lowrank_down.shape[0] == 16
        return str(info.value)

    # a LoRA for another architecture: no key matches
    sdxl = {
        f"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_{p}.lora_{f}.weight": t
        for p in "qkv"
        for f, t in (("A", a), ("B", b))
    }
    check(LoraMismatchError, "another architecture", sdxl)
    # right name, wrong shapes: names the layer and both shapes
    msg = check(
        LoraMismatchError,
        "attn.to_q",
        {
            "lora_unet_attn_to_q.lora_down.weight": a[:, :128],
            "lora_unet_attn_to_q.lora_up.weight": b,
        },
    )
    assert "(8, 128)" in msg and "[r, 256]" in msg
    # keys that match no layer: listed, first 10 and a count
    extra = {
        f"transformer.blocks.{i}.ff.lora_{f}.weight": t
        for i in range(12)
        for f, t in (("A", a), ("B", b))
    }
    msg = check(
        LoraMismatchError,
        "12 of its 13",
        {
            **extra,
            **{"transformer.attn.to_q.lora_A.weight": a, "transformer.attn.to_q.lora_B.weight": b},
        },
    )
    assert "'transformer.blocks.0.ff'" in msg and "and 2 more" in msg
    # rank limit (base 16 + 8 > 20), configurable
    ok = {"transformer.attn.to_q.lora_A.weight": a, "transformer.attn.to_q.lora_B.weight": b}
    check(LoraRankError, "rank 24.*limit 20", ok, max_rank=20)
    # corrupt and truncated files
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    check(LoraFileError, "not a readable safetensors", path=junk)
    good = tmp_path / "good.safetensors"
    save_file({k: v.clone() for k, v in ok.items()}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    check(LoraFileError, "not a readable safetensors", path=cut)
    # unsupported kinds and incomplete pairs
    check(LoraFileError, "DoRA", {**ok, "transformer.attn.to_q.lora_magnitude_vector": a[0]})
    check(LoraFileError, "both down and up", {"transformer.attn.to_q.lora_A.weight": a})
    check(LoraFileError, "not LoRA factors", {**ok, "transformer.attn.to_q.diff": a})
    with pytest.raises(FileNotFoundError):
        load_lora(model, tmp_path / "missing.safetensors")
    # a name already loaded
    load_lora(model, good)
    with pytest.raises(LoraError, match="already loaded"):
        load_lora(model, good)
    unload_lora(model, "good")


# --- a whole tiny FLUX.1 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux():
    """A tiny FLUX.1 pipeline (outliers planted), its 16-bit transformer, a quantized copy
    and the denoiser inputs of a 16-bit pipeline run."""
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs("flux")
    _, model = denoiser(pipe)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights have no outlier channels; real models do
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.in_features >= 32:
                idx = torch.randperm(m.in_features, generator=g)[: m.in_features // 32]
                m.weight[:, idx] *= 8
    calls = []

    def hook(_m, args, kw):
        calls.append((args, {k: v for k, v in kw.items() if k != "return_dict"}))

    h = model.register_forward_pre_hook(hook, with_kwargs=True)
    pipe(
        prompt=["a red fox in the snow", "a lighthouse"],
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
        **kwargs,
    )
    h.remove()
    calib = pipeline_calibration(
        pipe,
        ["a cat on a mat", "a boat at sea", "a city at night", "a bowl of fruit"],
        progress=False,
        batch_size=2,
        **{**kwargs, "num_inference_steps": 2},
    )
    quant = quantize_model(copy.deepcopy(model), calib, QuantizeConfig(rank=16, progress=False))
    return pipe, model, quant, calls


@torch.no_grad()
def outputs(model: nn.Module, calls) -> list[torch.Tensor]:
    return [model(*args, **kw, return_dict=False)[0] for args, kw in calls]


def error(outs, refs) -> float:
    num = sum((o - r).float().pow(2).sum() for o, r in zip(outs, refs, strict=True))
    den = sum(r.float().pow(2).sum() for r in refs)
    return (num / den).sqrt().item()


def _peft_lora(model: nn.Module) -> tuple[dict, dict]:
    """A random rank-4 LoRA on every linear layer, by diffusers name: (file factors, merge)."""
    factors = {}
    for i, (name, m) in enumerate(model.named_modules()):
        if isinstance(m, nn.Linear):
            factors[name] = lora_factors(m.out_features, m.in_features, 4, m.weight.std(), i)
    return factors, factors


def _kohya_lora(model: nn.Module) -> tuple[dict, dict]:
    """A random rank-4 LoRA in kohya's FLUX names: original-FLUX (BFL) names for the
    blocks and the final layer, diffusers names with "_" for the rest; the merge targets
    are spelled out here independently of svdquant.lora's table."""
    file, merge = {}, {}

    def fused(key: str, targets: list[str], seed: int, swap: bool = False) -> None:
        mods = [model.get_submodule(t) for t in targets]
        n = sum(m.out_features for m in mods)
        a, b = lora_factors(n, mods[0].in_features, 4, mods[0].weight.std(), seed)
        file[key] = (a, b)
        if swap:  # BFL's final modulation is (shift, scale); diffusers' is (scale, shift)
            b = torch.cat([b[n // 2 :], b[: n // 2]])
        start = 0
        for t, m in zip(targets, mods, strict=True):
            merge[t] = (a, b[start : start + m.out_features])
            start += m.out_features

    d, s = "transformer_blocks.0.", "single_transformer_blocks.0."
    fused("double_blocks_0_img_attn_qkv", [d + f"attn.to_{p}" for p in "qkv"], 1)
    fused("double_blocks_0_txt_attn_qkv", [d + f"attn.add_{p}_proj" for p in "qkv"], 2)
    fused("double_blocks_0_img_attn_proj", [d + "attn.to_out.0"], 3)
    fused("double_blocks_0_txt_attn_proj", [d + "attn.to_add_out"], 4)
    fused("double_blocks_0_img_mlp_0", [d + "ff.net.0.proj"], 5)
    fused("double_blocks_0_txt_mlp_2", [d + "ff_context.net.2"], 6)
    fused("double_blocks_0_img_mod_lin", [d + "norm1.linear"], 7)
    fused(
        "single_blocks_0_linear1",
        [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"],
        8,
    )
    fused("single_blocks_0_linear2", [s + "proj_out"], 9)
    fused("single_blocks_0_modulation_lin", [s + "norm.linear"], 10)
    fused("final_layer_adaLN_modulation_1", ["norm_out.linear"], 11, swap=True)
    fused("final_layer_linear", ["proj_out"], 12)
    fused("img_in", ["x_embedder"], 13)
    for i, t in enumerate([d + "ff.net.2", d + "ff_context.net.0.proj", "context_embedder"]):
        fused(t.replace(".", "_"), [t], 20 + i)  # kohya's diffusers-style names
    return file, merge


def merged(model: nn.Module, factors: dict, strength: float, scale: float) -> nn.Module:
    m16 = copy.deepcopy(model)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            m16.get_submodule(name).weight += strength * scale * (b @ a)
    return m16


#: err(quantized + LoRA vs 16-bit + merged LoRA) / err(quantized vs 16-bit), both formats;
#: measured 1.06 (peft, every linear) and 1.00 (kohya, BFL names) with LoRAs that move the
#: output by 0.34 and 0.26 (relative); leaving out the smoothing (A instead of A·s) gives
#: 2.5 and 1.8, swapping FLUX's final shift/scale wrongly 2.7.
MAX_RATIO = 1.3


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_flux_tracks_merged_16bit(flux, tmp_path, fmt):
    pipe, model, quant, calls = flux
    file_factors, merge = (_peft_lora if fmt == "peft" else _kohya_lora)(model)
    path = tmp_path / f"{fmt}.safetensors"
    write_lora(path, file_factors, fmt, alpha=2.0)  # scale 2 / 4
    strength = 0.8
    ref0 = outputs(model, calls)
    ref1 = outputs(merged(model, merge, strength, 0.5), calls)
    q0 = outputs(quant, calls)
    qpipe = type(pipe)(**{**pipe.components, "transformer": quant})
    load_lora(qpipe, path, strength=strength, name="style")  # a pipeline works too
    try:
        assert len(list_loras(quant)[0].layers) == len(merge)
        q1 = outputs(quant, calls)
        if fmt == "peft":  # saving with a LoRA loaded saves the base model only
            save_pretrained_quantized(quant, tmp_path / "q")
            loaded = outputs(load_quantized_model(tmp_path / "q"), calls)
            assert all(
                torch.allclose(u, v, rtol=0, atol=1e-6) for u, v in zip(loaded, q0, strict=True)
            )
    finally:
        unload_lora(qpipe, "style")
    effect, base_err, lora_err = error(ref1, ref0), error(q0, ref0), error(q1, ref1)
    print(
        f"{fmt}: LoRA effect {effect:.3f}, quantized err {base_err:.4f} w/o LoRA, "
        f"{lora_err:.4f} with (ratio {lora_err / base_err:.2f})"
    )
    assert effect > 3 * base_err  # the LoRA matters at this strength
    assert lora_err < MAX_RATIO * base_err
    assert all(torch.equal(u, v) for u, v in zip(outputs(quant, calls), q0, strict=True))


def test_text_encoder_keys_are_skipped(two, tmp_path):
    model = copy.deepcopy(two)
    a, b = lora_factors(192, 256, 8, 0.05, seed=0)
    te = torch.zeros(4, 32)
    save_file(
        {
            "lora_unet_attn_to_q.lora_down.weight": a,
            "lora_unet_attn_to_q.lora_up.weight": b,
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": te,
        },
        str(tmp_path / "te.safetensors"),
    )
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        load_lora(model, tmp_path / "te.safetensors")
    assert any("text-encoder" in str(x.message) for x in w)
    assert list_loras(model)[0].format == "kohya"


def test_fused_runtime_carries_loras(flux, tmp_path):
    """``fuse_projections`` on a FLUX model with a LoRA on every linear: q/k/v (and the
    single blocks' MLP input) fused with each layer's LoRA stacked after the shared base
    branch — the same outputs; a LoRA change on a fused model unfuses it for the change
    and fuses it again; unfusing gives back the same layer objects, bit for bit, LoRAs
    included."""
    from svdquant import fuse_projections, unfuse_projections

    _pipe, model, quant, calls = flux
    q = copy.deepcopy(quant)
    factors, _ = _peft_lora(model)
    path = tmp_path / "every.safetensors"
    write_lora(path, factors, "peft", alpha=2.0)
    base = outputs(q, calls)
    load_lora(q, path, strength=0.8, name="style")
    with_lora = outputs(q, calls)
    assert error(with_lora, base) > 0.05  # the LoRA matters
    state = {k: v.clone() for k, v in q.state_dict().items()}
    attn = q.transformer_blocks[0].attn
    to_q = attn.to_q
    x = torch.randn(2, 3, to_q.in_features, generator=torch.Generator().manual_seed(5))
    parts = [m(x) for m in (attn.to_q, attn.to_k, attn.to_v)]
    on_engine = []
    backend, interpreter = to_q.backend, not torch.cuda.is_available()
    for m in (attn.to_q, attn.to_k, attn.to_v) if interpreter else ():  # CPU tensors here
        m.backend = "triton"  # the kernels, in triton's interpreter
        on_engine.append(m(x))
        m.backend = backend
    n_attn = len(q.transformer_blocks) + len(q.single_transformer_blocks)
    assert fuse_projections(q) == n_attn
    fused = attn.to_qkv.linear
    assert fused.lowrank_down.shape[0] == fused.rank + 3 * 4  # base + the three LoRAs
    assert error(outputs(q, calls), with_lora) < 1e-5
    assert error(attn.to_qkv(x), parts) < 1e-6
    if interpreter:  # the stacked rank on the kernels: the separate layers' numbers
        assert error(on_engine, parts) > 1e-3  # (fp8 containers: not the reference's)
        fused.backend = "triton"
        assert error(attn.to_qkv(x), on_engine) < 1e-6
        fused.backend = backend
    # LoRAs change on separate layers: a fused model is unfused for it and fused again
    set_lora_strength(q, "style", 0.0)
    assert attn.fused_projections and attn.to_qkv.linear is not fused
    assert error(outputs(q, calls), base) < 1e-5
    set_lora_strength(q, "style", 0.8)
    assert error(outputs(q, calls), with_lora) < 1e-5
    with pytest.raises(KeyError, match="nope"):  # a failed change leaves it fused too
        set_lora_strength(q, "nope", 1.0)
    assert attn.fused_projections
    assert unfuse_projections(q) == n_attn
    assert q.transformer_blocks[0].attn.to_q is to_q and list_loras(q)[0].name == "style"
    assert all(torch.equal(u, v) for u, v in zip(outputs(q, calls), with_lora, strict=True))
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())
    set_lora_strength(q, "style", 0.0)
    assert error(outputs(q, calls), base) < 1e-5
    unload_lora(q, "style")
    assert all(torch.equal(u, v) for u, v in zip(outputs(q, calls), base, strict=True))


def test_fused_runtime_stacks_loras_past_max_rank_by_parts(flux, tmp_path, monkeypatch):
    """Groups whose LoRAs stack past ``lora.MAX_RANK`` fuse by their parts
    (``kernels.gemm.MAX_STACKED_RANK``): the same outputs, without a warning, the fused
    layers holding only the compact L_up; a LoRA change and unfusing as ever."""
    import warnings

    from svdquant import fuse_projections, lora, unfuse_projections
    from svdquant.kernels import gemm

    _pipe, model, quant, calls = flux
    q = copy.deepcopy(quant)
    factors, _ = _peft_lora(model)
    write_lora(tmp_path / "every.safetensors", factors, "peft", alpha=2.0)
    load_lora(q, tmp_path / "every.safetensors", strength=0.8, name="style")
    with_lora, state = outputs(q, calls), {k: v.clone() for k, v in q.state_dict().items()}
    r = q.transformer_blocks[0].attn.to_q.rank
    monkeypatch.setattr(lora, "MAX_RANK", r + 4)  # a part's rank; q/k/v stack to r + 12
    monkeypatch.setattr(gemm, "MAX_STACKED_RANK", 1024)
    monkeypatch.setattr(gemm, "SPLIT_ALIGN", 16)  # (the tiny model's parts "split")
    n_attn = len(q.transformer_blocks) + len(q.single_transformer_blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fuse_projections(q) == n_attn
    double, single = q.transformer_blocks[0].attn.to_qkv, q.single_transformer_blocks[0].qkv_mlp
    for fused, stacked in ((double.linear, r + 12), (single.linear, r + 16)):
        assert fused.lowrank_down.shape[0] == stacked
        assert fused.lowrank_up.shape[1] == -(-(r + 4) // 16) * 16  # compact only
    assert error(outputs(q, calls), with_lora) < 1e-5
    set_lora_strength(q, "style", 0.0)  # unfused for the change, fused again
    assert q.transformer_blocks[0].attn.fused_projections
    set_lora_strength(q, "style", 0.8)
    assert error(outputs(q, calls), with_lora) < 1e-5
    assert unfuse_projections(q) == n_attn
    assert all(torch.equal(v, state[k]) for k, v in q.state_dict().items())
    monkeypatch.setattr(gemm, "MAX_STACKED_RANK", r + 4)  # as today: apart, with a warning
    with pytest.warns(UserWarning, match="left unfused"):
        assert fuse_projections(q) == 0


@pytest.mark.gpu
@torch.no_grad()
@pytest.mark.parametrize("parts", [False, True])
def test_gpu_fused_runtime_carries_loras_on_the_kernels(flux, tmp_path, monkeypatch, parts):
    """On the GPU's kernels: a model with a LoRA on every linear, fused (q/k/v and the
    single blocks' MLP input at the stacked rank, or each part reading its own columns:
    ``gemm.LORA_PARTS``), gives the unfused engine's outputs within bf16 rounding, with
    the LoRA still mattering; a strength change on the fused model reaches the kernels."""
    from svdquant import fuse_projections, unfuse_projections
    from svdquant.kernels import gemm, gemm_ws

    monkeypatch.setattr(gemm, "LORA_PARTS", parts)
    monkeypatch.setattr(gemm_ws, "TAKES_PARTS", parts)

    _pipe, model, quant, calls = flux
    q = copy.deepcopy(quant)
    factors, _ = _peft_lora(model)
    write_lora(tmp_path / "every.safetensors", factors, "peft", alpha=2.0)
    q.to("cuda")
    for m in q.modules():
        if isinstance(m, SVDQLinear):
            m.backend = "triton"
    cuda_calls = [
        (
            [a.cuda() if torch.is_tensor(a) else a for a in args],
            {k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()},
        )
        for args, kw in calls
    ]
    base = outputs(q, cuda_calls)
    before = torch.cuda.memory_allocated()
    load_lora(q, tmp_path / "every.safetensors", strength=0.8, name="style")
    # the GPU holds each LoRA once, stacked into the layers' branches; the factors the
    # strength and unloading rebuild from stay on the host
    from svdquant.lora import _adapters

    layers = [m for m in q.modules() if isinstance(m, SVDQLinear) and _adapters(m)]
    adapters = [a for m in layers for a in _adapters(m).values()]
    assert layers and all(a.down.device.type == a.up.device.type == "cpu" for a in adapters)
    stacked = sum(m.lowrank_down[m.rank :].nbytes + m.lowrank_up[:, m.rank :].nbytes
                  for m in layers)  # fmt: skip
    assert torch.cuda.memory_allocated() - before <= stacked + (1 << 20)
    with_lora = outputs(q, cuda_calls)
    assert error(with_lora, base) > 0.05
    n_attn = len(q.transformer_blocks) + len(q.single_transformer_blocks)
    assert fuse_projections(q) == n_attn
    fused = q.transformer_blocks[0].attn.to_qkv.linear
    assert fused.backend == "triton" and fused.lowrank_down.is_cuda
    assert fused.lowrank_down.shape[0] == fused.rank + 3 * 4
    assert fused.lora_parts == [fused.rank, 4, 4, 4]
    assert error(outputs(q, cuda_calls), with_lora) < 4e-3
    set_lora_strength(q, "style", 0.0)
    assert q.transformer_blocks[0].attn.fused_projections
    assert error(outputs(q, cuda_calls), base) < 4e-3
    assert unfuse_projections(q) == n_attn


def test_fused_runtime_keeps_a_shared_lora_once(flux, tmp_path, monkeypatch):
    """A kohya/BFL LoRA has one down factor for q/k/v (and, in the single blocks, the MLP's
    input): the fused layer keeps its rows once (rank base + 4, not base + 12), loaded
    into a fused model too; a group whose stacked rank would pass ``lora.MAX_RANK`` stays
    unfused."""
    from svdquant import fuse_projections, lora, unfuse_projections

    _pipe, model, quant, calls = flux
    q = copy.deepcopy(quant)
    file, _ = _kohya_lora(model)
    write_lora(tmp_path / "k.safetensors", file, "kohya")
    n_attn = len(q.transformer_blocks) + len(q.single_transformer_blocks)
    assert fuse_projections(q) == n_attn  # loaded into a fused model: unfused, fused again
    load_lora(q, tmp_path / "k.safetensors", name="k")
    assert q.transformer_blocks[0].attn.fused_projections
    fused_out = outputs(q, calls)
    assert unfuse_projections(q) == n_attn
    with_lora = outputs(q, calls)
    assert error(fused_out, with_lora) < 1e-5
    assert fuse_projections(q) == n_attn
    double, single = q.transformer_blocks[0].attn.to_qkv, q.single_transformer_blocks[0].qkv_mlp
    for fused in (double.linear, single.linear):  # base + 4 once, padded to 16s
        assert fused.lowrank_down.shape[0] == -(-(fused.rank + 4) // 16) * 16
    assert error(outputs(q, calls), with_lora) < 1e-5
    assert unfuse_projections(q) == n_attn
    monkeypatch.setattr(lora, "MAX_RANK", q.transformer_blocks[0].attn.to_q.rank + 3)
    with pytest.warns(UserWarning, match=r"2 group\(s\) of projections left unfused, e\.g\. their "
                      r"LoRAs stacked to rank \d+, above lora\.MAX_RANK"):  # fmt: skip
        assert fuse_projections(q) == n_attn - 2  # block 0's double and single attention
    assert not q.transformer_blocks[0].attn.fused_projections
    assert error(outputs(q, calls), with_lora) < 1e-5
    unfuse_projections(q)
