"""Values derived from a layer's buffers, kept on the buffer itself.

A layer's static scales (the activation scale S from ``act_amax``, the widen's row scales
from ``wscales``) are recomputed on every call unless kept somewhere. They are kept on the
source tensor as an attribute, keyed by its version counter: an in-place update
(``load_state_dict``) or a new tensor (``.to()``, assignment) computes them again. While
a CUDA graph is being captured nothing new is kept (a tensor made during capture holds
its value only when the graph replays); an inference-mode tensor has no version counter,
so nothing is kept for it.
"""

from __future__ import annotations

from typing import Any

import torch


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor
        return None


def cached(t: torch.Tensor, attr: str, key: Any = None) -> torch.Tensor | None:
    """The value kept on ``t`` under ``attr`` for ``key`` and ``t``'s current version."""
    kept = getattr(t, attr, None)
    version = _version(t)
    if kept is None or version is None or kept[0] != (version, key):
        return None
    return kept[1]


def can_keep(t: torch.Tensor) -> bool:
    """Whether a value computed now for ``t`` may be kept on it (``keep``)."""
    capturing = t.is_cuda and torch.cuda.is_current_stream_capturing()
    return not capturing and _version(t) is not None


def keep(t: torch.Tensor, attr: str, value: torch.Tensor, key: Any = None) -> None:
    """Keep ``value`` on ``t`` for ``key`` and ``t``'s current version, where allowed."""
    if can_keep(t):
        setattr(t, attr, ((_version(t), key), value))
