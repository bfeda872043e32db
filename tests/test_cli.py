"""The ``svdquant`` command line on a tiny PixArt-Σ pipeline saved to disk (CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from svdquant.cli import main
from svdquant.models.tiny import tiny_pipeline
from svdquant.pipeline import load_pipeline

SIZE = ["--height", "16", "--width", "16"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny PixArt-Σ pipeline saved with ``save_pretrained`` (a diffusers directory)."""
    path = tmp_path_factory.mktemp("pixart")
    tiny_pipeline("pixart").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantized(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "pixart-int4"
    prompts = tmp_path_factory.mktemp("p") / "prompts.txt"
    prompts.write_text("# my prompts\na cat on a sofa\n\na red fox in the snow\na lighthouse\n")
    argv = ["quantize", "--model", str(base), "--out", str(out), "--rank", "8"]
    argv += ["--prompts", str(prompts), "--num-prompts", "2", "--steps", "2", *SIZE]
    argv += ["--dtype", "float32", "--device", "cpu", "--max-samples", "128"]
    assert main(argv) == 0
    return out


def test_quantize_writes_a_checkpoint(quantized, base):
    names = {p.name for p in quantized.iterdir()}
    assert {"svdquant.safetensors", "config.json", "svdquant.json"} <= names
    info = json.loads((quantized / "svdquant.json").read_text())
    assert info["class_name"] == "PixArtTransformer2DModel"
    assert info["component"] == "transformer"
    assert info["base_model"] == str(base.resolve())
    assert info["quantize_config"]["rank"] == 8


def test_generate_from_quantized_and_from_base(quantized, base, tmp_path):
    from PIL import Image

    for model, name in ((quantized, "q.png"), (base, "base.png")):
        out = tmp_path / name
        argv = ["generate", "--model", str(model), "--prompt", "a cat", "--out", str(out)]
        argv += ["--steps", "2", "--seed", "3", *SIZE, "--dtype", "float32", "--device", "cpu"]
        assert main(argv) == 0
        assert Image.open(out).size == (16, 16)
    argv = ["generate", "--model", str(quantized), "--prompt", "a cat", "--out"]
    argv += [str(tmp_path / "many.png"), "--steps", "1", *SIZE, "--num-images", "2"]
    argv += ["--dtype", "bfloat16", "--device", "cpu", "--cpu-offload"]
    assert main(argv) == 0
    assert (tmp_path / "many-0.png").is_file() and (tmp_path / "many-1.png").is_file()


def test_generate_compile_wraps_the_denoiser(quantized, tmp_path, monkeypatch, capsys):
    """--compile hands the denoiser to torch.compile with CUDA graphs (reduce-overhead);
    the compilation itself is Inductor's (stubbed here: minutes on 2 CPU cores)."""
    seen = []

    def fake_compile(module, mode=None, **kw):
        seen.append((type(module).__name__, mode))
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    argv = ["generate", "--model", str(quantized), "--prompt", "a cat", "--compile"]
    argv += ["--out", str(tmp_path / "c.png"), "--steps", "1", *SIZE]
    argv += ["--dtype", "float32", "--device", "cpu"]
    assert main(argv) == 0
    assert seen == [("PixArtTransformer2DModel", "reduce-overhead")]
    assert "compiling the transformer" in capsys.readouterr().out
    assert main([*argv, "--cpu-offload"]) != 0  # graphs need the weights on the GPU
    assert "do not mix" in capsys.readouterr().err


def test_generate_fuses_projections_unless_told_not_to(quantized, tmp_path, monkeypatch, capsys):
    """generate runs svdquant.fuse_projections on the denoiser by default (FLUX: q/k/v as
    one layer, same images; tested on the model in test_models), under --cpu-offload too
    (before the offload hook: tested on the GPU in test_cuda_graph), not with --no-fuse."""
    import svdquant.fuse

    seen = []

    def fake_fuse(model):
        seen.append(type(model).__name__)
        return 3

    monkeypatch.setattr(svdquant.fuse, "fuse_projections", fake_fuse)
    argv = ["generate", "--model", str(quantized), "--prompt", "a cat"]
    argv += ["--out", str(tmp_path / "f.png"), "--steps", "1", *SIZE]
    argv += ["--dtype", "float32", "--device", "cpu"]
    assert main(argv) == 0
    assert seen == ["PixArtTransformer2DModel"]
    assert "fused the projections of 3 attention modules" in capsys.readouterr().out
    assert main([*argv, "--no-fuse"]) == 0
    assert seen == ["PixArtTransformer2DModel"]
    assert main([*argv, "--cpu-offload"]) == 0
    assert seen == ["PixArtTransformer2DModel"] * 2


def test_generate_fp8_weights_where_they_pay(quantized, tmp_path, monkeypatch, capsys):
    """--fp8-weights keeps the denoiser's fp8 weights (svdquant.keep_fp8_weights, the 4-bit
    codes moved to host memory) on a GPU without offload; on the CPU it says it skips them
    and generates; with --cpu-offload it is refused; where the copies do not fit, they are
    released and the run goes on."""
    import svdquant.cli as cli
    import svdquant.nn

    argv = ["generate", "--model", str(quantized), "--prompt", "a cat", "--fp8-weights"]
    argv += ["--out", str(tmp_path / "w.png"), "--steps", "1", *SIZE]
    argv += ["--dtype", "float32", "--device", "cpu"]
    assert main(argv) == 0
    assert "--fp8-weights: not on cpu" in capsys.readouterr().out
    assert main([*argv, "--cpu-offload"]) != 0
    assert "do not mix" in capsys.readouterr().err
    calls = []

    def keep(model, enabled=True, max_bytes=None, codes_on_host=False):
        calls.append((enabled, max_bytes) + ((codes_on_host,) if enabled else ()))
        if enabled and len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("no room")
        return 1

    gib = 2**30
    monkeypatch.setattr(svdquant.nn, "keep_fp8_weights", keep)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    layers = torch.nn.ModuleList([svdquant.nn.SVDQLinear(64, 64, rank=4) for _ in range(3)])
    cli._keep_fp8_weights(layers, "cuda", offload=False)  # on the reference path here
    assert "no layer of the denoiser runs on the fp8 engine" in capsys.readouterr().out
    monkeypatch.setattr(svdquant.nn.SVDQLinear, "on_fp8_engine", lambda self: True)
    cli._keep_fp8_weights(layers, "cuda", offload=False)
    # tried within 10 - 4 GiB, the codes to the host; released
    assert calls == [(True, 6 * gib, True), (False, None)]
    assert "do not fit on the GPU; running without them" in capsys.readouterr().out
    cli._keep_fp8_weights(layers, "cuda", offload=False)
    out = capsys.readouterr().out
    assert "kept the fp8 weights of 1 of 3 layers on the GPU (+0.0 GiB; their 4-bit" in out
    assert "the other 2 widen at each step: 10.0 GiB were free, 4 GiB of it left" in out
    cli._keep_fp8_weights(layers, "cuda", offload=True)
    assert "not under CPU offload" in capsys.readouterr().out and len(calls) == 3


def test_generate_cpu_offload_fuses_and_wraps_before_the_offload(quantized, tmp_path, monkeypatch):
    """On a GPU, generate --cpu-offload fuses the denoiser, wraps it in cuda_graphed, and
    only then enables the offload, so that the hook moves the wrapper (the order the GPU
    test in test_cuda_graph checks); here with the device's calls recorded, on the CPU."""
    import diffusers

    import svdquant.cuda_graph
    import svdquant.fuse

    order = []
    real_wrap = svdquant.cuda_graph.cuda_graphed

    def fuse(model):
        order.append(("fuse", type(model).__name__))
        return 0

    def wrap(model):
        order.append(("wrap", type(model).__name__))
        return real_wrap(model)

    def offload(pipe, device=None, **kw):
        order.append(("offload", type(pipe.transformer).__name__, device))

    monkeypatch.setattr(svdquant.fuse, "fuse_projections", fuse)
    monkeypatch.setattr(svdquant.cuda_graph, "cuda_graphed", wrap)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "enable_model_cpu_offload", offload)
    argv = ["generate", "--model", str(quantized), "--prompt", "a cat", "--cpu-offload"]
    argv += ["--out", str(tmp_path / "o.png"), "--steps", "1", *SIZE]
    argv += ["--dtype", "float32", "--device", "cuda"]  # recorded: nothing reaches a GPU
    assert main(argv) == 0
    assert order == [
        ("fuse", "PixArtTransformer2DModel"),
        ("wrap", "PixArtTransformer2DModel"),
        ("offload", "CUDAGraphed", "cuda"),
    ]


