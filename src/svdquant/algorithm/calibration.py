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

    All fp32, on the device of the first batch. The subsample keeps the tokens with the
    smallest keys, a hash of each token's values, sorted by key: it depends only on the
    *set* of tokens seen — not on batching, order, or how the tokens were split across
    processes — so data-parallel calibration (``all_reduce``) gives the same statistics
    as one process.
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
            if self.want_hessian:
                self.hessian = torch.zeros(self.in_features, self.in_features, device=x.device)
        else:
            torch.maximum(self.amax, amax, out=self.amax)
        if self.hessian is not None:
            self.hessian.addmm_(x.t(), x)
        self.num_tokens += x.shape[0]
        self._merge_samples(x, self._hash(x))

    def _hash(self, x: torch.Tensor) -> torch.Tensor:
        """A pseudo-random key in [0, 1) per row, a function of the row's values only.

        Integer arithmetic (wrapping int64) on the bits of up to 256 of its values: exact,
        so the same row always gets the same key, whatever batch it came in.
        """
        cols = x[:, :: max(1, self.in_features // 256)]
        bits = cols.contiguous().view(torch.int32).to(torch.int64)
        g = torch.Generator().manual_seed(self.seed)
        mult = torch.randint(1, 2**31 - 1, (cols.shape[1],), generator=g) * 2 + 1
        h = (bits * mult.to(x.device)).sum(-1)
        for shift, c in ((31, 0x5DEECE66D), (29, 0x27D4EB2F165667C5)):
            # mix, so every input bit reaches the top bits (int64 products wrap)
            h = (h ^ (h >> shift)) * torch.tensor(c, dtype=torch.int64, device=h.device)
        return (h & (2**52 - 1)).double() / 2**52

    def _merge_samples(self, x: torch.Tensor, keys: torch.Tensor) -> None:
        if self.samples is not None:
            keys = torch.cat((self._keys, keys))
            x = torch.cat((self.samples, x))
        keys, idx = torch.sort(keys, stable=True)
        self.samples, self._keys = x[idx[: self.max_samples]], keys[: self.max_samples]

    def all_reduce(self, group: object = None) -> None:
        """Combine the statistics of every process of ``torch.distributed`` (in place).

        After it, every rank holds what one process would have gathered from all ranks'
        tokens: the max, the Hessian (summed: equal up to float summation order) and the
        same subsample. A no-op outside a multi-process run. Every rank must call it, in
        the same order of layers.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size(group)
        if world == 1:
            return
        if self.amax is None:  # this rank saw no tokens: contribute neutral elements
            dev = (
                torch.device("cuda", torch.cuda.current_device())
                if dist.get_backend(group) == "nccl"
                else torch.device("cpu")
            )
            self.amax = torch.zeros(self.in_features, device=dev)
            if self.want_hessian:
                self.hessian = torch.zeros(self.in_features, self.in_features, device=dev)
            self.samples = torch.zeros(0, self.in_features, device=dev)
            self._keys = torch.zeros(0, dtype=torch.float64, device=dev)
        dev = self.amax.device
        dist.all_reduce(self.amax, dist.ReduceOp.MAX, group=group)
        if self.hessian is not None:
            dist.all_reduce(self.hessian, group=group)
        n = torch.tensor([self.num_tokens], dtype=torch.int64, device=dev)
        dist.all_reduce(n, group=group)
        self.num_tokens = int(n.item())
        # Gather every rank's subsample (padded to max_samples with key 2 > any real key).
        m = self.samples.shape[0]
        rows = torch.zeros(self.max_samples, self.in_features, device=dev)
        keys = torch.full((self.max_samples,), 2.0, dtype=torch.float64, device=dev)
        rows[:m], keys[:m] = self.samples, self._keys
        all_rows = [torch.empty_like(rows) for _ in range(world)]
        all_keys = [torch.empty_like(keys) for _ in range(world)]
        dist.all_gather(all_rows, rows, group=group)
        dist.all_gather(all_keys, keys, group=group)
        keys, rows = torch.cat(all_keys), torch.cat(all_rows)
        real = keys < 2.0
        self.samples, self._keys = None, None
        self._merge_samples(rows[real], keys[real])
        if self.num_tokens == 0:
            self.amax = self.hessian = self.samples = self._keys = None

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
