"""Launch a Triton (or Gluon) kernel again without redoing what its first launch decided.

``kernel[grid](*args, **kwargs)`` goes through ``JITFunction.run`` on every call: it binds
the arguments to the signature, specializes each one, hashes the result into a cache key,
checks the kernel's globals, reads Triton's settings and builds launch metadata — host
time an eager layer call pays three to four times (``bench/probe_launch.py``). ``launch``
does the first call of each argument signature that way and keeps the compiled kernel;
later calls with the same signature go straight to its launcher.

The signature is at least as fine as Triton's own specialization, so a kept kernel is the
one ``run`` would pick: the keyword arguments (constexprs, launch options) by name and
value, positional integers by value (Triton specializes integers on 1, on divisibility by
16 and on their width), positional tensors by dtype and the 16-byte alignment of their
address (what Triton specializes pointers on), a tensor descriptor by its dtype, block
shape, layout and padding, floats by type, anything else by value. A call with a tensor
among its keyword arguments, an unhashable argument, a callable grid, a launch hook set
in Triton's settings (a profiler's), under the interpreter or with a triton other than
the one it was checked against (``SUPPORTED``: 3.6) takes Triton's own path every time.
``BOUND`` turns the shortcut off (a probe's A/B). While ``RECORDER`` is set (``replay``
records a layer call), every launch is also reported to it.
"""

from __future__ import annotations

import torch
import triton
from triton.runtime import driver

try:  # (triton >= 3.4)
    from triton import knobs
except ImportError:  # pragma: no cover - depends on the installed triton
    knobs = None

from svdquant.kernels._triton_common import interpreting

__all__ = ["kept_launcher", "launch"]

#: Launch kept kernels directly (False: every call through ``JITFunction.run``).
BOUND = True
#: Whether the installed triton launches as this module expects: the compiled kernel's
#: launcher called with every parameter in order, constexprs included, and hook chains in
#: ``triton.knobs`` — checked against 3.6 (the GPU suite, v60). Other versions (3.2's
#: launcher takes the non-constexpr arguments only) keep Triton's path.
SUPPORTED = triton.__version__.startswith("3.6.") and knobs is not None
#: Signatures kept per kernel; past it the kernel's are dropped and kept again as they come
#: (a new token count is a new signature: integers are keyed by value).
MAX_SIGNATURES = 256
#: The recorder of a layer call (``replay``), told of every launch; None when none records.
RECORDER = None


class _Unkeyable(Exception):
    """An argument ``launch`` cannot key exactly: Triton's own path takes the call."""


def _spec(value):
    """The key of a positional argument that is no plain int, tensor or float."""
    if isinstance(value, torch.Tensor):  # a subclass (a Parameter)
        return (value.dtype, value.data_ptr() & 15 == 0)
    base = getattr(value, "base", None)
    if isinstance(base, torch.Tensor) and hasattr(value, "block_shape"):  # a descriptor
        layout = getattr(value, "layout", None)
        return (type(value), base.dtype, base.data_ptr() & 15 == 0,
                tuple(value.block_shape), layout, getattr(value, "padding", None))  # fmt: skip
    try:
        hash(value)
    except TypeError as e:
        raise _Unkeyable(type(value).__name__) from e
    return (type(value), value)  # bool, None, a string, a triton dtype


def _key(device: int, args: tuple, kwargs: dict) -> tuple:
    """A launch's signature (see the module docstring). Flat: a bare dtype only ever comes
    from a tensor and is followed by its alignment; every other kind is a bare int, the
    type ``float`` or a tuple, so two signatures never read alike."""
    key = [device, tuple(kwargs), tuple(kwargs.values())]
    append = key.append
    tensor = torch.Tensor
    for v in args:
        t = type(v)
        if t is int:
            append(v)
        elif t is tensor:
            append(v.dtype)
            append(v.data_ptr() & 15 == 0)
        elif t is float:
            append(float)
        else:
            append(_spec(v))
    return tuple(key)


class _Kernel:
    """One kernel's kept launches: its parameters' names and defaults, and per signature
    how to launch it."""

    def __init__(self, fn) -> None:
        params = fn.signature.parameters
        self.names = list(params)
        self.defaults = {n: p.default for n, p in params.items()}
        self.kept: dict[tuple, tuple] = {}


