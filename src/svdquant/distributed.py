"""Data parallelism through ``torch.distributed``, launched with ``torchrun``.

Calibration and evaluation shard their prompts across ranks; the per-layer statistics are
all-reduced (``ActivationStats.all_reduce``), so every rank computes the same quantized
model, and rank 0 alone writes files. Outside ``torchrun`` everything here is a no-op
and the code runs as one process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = ["barrier", "init_from_env", "is_main", "rank", "shard", "world_size"]

T = TypeVar("T")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    """True on the one rank that writes files and prints results."""
    return rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (every ``world_size``-th item, from ``rank``)."""
    return list(items[rank() :: world_size()])


def init_from_env(device: str | None = None) -> str | None:
    """Join the process group if launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Picks NCCL when the ranks use CUDA (one GPU per rank, ``LOCAL_RANK``) and gloo on the
    CPU. Returns the device this rank should use (``device`` unchanged without torchrun).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _active():
        return device
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return device
