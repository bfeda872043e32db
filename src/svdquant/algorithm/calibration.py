"""Calibration statistics of a linear layer's inputs, collected with forward hooks."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["ActivationStats", "observe"]


class ActivationStats:
    """Streaming statistics of the inputs ``x`` [..., K] of one linear layer.

    Kept, whatever the number of batches seen:

    * ``amax`` [K]: the per-input-channel max |x| (drives smoothing),
    * ``hessian`` [K, K]: ``Σ xᵀx`` over all tokens, only if ``hessian=True`` (GPTQ),
    * ``samples`` [≤ max_samples, K]: a uniform random subsample of the tokens seen, on
      which the α search measures the layer's output error.

    All fp32, on the device of the first batch. The subsample is drawn with a seeded
    generator, so the same batches always give the same statistics.
    """

    def __init__(
        self, in_features: int, *, hessian: bool = False, max_samples: int = 2048, seed: int = 0
    ) -> None:
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self.want_hessian = hessian
        self.max_samples = max_samples
        self.seed = seed
        self.num_tokens = 0
        self.amax: torch.Tensor | None = None
        self.hessian: torch.Tensor | None = None
        self.samples: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._gen: torch.Generator | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor, name: str = "the layer") -> None:
        """Add a batch of inputs ``x`` [..., K]."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"calibration inputs of {name} must have shape [..., {self.in_features}], "
                f"got {tuple(x.shape)}"
            )
        if not torch.is_floating_point(x):
            raise ValueError(f"calibration inputs of {name} must be floating point, got {x.dtype}")
        x = x.detach().reshape(-1, self.in_features).float()
        if x.shape[0] == 0:
            return
        if not torch.isfinite(x).all():
            raise ValueError(f"calibration inputs of {name} contain NaN or Inf")
        amax = x.abs().amax(0)
        if self.amax is None:
            self.amax = amax
            self._gen = torch.Generator(device=x.device).manual_seed(self.seed)
            if self.want_hessian:
                self.hessian = torch.zeros(self.in_features, self.in_features, device=x.device)
        else:
            torch.maximum(self.amax, amax, out=self.amax)
        if self.hessian is not None:
            self.hessian.addmm_(x.t(), x)
        self.num_tokens += x.shape[0]
        # Uniform subsample without replacement: keep the rows with the smallest random keys.
        keys = torch.rand(x.shape[0], generator=self._gen, device=x.device)
        if self.samples is not None:
            keys = torch.cat((self._keys, keys))
            x = torch.cat((self.samples, x))
        if x.shape[0] > self.max_samples:
            keys, idx = torch.topk(keys, self.max_samples, largest=False, sorted=False)
            x = x[idx]
        self.samples, self._keys = x, keys

    def check_ready(self, name: str = "the layer") -> None:
        if self.amax is None:
            raise ValueError(f"no calibration data reached {name}: pass at least one batch")


@contextmanager
def observe(
    layers: Mapping[str, nn.Linear], **stats_kwargs: object
) -> Iterator[dict[str, ActivationStats]]:
    """Collect ``ActivationStats`` of every layer in ``layers`` while the block runs.

    ``with observe({"fc1": model.fc1}) as stats: model(batch)`` — forward pre-hooks record
    the input of each layer at every call; they are removed on exit.
    """
    stats = {
        name: ActivationStats(layer.in_features, **stats_kwargs)  # type: ignore[arg-type]
        for name, layer in layers.items()
    }
    handles = [
        layer.register_forward_pre_hook(
            lambda _m, args, _n=name: stats[_n].update(args[0], name=_n)
        )
        for name, layer in layers.items()
    ]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
