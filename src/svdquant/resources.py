"""GPU memory: fail early, and with advice, when a model does not fit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["InsufficientMemoryError", "fits_one_at_a_time", "module_bytes", "to_device"]

GiB = 2**30


class InsufficientMemoryError(RuntimeError):
    """The device does not have room; the message says how much was needed and what to do."""


def _modules(obj: Any) -> list[nn.Module]:
    if isinstance(obj, nn.Module):
        return [obj]
    comps = getattr(obj, "components", None) or {}
    return [m for m in comps.values() if isinstance(m, nn.Module)]


def module_bytes(obj: Any) -> int:
    """Bytes of the parameters and buffers of a module or of a pipeline's modules."""
    seen: set[int] = set()
    total = 0
    for m in _modules(obj):
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen and t.device.type != "meta":
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _advice(needed: int, device: str) -> str:
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return (
        f"needs {needed / GiB:.1f} GiB on {device}, which has {free / GiB:.1f} GiB free of "
        f"{total / GiB:.1f} GiB. Use CPU offload (`--cpu-offload`, i.e. "
        "pipe.enable_model_cpu_offload()), a smaller batch or resolution, or a quantized model"
    )


def to_device(obj: Any, device: str | torch.device, what: str = "the model") -> Any:
    """``obj.to(device)``; on a CUDA device that lacks room, an ``InsufficientMemoryError``
    that says how much was needed instead of an out-of-memory traceback halfway."""
    device = str(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        needed = module_bytes(obj)
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if needed > free:
            raise InsufficientMemoryError(f"{what} {_advice(needed, device)}")
        try:
            return obj.to(device)
        except torch.OutOfMemoryError as e:
            raise InsufficientMemoryError(f"{what} {_advice(needed, device)}") from e
    return obj.to(device)


def fits_one_at_a_time(pipe: Any, device: str | torch.device) -> tuple[bool, int, int]:
    """Whether the largest model of ``pipe`` fits the free memory of CUDA ``device`` (what
    model CPU offload needs), with the bytes of the whole pipeline and of that model."""
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    largest = max((module_bytes(m) for m in _modules(pipe)), default=0)
    return largest <= free, module_bytes(pipe), largest


def explain_oom(e: torch.OutOfMemoryError, what: str, needed: int, device: str) -> Exception:
    """An ``InsufficientMemoryError`` for an out-of-memory error raised while doing ``what``."""
    return InsufficientMemoryError(f"{what} {_advice(needed, device)} ({e})".strip())
