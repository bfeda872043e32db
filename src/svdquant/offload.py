"""Fast model-level CPU offload: keep a model's weights in page-locked host memory.

``pipe.enable_model_cpu_offload()`` (accelerate's hook) moves each model to the GPU
before it runs and back after the next one starts: on a GPU too small for the whole
pipeline, every image pays both moves. Both are slow for what they do: the way in copies
from pageable memory, and the way out allocates fresh host memory and copies every weight
back — although inference changed none of them. On the H200 (``bench/offload.py``, v38)
a quantized FLUX.1-dev transformer (6.6 GB) under that hook took ~9 s an image against
~3 s kept on the GPU, at the same 94 ms a step.

``keep_host_copy(module)`` changes only how ``module`` moves between the CPU and a
device: the first move in page-locks its weights' host memory (the copy engines read it
directly; large weights are registered in place with ``cudaHostRegister``, small ones
copied into pinned memory), each move out gives every tensor that was not changed on the device
its pinned host copy back instead of copying it (a tensor changed in place, replaced or
added while there — a LoRA loaded, a strength set — is copied, as before)::

    svdquant.keep_host_copy(pipe.transformer)
    pipe.transformer = svdquant.cuda_graphed(pipe.transformer)
    pipe.enable_model_cpu_offload()

The cost: the host keeps the weights (pinned) while they are on the GPU too. Casts, and
moves from one device to another, run as usual and drop the host copies; weights moved
in under ``torch.inference_mode`` keep no version counter, so they are copied out as
before (diffusers' pipelines run under ``torch.no_grad``, which keeps it). The module
stays the same object (its ``_apply`` is extended), so a pipeline sees no difference.
On the H200 (v40, ``bench/offload.py --text-encoder``: the denoiser and a T5-XXL-sized
encoder, both kept): the first image 5.3 s against 12.7 without it, each later one 3.6 s
against 12.1 (v39, pinning by copies: the first image 18.6 s — ``bench/probe_pin.py``:
8.6 GB registered in place in 0.6 s, copied into pinned memory in 7.5 s).
``svdquant generate --cpu-offload`` and ``svdquant eval`` use it for every model of
their pipelines under offload on a GPU.
"""

from __future__ import annotations

import contextlib
import types
import warnings
import weakref
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = ["keep_host_copy"]

_STATE = "_svdq_host_copies"
_MIN_REGISTER = 1 << 20  # bytes: smaller weights are copied into pinned memory (cheap)


class _Kept(NamedTuple):
    host: torch.Tensor  # the pinned host tensor
    dev: torch.Tensor  # the tensor (or parameter) the module holds on the device
    ptr: int  # its data pointer and version right after the move in: changed since?
    version: int | None


