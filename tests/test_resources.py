"""Not enough GPU memory: a clear error that says how much was needed and what to do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from svdquant.cli import main
from svdquant.models.tiny import tiny_pipeline
from svdquant.resources import InsufficientMemoryError, module_bytes, to_device

GiB = 2**30


@pytest.fixture
def small_gpu(monkeypatch):
    """Pretend there is a GPU with 1 KiB free of 80 GiB (nothing is ever moved)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**10, 80 * GiB))


def test_module_bytes_counts_shared_tensors_once():
    lin = nn.Linear(100, 50)
    model = nn.Sequential(lin, lin)
    assert module_bytes(model) == (100 * 50 + 50) * 4


def test_to_device_explains_a_model_that_does_not_fit(small_gpu):
    model = nn.Linear(1024, 1024)  # 4 MiB
    with pytest.raises(InsufficientMemoryError) as e:
        to_device(model, "cuda", "the transformer")
    msg = str(e.value)
    assert "the transformer needs 0.0 GiB on cuda" in msg and "0.0 GiB free of 80.0 GiB" in msg
    assert "CPU offload" in msg
    assert model.weight.device.type == "cpu"  # nothing lost


def test_cpu_needs_no_check():
    model = nn.Linear(4, 4)
    assert to_device(model, "cpu") is model


def test_generate_cli_reports_it_as_one_line(small_gpu, tmp_path, capsys):
    base = tmp_path / "pixart"
    tiny_pipeline("pixart").save_pretrained(base)
    argv = ["generate", "--model", str(base), "--prompt", "a cat", "--out", str(tmp_path / "x.png")]
    assert main([*argv, "--device", "cuda", "--steps", "1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after save_pretrained's bars
    assert last.startswith("svdquant generate: error: the pipeline needs")
    assert "--cpu-offload" in last
