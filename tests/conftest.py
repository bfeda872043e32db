"""Shared fixtures: a linear layer with planted outliers, like real diffusion models'."""

import pytest
import torch
from torch import nn

K, N = 512, 384


def outlier_inputs(m: int, generator: torch.Generator) -> torch.Tensor:
    """Activations whose first 8 channels are 20-100x larger than the rest."""
    x = torch.randn(m, K, generator=generator)
    x[:, :8] *= torch.linspace(20, 100, 8)
    return x


@pytest.fixture
def outlier_layer() -> nn.Linear:
    """nn.Linear(512, 384) whose weight has 40 entries 30x larger than the rest."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.02)
        idx = torch.randperm(N * K, generator=g)[:40]
        lin.weight.view(-1)[idx] *= 30
        lin.bias.copy_(torch.randn(N, generator=g) * 0.1)
    return lin


@pytest.fixture
def calib_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [outlier_inputs(256, g) for _ in range(8)]


@pytest.fixture
def test_inputs() -> torch.Tensor:
    return outlier_inputs(1024, torch.Generator().manual_seed(2))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skip them elsewhere (run them with ``pytest -m gpu``)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
