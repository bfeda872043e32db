"""Shared fixtures: a linear layer with planted outliers (svdquant.testing)."""

import os
import tempfile

import pytest
import torch
from torch import nn

# Without CUDA the Triton kernels run in triton's CPU interpreter. The variable must be
# set before the first kernel module is imported (triton.jit reads it at decoration), and
# importing svdquant imports them: so here, before anything imports svdquant.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The GEMM keeps its tuned tiles on disk (kernels/tile_cache.py): never in the user's cache.
os.environ["SVDQUANT_CACHE_DIR"] = tempfile.mkdtemp(prefix="svdquant-test-cache-")

from svdquant.testing import planted_outlier_inputs, planted_outlier_layer


@pytest.fixture
def outlier_layer() -> nn.Linear:
    return planted_outlier_layer()


@pytest.fixture
def calib_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [planted_outlier_inputs(256, generator=g) for _ in range(8)]


@pytest.fixture
def test_inputs() -> torch.Tensor:
    return planted_outlier_inputs(1024, generator=torch.Generator().manual_seed(2))


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