def test_generate_falls_back_to_cpu_offload_when_the_pipeline_does_not_fit(
    quantized, tmp_path, monkeypatch, capsys
):
    """A pipeline larger than the GPU's free memory whose largest model fits runs with
    model CPU offload, saying so; where even that model does not fit, or with --compile,
    the one-line advice as before. (The device's calls are recorded, on the CPU.)"""
    import diffusers

    from svdquant.pipeline import load_pipeline
    from svdquant.resources import module_bytes

    pipe = load_pipeline(quantized, torch_dtype=torch.float32)  # as --dtype float32 loads it
    total = module_bytes(pipe)
    largest = max(module_bytes(m) for m in pipe.components.values() if hasattr(m, "parameters"))
    assert largest < total
    offloaded = []
    monkeypatch.setattr(
        diffusers.DiffusionPipeline,
        "enable_model_cpu_offload",
        lambda pipe, device=None, **kw: offloaded.append(device),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    free = {"bytes": largest + 1}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 2**40))
    argv = ["generate", "--model", str(quantized), "--prompt", "a cat", "--no-fuse"]
    argv += ["--out", str(tmp_path / "o.png"), "--steps", "1", *SIZE, "--no-cuda-graph"]
    argv += ["--dtype", "float32", "--device", "cuda"]
    assert main(argv) == 0
    assert offloaded == ["cuda"]
    assert "each model goes to the GPU only while it runs" in capsys.readouterr().out
    assert main([*argv, "--compile"]) != 0  # torch.compile cannot offload: the advice
    assert "--cpu-offload" in capsys.readouterr().err
    free["bytes"] = largest - 1
    assert main(argv) != 0
    assert "needs" in capsys.readouterr().err and offloaded == ["cuda"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_loaded_pipeline_behaves_like_a_diffusers_pipeline(quantized, dtype):
    from svdquant import SVDQLinear

    pipe = load_pipeline(quantized, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    layer = pipe.transformer.transformer_blocks[0].attn1.to_q
    assert isinstance(layer, SVDQLinear)
    assert layer.lowrank_down.dtype == dtype and layer.qweight.dtype == torch.uint8
    pipe.to("cpu")
    kw = dict(num_inference_steps=2, height=16, width=16, use_resolution_binning=False)
    kw.update(output_type="pt", clean_caption=False, max_sequence_length=16)

    def run():
        gen = torch.Generator("cpu").manual_seed(0)
        return pipe(prompt=["a cat", "a dog"], generator=gen, **kw).images

    a, b = run(), run()
    assert a.shape[0] == 2 and torch.isfinite(a.float()).all()
    torch.testing.assert_close(a, b)  # same seed, same images


def _err(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_errors_are_clear(quantized, base, tmp_path, capsys):
    out = str(tmp_path / "o")
    code, err = _err(capsys, ["quantize", "--model", str(tmp_path / "nope"), "--out", out])
    assert code == 2 and "not found" in err
    code, err = _err(capsys, ["quantize", "--model", str(tmp_path), "--out", out])
    assert code == 2 and "not a diffusers pipeline directory" in err
    code, err = _err(capsys, ["generate", "--model", str(tmp_path), "--prompt", "x", "--out", out])
    assert code == 2 and "neither a diffusers pipeline" in err

    # an architecture without an adapter: names the supported ones
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    ddpm = tmp_path / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(ddpm)
    code, err = _err(capsys, ["quantize", "--model", str(ddpm), "--out", out])
    assert code == 2 and "unsupported architecture 'UNet2DModel'" in err
    assert "FluxTransformer2DModel" in err and "SanaTransformer2DModel" in err

    # a checkpoint for another architecture than the pipeline it is loaded into
    other = tmp_path / "flux-pipe"
    other.mkdir()
    (other / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
        )
    )
    argv = ["generate", "--model", str(quantized), "--base", str(other), "--prompt", "x"]
    code, err = _err(capsys, [*argv, "--out", out])
    assert code == 2 and "made for another architecture" in err

    # config.json and checkpoint disagree / config.json of an unsupported class
    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    cfg = json.loads((bad / "config.json").read_text())
    for cls, msg in (
        ("SanaTransformer2DModel", "made for 'PixArtTransformer2DModel'"),
        ("UNet2DModel", "unsupported architecture"),
    ):
        (bad / "config.json").write_text(json.dumps({**cfg, "_class_name": cls}))
        code, err = _err(capsys, ["generate", "--model", str(bad), "--prompt", "x", "--out", out])
        assert code == 2 and msg in err


def test_python_dash_m(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "svdquant", "--help"], capture_output=True, text=True, check=True
    )
    assert "quantize" in r.stdout and "generate" in r.stdout
    r = subprocess.run([sys.executable, "-m", "svdquant", "frobnicate"], capture_output=True)
    assert r.returncode == 2


def test_generate_with_a_lora(quantized, tmp_path, capsys, monkeypatch):
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    layer = load_pipeline(quantized).transformer.transformer_blocks[0].attn1.to_q
    g = torch.Generator().manual_seed(0)
    lora = tmp_path / "style.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(
                4, layer.in_features, generator=g
            ),
            "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(
                layer.out_features, 4, generator=g
            ),
        },
        lora,
    )

    def generate(*extra):
        out = tmp_path / f"img{len(list(tmp_path.iterdir()))}.png"
        argv = ["generate", "--model", str(quantized), "--prompt", "a cat", "--out", str(out)]
        argv += ["--steps", "2", "--seed", "3", *SIZE, "--dtype", "float32", "--device", "cpu"]
        assert main([*argv, *extra]) == 0
        return np.asarray(Image.open(out))

    plain = generate()
    assert (generate("--lora", f"{lora}:0") == plain).all()  # strength 0: no change
    import svdquant.fuse

    # the projections are fused after the LoRAs are loaded (they are fused with them)
    seen = []
    real = svdquant.fuse.fuse_projections

    def fuse_after_lora(model):
        seen.append(bool(svdquant.list_loras(model)))
        return real(model)

    monkeypatch.setattr(svdquant.fuse, "fuse_projections", fuse_after_lora)
    assert (generate("--lora", str(lora)) != plain).any()
    assert seen == [True]
    bad = ["generate", "--model", str(quantized), "--prompt", "x", "--out", str(tmp_path / "b.png")]
    assert main([*bad, "--lora", str(tmp_path / "missing.safetensors"), "--device", "cpu"]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
