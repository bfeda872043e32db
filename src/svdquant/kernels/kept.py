"""Copies the engine keeps across calls, and what they were made from.

The engine keeps a few copies derived from a layer's tensors instead of making them in
every call: L_down with the smoothing folded in (``quantize.folded_down``), the widened
fp8 weight (``SVDQLinear.keep_fp8_weights``). Eager calls check that the sources are
unchanged before using such a copy. A CUDA graph cannot: it replays the copy it captured.
So a capture records the sources of every kept copy it used (``recording``), and
``svdquant.cuda_graphed`` checks them before each replay (``unchanged``): a source changed
in place (``load_state_dict``) or replaced means the graph is captured again — the same
numbers as an eager call, never a stale copy.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch

#: What the capture running now used: (a source, weakly; its version).
_RECORDING: list[tuple[weakref.ref, int]] | None = None


@contextlib.contextmanager
def recording() -> Iterator[list[tuple[weakref.ref, int]]]:
    """Collect, into the list it yields, the sources of every kept copy used inside."""
    global _RECORDING
    before, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = before


def used(*sources: torch.Tensor) -> None:
    """A kept copy made from ``sources`` (tensors that outlive the call: a module's
    parameters and buffers) is being used: noted while ``recording``. Tensors without a
    version counter (made under ``torch.inference_mode``) are never kept from, so never
    passed here."""
    if _RECORDING is not None:
        _RECORDING.extend((weakref.ref(t), t._version) for t in sources)


def unchanged(sources: list[tuple[weakref.ref, int]]) -> bool:
    """Whether every recorded source is alive and unchanged since it was recorded."""
    for ref, version in sources:
        t = ref()
        if t is None or t._version != version:
            return False
    return True
