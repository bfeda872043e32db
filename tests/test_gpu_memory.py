"""On the GPU: quantizing layer by layer stays within a stated peak of device memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import svdquant

pytestmark = pytest.mark.gpu


def test_quantizing_layer_by_layer_stays_within_the_stated_peak():
    # Eight FLUX-sized MLP layers in bf16 (3072 <-> 12288: 75 MiB each, 604 MiB together).
    torch.manual_seed(0)
    dev = "cuda"
    layers = [
        nn.Linear(
            *((3072, 12288) if i % 2 == 0 else (12288, 3072)), dtype=torch.bfloat16, device=dev
        )
        for i in range(8)
    ]
    model_bytes = sum(p.numel() * p.element_size() for m in layers for p in m.parameters())
    largest = max(m.weight.numel() for m in layers) * 2  # bf16 bytes of the largest layer
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for i, lin in enumerate(layers):
        x = torch.randn(4096, lin.in_features, device=dev, dtype=torch.bfloat16)
        layers[i] = svdquant.quantize_linear(lin, x, alpha=0.5)
        del lin, x
    peak = torch.cuda.max_memory_allocated() - base
    # Stated peak: the 16-bit model plus 16x its largest layer (fp32 copies of one layer's
    # weight, smoothed weight, residual and quantization temporaries, plus calibration).
    assert peak < model_bytes + 16 * largest, (peak, model_bytes, largest)
    print(f"peak {peak / 2**20:.0f} MiB over a {model_bytes / 2**20:.0f} MiB model")
