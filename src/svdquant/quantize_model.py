"""``quantize_model``: SVDQuant a whole diffusers denoiser in place, like torchao's
``quantize_``.

Calibration runs the user's pipeline (any callable) while forward pre-hooks stream
per-layer statistics (``ActivationStats``: channel max, a capped token subsample, and the
Hessian for GPTQ). Nothing else is kept, so memory is bounded by ``max_samples`` and, for
large models, by ``stats_budget_bytes``: when the statistics of all layers would not fit,
the layers are split into passes and the calibration runs once per pass.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from svdquant.algorithm import ActivationStats, quantize_from_stats
from svdquant.algorithm.quantize import METHODS
from svdquant.formats import get_format
from svdquant.models import ModelAdapter, QuantGroup, get_adapter
from svdquant.nn import SVDQLinear
from svdquant.resources import explain_oom
from svdquant.resume import PartialQuantization

__all__ = ["QuantizeConfig", "quantize_model"]

logger = logging.getLogger(__name__)

Calibration = Callable[[nn.Module], Any]


@dataclass
class QuantizeConfig:
    """How to quantize a model.

    Attributes:
        fmt: weight format, ``"int4"`` or ``"nvfp4"``.
        act_fmt: activation format of the W4A4 layers (``None``: same as ``fmt``; ``"fp8"``
            gives W4A8). Layers the adapter marks W4A16 always keep 16-bit activations.
        rank: rank of the 16-bit low-rank branch (one per group of layers sharing an input).
        alpha: smoothing strength; ``None`` searches the grid per layer by output error.
        gptq: quantize the residuals with GPTQ (collects a K×K Hessian per group).
        method: ``"svdquant"`` or a baseline (``"naive"``, ``"smoothquant"``, ``"lowrank"``).
        skip: regular expressions of module names to keep 16-bit, on top of the adapter's.
        max_samples: calibration tokens kept per group for the α search.
        stats_budget_bytes: most memory the statistics may take at once; above it the
            calibration is run in several passes over groups of layers.
        progress: show tqdm progress bars.
    """

    fmt: str = "int4"
    act_fmt: str | None = None
    rank: int = 32
    alpha: float | None = None
    gptq: bool = False
    method: str = "svdquant"
    skip: Sequence[str] = ()
    max_samples: int = 1024
    stats_budget_bytes: int = 8 << 30
    progress: bool = True

    def __post_init__(self) -> None:
        get_format(self.fmt)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; supported: {sorted(METHODS)}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.max_samples <= 0:
            raise ValueError(f"max_samples must be positive, got {self.max_samples}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d


def _stats_bytes(k: int, cfg: QuantizeConfig) -> int:
    return 4 * k * (cfg.max_samples + 2 + (k if cfg.gptq else 0))


def _passes(groups: list[QuantGroup], k_of: dict[str, int], cfg: QuantizeConfig):
    """Split ``groups`` into consecutive runs whose statistics fit the budget."""
    out: list[list[QuantGroup]] = [[]]
    used = 0
    for g in groups:
        b = _stats_bytes(k_of[g.names[0]], cfg)
        if out[-1] and used + b > cfg.stats_budget_bytes:
            out.append([])
            used = 0
        out[-1].append(g)
        used += b
    return [p for p in out if p]


class _SharedInputCheck:
    """Verifies the adapter's claim that the members of a group share their input: each
    member folds the identity (address, shape) of every input it receives into a running
    hash, and the hashes must agree at the end (O(1) memory however long calibration is)."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def hook(self, name: str):
        self.seen[name] = 0

        def fn(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            self.seen[name] = hash((self.seen[name], x.data_ptr(), tuple(x.shape)))

        return fn

    def verify(self, group: QuantGroup) -> None:
        first = self.seen.get(group.names[0])
        for other in group.names[1:]:
            if self.seen.get(other) != first:
                raise ValueError(
                    f"layers {group.names[0]!r} and {other!r} are declared to share their "
                    "input, but received different tensors during calibration: the "
                    "architecture adapter does not fit this model"
                )


@torch.no_grad()
def _quantize_group(
    model: nn.Module, group: QuantGroup, stats: ActivationStats, cfg: QuantizeConfig
) -> dict[str, SVDQLinear]:
    """Quantize the layers of ``group`` as one (concatenated along N), then split them."""
    mods: list[nn.Linear] = [model.get_submodule(n) for n in group.names]
    home = mods[0].weight.device
    # Compute where the statistics are (e.g. the GPU while the model is offloaded to CPU).
    dev = stats.amax.device if stats.amax is not None else home
    weight = torch.cat([m.weight.to(dev) for m in mods]) if len(mods) > 1 else mods[0].weight
    weight = weight.to(dev)
    act_fmt = group.act_fmt or cfg.act_fmt
    # A layer narrower than the rank (e.g. a small output projection) gets a full-rank branch.
    rank = min(cfg.rank, *weight.shape)
    fused = quantize_from_stats(
        weight,
        None,
        stats,
        fmt=cfg.fmt,
        act_fmt=act_fmt,
        rank=rank,
        alpha=cfg.alpha,
        gptq=cfg.gptq,
        method=cfg.method,
    )
    out: dict[str, SVDQLinear] = {}
    start = 0
    for name, m in zip(group.names, mods, strict=True):
        n = m.out_features
        rows = slice(start, start + n)
        start += n
        layer = SVDQLinear(
            m.in_features,
            n,
            m.bias is not None,
            fmt=fused.fmt,
            act_fmt=fused.act_fmt,
            rank=fused.rank,
            dtype=fused.lowrank_down.dtype,
            device=weight.device,
        )
        layer.qweight.copy_(fused.qweight[rows])
        layer.wscales.copy_(fused.wscales[rows])
        layer.wtensor_scale.copy_(fused.wtensor_scale)
        layer.smooth.copy_(fused.smooth)
        layer.act_amax.copy_(fused.act_amax)
        layer.lowrank_down.copy_(fused.lowrank_down)
        layer.lowrank_up.copy_(fused.lowrank_up[rows])
        if m.bias is not None:
            layer.bias.copy_(m.bias)
        layer.alpha = fused.alpha
        out[name] = layer.to(home)
    return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(
    model: nn.Module,
    calibration: Calibration,
    config: QuantizeConfig | None = None,
    *,
    adapter: ModelAdapter | None = None,
    resume_dir: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Quantize ``model`` (a supported diffusers denoiser) in place and return it.

    Args:
        model: e.g. ``pipe.transformer``; its ``nn.Linear`` layers chosen by the
            architecture adapter become ``SVDQLinear``.
        calibration: called as ``calibration(model)``; it must run ``model`` on
            representative inputs — typically the whole pipeline over a prompt set and
            its denoising steps (see ``svdquant.pipeline.pipeline_calibration``). It may be
            called more than once (once per pass, see ``QuantizeConfig``).
        config: the ``QuantizeConfig`` (default: int4 W4A4, rank 32, α searched).
        adapter: override the adapter found from the model's class.
        resume_dir: keep every finished group of layers there (``svdquant.resume``); a
            rerun with the same model and config skips the groups already done (and the
            calibration passes that only they needed).

    The statistics are taken on the 16-bit model; layers are swapped only at the end, so
    the result does not depend on how the layers were split into passes.
    """
    cfg = config or QuantizeConfig()
    adapter = adapter or get_adapter(model)
    adapter.prepare(model)
    groups = adapter.plan(model, cfg.skip)
    if not groups:
        raise ValueError(f"{adapter.name}: no layer left to quantize (check `skip`)")
    k_of = {n: model.get_submodule(n).in_features for g in groups for n in g.names}
    new: dict[str, SVDQLinear] = {}
    index = {g.names[0]: i for i, g in enumerate(groups)}
    partial = None
    if resume_dir is not None:
        manifest = {
            "model": type(model).__name__,
            "config": cfg.to_dict() | {"progress": None},
            "groups": [list(g.names) for g in groups],
        }
        partial = PartialQuantization(resume_dir, manifest)
        home = next(model.parameters()).device
        for g in groups:
            layers = partial.load(index[g.names[0]], home)
            if layers is not None:
                new.update(layers)
        if new:
            logger.warning(
                "svdquant: resuming from %s: %d of %d layers already quantized",
                resume_dir,
                len(new),
                sum(len(g.names) for g in groups),
            )
    todo = [g for g in groups if g.names[0] not in new]
    passes = _passes(todo, k_of, cfg) if todo else []
    n_layers = sum(len(g.names) for g in groups)
    logger.info(
        "svdquant: %d layers in %d groups, %d calibration pass(es)",
        n_layers,
        len(groups),
        len(passes),
    )
    bar = tqdm(
        total=len(groups),
        initial=len(groups) - len(todo),
        desc="svdquant: quantizing",
        disable=not cfg.progress,
    )
    for i, pass_groups in enumerate(passes):
        stats = {
            g.names[0]: ActivationStats(
                k_of[g.names[0]], hessian=cfg.gptq, max_samples=cfg.max_samples
            )
            for g in pass_groups
        }
        check = _SharedInputCheck()
        handles = []
        for g in pass_groups:
            lead = model.get_submodule(g.names[0])
            handles.append(
                lead.register_forward_pre_hook(
                    lambda _m, args, _s=stats[g.names[0]], _n=g.names[0]: _s.update(args[0], _n)
                )
            )
            if len(g.names) > 1:
                for n in g.names:
                    handles.append(model.get_submodule(n).register_forward_pre_hook(check.hook(n)))
        if len(passes) > 1:
            bar.set_postfix_str(f"calibration pass {i + 1}/{len(passes)}")
        try:
            with torch.no_grad():
                calibration(model)
        finally:
            for h in handles:
                h.remove()
        for g in pass_groups:
            s = stats.pop(g.names[0])
            s.all_reduce()  # under torchrun: combine the statistics of every rank
            s.check_ready(g.names[0])
            check.verify(g)
            try:
                layers = _quantize_group(model, g, s, cfg)
            except torch.OutOfMemoryError as e:
                k = k_of[g.names[0]]
                n = sum(model.get_submodule(name).out_features for name in g.names)
                # fp32 weight, smoothed weight, residual and one quantization temporary
                raise explain_oom(
                    e, f"quantizing {g.names[0]} ({n} x {k})", 16 * n * k, str(s.amax.device)
                ) from e
            if partial is not None:
                partial.save(index[g.names[0]], layers)
            new.update(layers)
            bar.update()
    bar.close()
    for name, layer in new.items():
        _set(model, name, layer)
    model._svdquant_config = cfg.to_dict()  # saved beside the checkpoint (informational)
    return model
