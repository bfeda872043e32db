"""``svdquant eval`` on tiny pipelines (CPU): same seeds, metrics, grid, skipped metrics."""

from __future__ import annotations

import json

import pytest
import torch

from svdquant.cli import main
from svdquant.eval.images import image_metrics
from svdquant.models.tiny import tiny_pipeline

SIZE = ["--height", "16", "--width", "16"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("pixart")
    tiny_pipeline("pixart").save_pretrained(base)
    q = tmp_path_factory.mktemp("q") / "pixart-int4"
    argv = ["quantize", "--model", str(base), "--out", str(q), "--rank", "8", "--num-prompts"]
    argv += ["2", "--steps", "2", *SIZE, "--dtype", "float32", "--device", "cpu"]
    assert main(argv) == 0
    yield base, q
    torch.set_num_threads(n)


def eval_argv(base, q, out, n=3):
    argv = ["eval", "--model", str(base), "--quantized", str(q), "--out", str(out)]
    return [*argv, "--num-images", str(n), "--steps", "2", *SIZE, "--dtype", "float32"]


def test_eval_writes_metrics_and_grid(dirs, tmp_path, capsys):
    base, q = dirs
    assert main([*eval_argv(base, q, tmp_path), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    m = report["metrics"]
    assert report["num_images"] == 3
    assert 5 < m["psnr"] < 100 and 0 < m["ssim"] < 1  # close to, not equal to, 16-bit
    for name in ("lpips", "fid", "clip_score"):  # no weights on disk here: skipped, said so
        assert m[name].startswith("skipped:")
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[1] > 3 * 16
    out = capsys.readouterr().out
    assert "| psnr |" in out and "skipped: CLIP score needs local CLIP weights" in out


def test_same_seeds_give_the_same_images(dirs, tmp_path):
    base, q = dirs
    argv = eval_argv(base, q, tmp_path / "a", n=2)
    assert main([*argv, "--device", "cpu"]) == 0
    argv = eval_argv(base, q, tmp_path / "b", n=2)
    assert main([*argv, "--device", "cpu"]) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["metrics"]
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]
    assert a == b


def test_identical_images_are_perfect():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    m = image_metrics(x, x.clone())
    assert m["psnr"] == 100.0 and m["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        image_metrics(x, x[:1])


def test_eval_bad_inputs(dirs, tmp_path, capsys):
    base, _ = dirs
    assert main([*eval_argv(base, base, tmp_path), "--device", "cpu"]) == 2
    assert "not a directory written by `svdquant quantize`" in capsys.readouterr().err


def test_eval_prepares_each_pipeline_as_generate_does(dirs, tmp_path, monkeypatch):
    """The quantized pipeline is fused and the 16-bit one is not (the images compared are
    the ones `svdquant generate` makes); both the same otherwise."""
    import svdquant.fuse

    fused = []
    real = svdquant.fuse.fuse_projections

    def record(model):
        fused.append(any(type(m).__name__ == "SVDQLinear" for m in model.modules()))
        return real(model)

    monkeypatch.setattr(svdquant.fuse, "fuse_projections", record)
    assert main([*eval_argv(dirs[0], dirs[1], tmp_path, n=1), "--device", "cpu"]) == 0
    assert fused == [True]  # once, on the quantized denoiser


def test_offload_keeps_page_locked_host_copies(dirs, tmp_path, monkeypatch, capsys):
    """Under model CPU offload on a GPU every model of every pipeline moves from
    page-locked host memory (``keep_host_copy``, installed before the offload): eval's two
    pipelines and generate's one. The device's calls are recorded, on the CPU."""
    import diffusers

    import svdquant.offload

    order = []

    def keep(model):
        order.append(("keep", type(model).__name__))
        return model

    def offload(pipe, device=None, **kw):
        order.append(("offload", device))

    monkeypatch.setattr(svdquant.offload, "keep_host_copy", keep)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "enable_model_cpu_offload", offload)
    argv = [*eval_argv(dirs[0], dirs[1], tmp_path, n=1), "--cpu-offload", "--device", "cuda"]
    assert main(argv) == 0
    models = ["T5EncoderModel", "AutoencoderKL"]
    kept = sorted(name for what, name in order if what == "keep")
    assert kept == sorted([*models, *models, "CUDAGraphed", "CUDAGraphed"])
    assert [o[0] for o in order] == ["keep"] * 3 + ["offload"] + ["keep"] * 3 + ["offload"]
    assert "move between page-locked host memory and the GPU" in capsys.readouterr().out
    order.clear()
    gen = ["generate", "--model", str(dirs[1]), "--prompt", "a cat", "--cpu-offload"]
    gen += ["--out", str(tmp_path / "o.png"), "--steps", "1", *SIZE, "--dtype", "float32"]
    assert main([*gen, "--device", "cuda"]) == 0
    assert [o[0] for o in order] == ["keep"] * 3 + ["offload"]
