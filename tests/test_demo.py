"""The shipped demo: the trained DiT loads, quantizes with SVDQuant and samples (reduced run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchmetrics")

from svdquant import demo
from svdquant.nn import SVDQLinear


def test_shipped_weights_are_small_and_load() -> None:
    assert demo.WEIGHTS.stat().st_size <= 20 * 10**6
    model = demo.load_model()
    layers = demo.demo_layers(model)
    assert len(layers) == 6 * 7  # q, k, v, out, fc1, fc2 (W4A4) + adaLN modulation (W4A16)
    assert sum(a == "none" for a in layers.values()) == 6


@pytest.mark.slow
def test_run_demo_reduced(tmp_path: Path) -> None:
    torch.manual_seed(0)
    r = demo.run_demo(
        tmp_path, device="cpu", num_images=4, steps=8, calibration_images=4, progress=False
    )
    grid = Path(r.grid)
    assert grid.exists()
    from PIL import Image

    img = Image.open(grid)
    assert img.size == (3 * (4 * 30 + 2), 3 * (3 * 30 + 2))  # 3 rows of 4 tiles, 3x upscaled
    assert json.loads((tmp_path / "demo.json").read_text())["layers_quantized"] == 42
    assert r.bytes_16bit / r.bytes_4bit > 2.0
    # 4-bit samples stay close to the 16-bit ones, closer than naive W4A4's.
    assert r.psnr_db > 13.0 and r.ssim > 0.6
    assert r.psnr_db > r.naive_psnr_db


def test_model_bytes_counts_packed_codes_at_their_size() -> None:
    lin = torch.nn.Linear(128, 64)
    q = SVDQLinear(128, 64, rank=0)
    assert demo.model_bytes(lin) == (128 * 64 + 64) * 2
    assert demo.model_bytes(q) < demo.model_bytes(lin) / 2


def test_demo_cli_rejects_bad_counts(capsys):
    from svdquant.cli import main

    assert main(["demo", "--num-images", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