_KERNELS: dict[int, _Kernel] = {}


def _kernel(fn) -> _Kernel:
    entry = _KERNELS.get(id(fn))
    if entry is None:
        entry = _KERNELS[id(fn)] = _Kernel(fn)
    return entry


def _launcher(compiled):
    """How to launch ``compiled`` (what ``run`` returned) directly: ``(call, middle)`` with
    ``call(gx, gy, gz, stream, function, *middle, *args)``, or None where it is not Triton
    3.6's ``CompiledKernel`` (another version simply keeps ``run``'s path). Without scratch
    memory the launcher's own C entry point, else its Python wrapper that allocates it."""
    if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
        return None
    runner, meta = compiled.run, compiled.packed_metadata
    direct = getattr(runner, "launch", None)
    scratch = (
        getattr(runner, "global_scratch_size", 1),
        getattr(runner, "profile_scratch_size", 1),
    )
    if direct is not None and scratch == (0, 0) and hasattr(runner, "launch_pdl"):
        coop = runner.launch_cooperative_grid
        return direct, (coop, runner.launch_pdl, None, None, meta, None, None, None)
    return runner, (meta, None, None, None)


def _stream(device: int) -> int:
    """The current CUDA stream's handle on ``device``, as ``run`` reads it."""
    return driver.active.get_current_stream(device)


def hooked() -> bool:
    """Whether a launch hook is set (a profiler's): then every launch goes through ``run``,
    which calls it. Triton 3.6 keeps them as (empty) hook chains."""
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def launch(fn, grid, *args, **kwargs) -> None:
    """``fn[grid](*args, **kwargs)``; after a signature's first call, without
    ``JITFunction.run`` (see the module docstring)."""
    if RECORDER is not None:  # (what the kernel's own run does is not the call's)
        RECORDER.note_launch(fn, grid, args, kwargs)
        with RECORDER.paused():
            _launch(fn, grid, args, kwargs)
    else:
        _launch(fn, grid, args, kwargs)


def _launch(fn, grid, args: tuple, kwargs: dict) -> None:
    if not (BOUND and SUPPORTED) or interpreting() or type(grid) is not tuple or hooked():
        fn[grid](*args, **kwargs)
        return
    entry = _kernel(fn)
    device = torch.cuda.current_device()
    try:
        key = _key(device, args, kwargs)
        kept = entry.kept.get(key)
    except (_Unkeyable, TypeError):  # (TypeError: an unhashable keyword argument)
        fn[grid](*args, **kwargs)
        return
    if kept is None:
        compiled = fn[grid](*args, **kwargs)
        how = _launcher(compiled)
        if how is not None and not any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            if len(entry.kept) >= MAX_SIGNATURES:
                entry.kept.clear()
            # the parameters after the positional ones: keyed by value, the same every call
            tail = tuple(kwargs.get(n, entry.defaults[n]) for n in entry.names[len(args) :])
            entry.kept[key] = (compiled.function, *how, tail)
        return
    function, call, middle, tail = kept
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    call(grid[0], g1, g2, _stream(device), function, *middle, *args, *tail)


def untracked() -> None:
    """Tell the recorder (if any) that a kernel ran without ``launch`` (an autotuning run):
    the recorded call cannot be replayed."""
    if RECORDER is not None:
        RECORDER.note_untracked()


def kept_launcher(fn, grid, args: tuple, kwargs: dict):
    """``fn[grid](*args, **kwargs)``'s kept launcher — made by an earlier ``launch`` of that
    signature — as ``go(args)`` launching the kernel on ``args`` (of the same signature) on
    the current stream; None where ``launch`` keeps none (then launch through it)."""
    if not (BOUND and SUPPORTED) or interpreting() or type(grid) is not tuple:
        return None
    device = torch.cuda.current_device()
    try:
        kept = _kernel(fn).kept.get(_key(device, args, kwargs))
    except (_Unkeyable, TypeError):
        return None
    if kept is None:
        return None
    function, call, middle, tail = kept
    g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
    get_stream = driver.active.get_current_stream

    def go(args: list) -> None:
        call(*g, get_stream(device), function, *middle, *args, *tail)

    return go