def keep_host_copy(module: nn.Module, enabled: bool = True) -> nn.Module:
    """``module`` (the same object), moving in from and out to pinned host copies of its
    weights; see the module docstring. ``enabled=False`` undoes it (the host copies are
    released: the module moves as any other)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"keep_host_copy takes a torch.nn.Module, got {type(module).__name__}")
    if enabled:
        if _STATE not in module.__dict__:
            object.__setattr__(module, _STATE, {})
            object.__setattr__(module, "_apply", types.MethodType(_apply, module))
    else:
        module.__dict__.pop(_STATE, None)
        module.__dict__.pop("_apply", None)
    return module


def _slots(module: nn.Module) -> list[tuple[dict[str, Any], str, torch.Tensor]]:
    """Every parameter and buffer of ``module`` as (its owner's dict, name, tensor)."""
    out = []
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            out += [(table, name, t) for name, t in table.items() if t is not None]
    return out


def _target(fn: Any) -> torch.device | None:
    """The device ``fn`` (what ``nn.Module._apply`` applies to each tensor) moves tensors
    to, or None where it does more than move them (a cast, a layout change) or cannot
    tell."""
    try:
        probes = [torch.empty(1, 2, 3, 4, dtype=d) for d in (torch.float16, torch.bfloat16)]
        outs = [fn(p) for p in probes]
    except Exception:
        return None
    for p, o in zip(probes, outs, strict=True):
        if not isinstance(o, torch.Tensor) or (o.dtype, o.shape) != (p.dtype, p.shape):
            return None
        if o.stride() != p.stride():
            return None
    return outs[0].device


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor keeps no version: treat as changed
        return None


def _page_locked(t: torch.Tensor) -> torch.Tensor:
    """``t`` in page-locked host memory: its own memory registered in place where it is
    large (v40 on the H200: 0.6 s for 8.6 GB against 7.5 s for pinned copies, the copies to
    the GPU equally fast), else a pinned copy; ``t`` itself where it cannot be pinned."""
    if t.is_pinned() or not torch.cuda.is_available():
        return t
    storage = t.untyped_storage()
    if storage.nbytes() >= _MIN_REGISTER and _register(storage):
        return t
    try:
        return t.pin_memory()
    except RuntimeError as e:  # out of page-locked memory: pageable still works
        warnings.warn(f"keep_host_copy: cannot pin a weight ({e}); it stays pageable", stacklevel=3)
        return t


def _register(storage: torch.UntypedStorage) -> bool:
    """Page-lock ``storage``'s memory in place until the storage is freed; False (and no
    CUDA error left behind) where the driver refuses, e.g. memory it cannot lock."""
    ptr = storage.data_ptr()
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(ptr, storage.nbytes(), 0)) != 0:
        _clear_cuda_error()
        return False
    done = weakref.finalize(storage, _unregister, ptr)
    done.atexit = False  # the process's exit releases it anyway
    return True


def _unregister(ptr: int) -> None:
    if int(torch.cuda.cudart().cudaHostUnregister(ptr)) != 0:
        _clear_cuda_error()


def _clear_cuda_error() -> None:
    """Consume the error a refused CUDA runtime call leaves as the thread's last error, which
    PyTorch's next kernel launch would otherwise report as its own failure. PyTorch's
    ``cudart`` binding has no ``cudaGetLastError``; its launch check reads (and clears) it."""
    with contextlib.suppress(RuntimeError):
        torch.empty(1, device="cuda").zero_()


def _apply(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    kept: dict[int, _Kept] = self.__dict__[_STATE]
    cls_apply = type(self)._apply
    target = _target(fn) if recurse else None
    if target is None:  # a cast (or a partial apply): the host copies would be stale
        kept.clear()
        return cls_apply(self, fn, recurse)
    slots = _slots(self)
    devices = {t.device for _, _, t in slots}
    if devices <= {target}:  # nothing moves
        return cls_apply(self, fn, recurse)
    if target.type == "cpu":
        if not kept:
            return cls_apply(self, fn, recurse)

        def out(t: torch.Tensor) -> torch.Tensor:
            k = kept.get(id(t))
            same = k is not None and k.dev is t and t.data_ptr() == k.ptr
            if same and k.version is not None and _version(t) == k.version:
                return k.host  # unchanged on the device: its host copy, no copy
            return fn(t)

        try:
            return cls_apply(self, out, recurse)
        finally:
            kept.clear()
    kept.clear()
    if devices != {torch.device("cpu")}:  # from another device: as usual
        return cls_apply(self, fn, recurse)
    hosts = {}
    for table, name, t in slots:  # pin once: later moves start from the pinned copies
        data = t.data if isinstance(t, nn.Parameter) else t
        pinned = _page_locked(data)
        if pinned is not data:
            if isinstance(t, nn.Parameter):
                t.data = pinned
            else:
                table[name] = pinned
        hosts[(id(table), name)] = pinned
    result = cls_apply(self, fn, recurse)
    for table, name, t in _slots(self):
        host = hosts.get((id(table), name))
        if host is not None and t.device == target:
            kept[id(t)] = _Kept(host, t, t.data_ptr(), _version(t))
    return result
