"""Replay an eager layer call: the same kernels launched again without the host work that
chose them.

An eager call of a quantized layer on the fp8 engine spends most of its host time deciding
what to launch — its input checks, the quantize's plan and K split, the GEMM's tile, the
kernels' argument lists and launch signatures (``bench/probe_launch.py``: ~275 µs a layer
on the H200, three kernel launches of ~8 µs each among them). For one input signature
(shapes, strides, dtype, alignment) and one layer state (the same tensors, unchanged in
place) those decisions come out the same every call. So a layer records its call — every
allocation and every kernel launch — and once two calls in a row recorded alike, later
calls of that signature allocate the same buffers and launch the same kernels on the new
input's and buffers' addresses, each through its compiled launcher (``launch``).

A recording is accepted only where the call did nothing else: allocations (``empty``,
``zeros``, a zero fill of a whole fresh buffer before its first use), views, and kernels
launched through ``launch.launch``, whose tensor arguments are the inputs, fresh buffers
(or views of them) or tensors that outlive the call — the same addresses in both
recordings (a layer's weights, the engine's caches). A cuBLAS product (a wide-rank LoRA's
route), a copy, a conversion, an autotuning run or a host synchronization leave the call
on its own path, every time. What it returns must be fresh buffers or views of them.

For one layer call it is what a CUDA graph is for a whole step (``svdquant.cuda_graphed``),
without capturing: new buffers every call, the current stream, nothing fixed but the
layer's own tensors. ``ENABLED = False`` turns it off (a probe's A/B); ``clear()`` forgets
every recording — done by itself whenever a constant (an upper-case name) of a svdquant
module is set, as a probe's ``--set`` or a test's ``monkeypatch`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ENABLED", "call", "clear", "forget", "forget_state"]

#: Replay eager layer calls (False: every call on its own path).
ENABLED = True
#: Input signatures a layer keeps replays of; past it they are dropped and recorded anew.
MAX_PLANS = 16
#: Bumped by ``clear()``: every layer's replays made before it are dropped on its next call.
GENERATION = 0

_ATTR = "_svdquant_replay"
#: ``kernels.launch`` and ``kernels.ops``, imported at the first call (this module
#: imports without triton)
launch_mod: Any = None
ops_mod: Any = None
_aten = torch.ops.aten
#: allocations, and whether they come zeroed
_FACTORIES = {
    _aten.empty.memory_format: False,
    _aten.empty_strided.default: False,
    _aten.new_empty.default: False,
    _aten.new_empty_strided.default: False,
    _aten.empty_like.default: False,
    _aten.zeros.default: True,
    _aten.new_zeros.default: True,
    _aten.zeros_like.default: True,
}
_FILLS = {_aten.zero_.default, _aten.fill_.Scalar}
_VIEWS = {
    _aten.view.default,
    _aten.view.dtype,
    _aten.slice.Tensor,
    _aten.select.int,
    _aten.t.default,
    _aten.transpose.int,
    _aten.permute.default,
    _aten.unsqueeze.default,
    _aten.squeeze.dim,
    _aten.squeeze.dims,
    _aten.expand.default,
    _aten.as_strided.default,
    _aten.alias.default,
    _aten.detach.default,
    _aten.split.Tensor,
    _aten.split_with_sizes.default,
    _aten.unbind.int,
}


def clear() -> None:
    """Forget every layer's recordings and replays (at its next call): after a change to
    the engine's module constants, which decide what a call launches."""
    global GENERATION
    GENERATION += 1


class _Watched(types.ModuleType):
    """A svdquant module whose constants decide what a call launches: setting one (an
    upper-case name) drops every replay (``clear``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name.isupper() and name != "RECORDER":  # (``launch.RECORDER``: set by a recording)
            clear()


_WATCHED_AT = 0


def _watch() -> None:
    """Watch svdquant's modules imported since the last look (``_Watched``)."""
    global _WATCHED_AT
    if len(sys.modules) == _WATCHED_AT:
        return
    _WATCHED_AT = len(sys.modules)
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "svdquant" and type(module) is types.ModuleType:
            module.__class__ = _Watched


def forget(owner: Any) -> None:
    """Forget ``owner``'s recordings and replays (a layer moved, its tensors replaced)."""
    forget_state(owner.__dict__)


def forget_state(state: dict) -> None:
    """``forget`` on an owner's ``__dict__`` (or a copy of it being pickled)."""
    state.pop(_ATTR, None)


class _Untracked(Exception):
    """Something in the recorded call that a replay would not redo."""


class _Recorder(TorchDispatchMode):
    """Sees every tensor operation of a recorded call (allocations noted, views let
    through, anything else spoils the recording) and, through ``launch.RECORDER``, every
    kernel launch."""

    def __init__(self) -> None:
        super().__init__()
        self.allocs: list[list] = []  # [tensor, zeroed, launches before its zero fill]
        self.launches: list[tuple] = []
        self.ok = True
        self.depth = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within: operations not the call's own (a kernel's run in Triton's interpreter)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.depth:
            pass
        elif func in _FACTORIES:
            self.allocs.append([out, _FACTORIES[func], 0])
        elif func in _FILLS:
            self._filled(args)
        elif func not in _VIEWS:
            self.ok = False
        return out

    def _filled(self, args) -> None:
        """A zero fill of a whole fresh buffer: it comes zeroed; any other fill spoils."""
        t, value = args[0], args[1] if len(args) > 1 else 0
        for entry in self.allocs if value == 0 else ():
            a = entry[0]
            if a.data_ptr() == t.data_ptr() and a.shape == t.shape and a.stride() == t.stride():
                entry[1], entry[2] = True, len(self.launches)
                return
        self.ok = False

    def note_launch(self, fn, grid, args: tuple, kwargs: dict) -> None:
        self.launches.append((fn, grid, args, kwargs))

    def note_untracked(self) -> None:
        self.ok = False


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recording:
    """One recorded call, its tensors classified — ``("alloc", i, view)`` (the i-th fresh
    buffer, ``view`` None or its (offset, shape, stride, dtype)), ``("input", j, view)``
    (``view`` None or (shape, stride, offset from the input's)),
    ``("const", t)`` (outlives the call), ``("desc", d, inner)`` (a tensor descriptor of
    such a tensor), ``("value", v)`` — and ``key``, what two recordings must share."""

    def __init__(self, rec: _Recorder, inputs: Sequence[torch.Tensor], outputs: Any) -> None:
        self.inputs = list(inputs)
        self.allocs = rec.allocs
        self.storages: dict[int, int] = {}
        for i, (t, _, _) in enumerate(rec.allocs):
            if _storage(t):
                self.storages.setdefault(_storage(t), i)
        self.first_use: dict[int, int] = {}
        self.launches = rec.launches
        self.steps = []
        key: list = []
        for n, (fn, grid, args, kwargs) in enumerate(rec.launches):
            cargs = [self._classify(v, n) for v in args]
            ckw = {k: self._classify(v, n) for k, v in kwargs.items()}
            self.steps.append((fn, grid, [c[0] for c in cargs], {k: c[0] for k, c in ckw.items()}))
            key.append((id(fn), grid, tuple(c[1] for c in cargs),
                        tuple((k, c[1]) for k, c in ckw.items())))  # fmt: skip
        self.outputs = self._classify_out(outputs)
        for i, n in self.first_use.items():
            if self.allocs[i][1] and self.allocs[i][2] > n:
                raise _Untracked("a buffer zero-filled after a launch used it")
        key.append(tuple((tuple(a.shape), a.stride(), a.dtype, z) for a, z, _ in self.allocs))
        key.append(self.outputs)
        self.key = tuple(key)

    def _tensor(self, t: torch.Tensor, n: int) -> tuple:
        """A tensor argument's recipe (launch ``n``'s, or an output's for -1)."""
        sp = _storage(t)
        i = self.storages.get(sp) if sp else None
        if i is not None:
            if n >= 0:
                self.first_use.setdefault(i, n)
            whole = self.allocs[i][0]
            geo = (t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            same = geo == (whole.storage_offset(), tuple(whole.shape), whole.stride(), whole.dtype)
            return ("alloc", i, None if same else geo)
        for j, x in enumerate(self.inputs):  # an input, or a view of it from its first element
            if t.numel() and t.data_ptr() == x.data_ptr() and t.dtype == x.dtype:
                same = t.shape == x.shape and t.stride() == x.stride()
                return ("input", j, None if same else (tuple(t.shape), t.stride(), 0))
        for j, x in enumerate(self.inputs):  # another view of an input's memory
            if sp and sp == _storage(x):
                if t.dtype != x.dtype:
                    raise _Untracked("an input's memory read as another dtype")
                offset = t.storage_offset() - x.storage_offset()
                return ("input", j, (tuple(t.shape), t.stride(), offset))
        return ("const", t)

    @staticmethod
    def _tensor_key(recipe: tuple, t: torch.Tensor) -> tuple:
        if recipe[0] == "const":
            return ("const", t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        return (*recipe, t.dtype)

    def _classify(self, v: Any, n: int) -> tuple:
        """``(recipe, key)`` of a launch argument."""
        if isinstance(v, torch.Tensor):
            r = self._tensor(v, n)
            return r, self._tensor_key(r, v)
        base = getattr(v, "base", None)
        if isinstance(base, torch.Tensor) and dataclasses.is_dataclass(v):  # a descriptor
            r = self._tensor(base, n)
            rest = (type(v), tuple(v.shape), tuple(v.strides), tuple(v.block_shape))
            return ("desc", v, r), (*rest, self._tensor_key(r, base))
        try:
            hash(v)
        except TypeError as e:
            raise _Untracked(f"an argument of type {type(v).__name__}") from e
        return ("value", v), (type(v), v)

    def _classify_out(self, out: Any) -> tuple:
        if isinstance(out, torch.Tensor):
            r = self._tensor(out, -1)
            if r[0] != "alloc":
                raise _Untracked("an output that is no fresh buffer")
            geo = (out.storage_offset(), tuple(out.shape), out.stride(), out.dtype)
            return ("alloc", r[1], geo)
        if isinstance(out, (tuple, list)):
            return (type(out), tuple(self._classify_out(o) for o in out))
        raise _Untracked(f"an output of type {type(out).__name__}")


def _static(recipe: tuple) -> bool:
    """Whether an argument is the same object every replay."""
    return recipe[0] in ("value", "const") or (recipe[0] == "desc" and _static(recipe[2]))


class _Plan:
    """A recorded call ready to replay: its buffers, its launches' argument templates and
    the slots the new input and buffers fill."""

    def __init__(self, rec: _Recording) -> None:
        used = sorted(set(rec.first_use) | set(_out_allocs(rec.outputs)))
        self.slot = {i: s for s, i in enumerate(used)}
        self.allocs = [
            (tuple(a.shape), a.stride(), a.dtype, a.device, z)
            for a, z, _ in (rec.allocs[i] for i in used)
        ]
        self.steps = []
        for step, launched in zip(rec.steps, rec.launches, strict=True):
            (fn, grid, cargs, ckw), (_, _, raw, raw_kw) = step, launched
            args = [self._fixed(c) for c in cargs]
            fixes = [(p, self._fix(c)) for p, c in enumerate(cargs) if not _static(c)]
            kwargs = {k: self._fixed(c) for k, c in ckw.items()}
            kfixes = [(k, self._fix(c)) for k, c in ckw.items() if not _static(c)]
            direct = None if kfixes else launch_mod.kept_launcher(fn, grid, raw, raw_kw)
            self.steps.append((fn, grid, args, fixes, kwargs, kfixes, direct))
        self.outputs = self._fix_out(rec.outputs)

    @staticmethod
    def _fixed(recipe: tuple):
        return recipe[1] if _static(recipe) else None

    def _fix(self, recipe: tuple) -> tuple:
        if recipe[0] == "desc":
            return ("desc", recipe[1], self._fix(recipe[2]))
        if recipe[0] == "alloc":
            return ("alloc", self.slot[recipe[1]], recipe[2])
        return recipe  # ("input", j, view)

    def _fix_out(self, recipe: tuple) -> tuple:
        if recipe[0] == "alloc":
            return ("alloc", self.slot[recipe[1]], recipe[2])
        return (recipe[0], tuple(self._fix_out(r) for r in recipe[1]))

    def run(self, inputs: Sequence[torch.Tensor]):
        bufs = [
            torch.zeros(shape, dtype=dtype, device=device) if zero
            else torch.empty_strided(shape, stride, dtype=dtype, device=device)
            for shape, stride, dtype, device, zero in self.allocs
        ]  # fmt: skip
        hooked = launch_mod.hooked()
        for fn, grid, args, fixes, kwargs, kfixes, direct in self.steps:
            if fixes:
                args = list(args)
                for p, fix in fixes:
                    args[p] = _resolve(fix, bufs, inputs)
            if kfixes:
                kwargs = dict(kwargs)
                for k, fix in kfixes:
                    kwargs[k] = _resolve(fix, bufs, inputs)
            if direct is not None and not hooked:
                direct(args)
            else:
                launch_mod.launch(fn, grid, *args, **kwargs)
        return _build(self.outputs, bufs)


def _out_allocs(recipe: tuple):
    if recipe[0] == "alloc":
        yield recipe[1]
    else:
        for r in recipe[1]:
            yield from _out_allocs(r)


def _view(t: torch.Tensor, geo: tuple) -> torch.Tensor:
    """The view ``geo`` = (storage offset, shape, stride, dtype) of a fresh buffer ``t``."""
    offset, shape, stride, dtype = geo
    if dtype != t.dtype:
        t = t.view(dtype)
    if offset == 0 and t.shape == shape and t.stride() == stride:
        return t
    return t.as_strided(shape, stride, offset)


def _resolve(fix: tuple, bufs: list, inputs: Sequence[torch.Tensor]):
    kind = fix[0]
    if kind == "alloc":
        t, geo = bufs[fix[1]], fix[2]
        return t if geo is None else _view(t, geo)
    if kind == "input":
        t, view = inputs[fix[1]], fix[2]
        return t if view is None else t.as_strided(view[0], view[1], t.storage_offset() + view[2])
    return dataclasses.replace(fix[1], base=_resolve(fix[2], bufs, inputs))  # a descriptor


def _build(recipe: tuple, bufs: list):
    if recipe[0] == "alloc":
        return _view(bufs[recipe[1]], recipe[2])
    return recipe[0](_build(r, bufs) for r in recipe[1])


def _record(fn: Callable, inputs: Sequence[torch.Tensor]) -> tuple[Any, _Recording | None]:
    """``fn(*inputs)`` recorded: ``(its result, the recording or None)``."""
    rec = _Recorder()
    launch_mod.RECORDER = rec
    try:
        with rec:
            out = fn(*inputs)
    finally:
        launch_mod.RECORDER = None
    if not rec.ok or not rec.launches:
        return out, None
    try:
        return out, _Recording(rec, inputs, out)
    except _Untracked:
        return out, None


def _signature(inputs: Sequence[torch.Tensor], extra: tuple) -> tuple:
    """What a replay of the inputs' side must share with its recordings."""
    x = inputs[0]
    sig: list = [extra, torch.cuda.current_device() if x.is_cuda else -1]
    for t in inputs:
        sig.append((t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15))
    if len(inputs) > 1:  # how the inputs lie to each other (one tensor's two halves?)
        home = _storage(x)
        sig.append(tuple(t.data_ptr() - x.data_ptr() if _storage(t) == home else None
                         for t in inputs[1:]))  # fmt: skip
    return tuple(sig)


def _state(values: Sequence, refs: list) -> tuple:
    """The layer's side of a call: its tensors by identity and in-place version (each
    also weakly into ``refs``), its settings by value."""
    state: list = []
    for v in values:
        if isinstance(v, torch.Tensor):
            state.append((id(v), v._version))
            refs.append(weakref.ref(v))
        elif isinstance(v, (tuple, list)):
            state.append(_state(v, refs))
        else:
            state.append(v)
    return tuple(state)


def usable(inputs: Sequence[torch.Tensor]) -> bool:
    """Whether a call on ``inputs`` may be recorded or replayed: eagerly on plain tensors,
    on the GPU outside a capture (or in the Triton interpreter, for tests), and not inside
    another call's recording."""
    global launch_mod, ops_mod
    if not ENABLED or torch.compiler.is_compiling():  # (before anything dynamo would trace)
        return False
    if launch_mod is None:
        launch_mod = importlib.import_module("svdquant.kernels.launch")
        ops_mod = importlib.import_module("svdquant.kernels.ops")
    _watch()
    if launch_mod.RECORDER is not None:
        return False
    if any(type(t) is not torch.Tensor for t in inputs):
        return False
    if inputs[0].is_cuda:
        return not torch.cuda.is_current_stream_capturing()
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def call(owner: Any, extra: tuple, inputs: Sequence[torch.Tensor], fn: Callable,
         state: Callable[[], Sequence]):  # fmt: skip
    """``fn(*inputs)``, a call of ``owner`` (a layer) — replayed where two earlier calls of
    the same signature recorded alike. ``state()``: the layer's tensors and settings that
    ``fn`` reads (a change drops the layer's recordings); ``extra``: the call's other
    arguments (hashable)."""
    if not usable(inputs):
        return fn(*inputs)
    refs: list = []
    now = (GENERATION, _state(state(), refs))
    held = owner.__dict__.get(_ATTR)
    if held is None or held[0] != now or any(r() is None for r in held[1]):
        # (held weakly: a tensor replaced and freed is no longer kept by this; an id of
        # a freed one, taken by another, shows as a dead reference)
        held = owner.__dict__[_ATTR] = (now, refs, {})
    plans = held[2]
    try:
        sig = _signature(inputs, extra)
        entry = plans.get(sig)
    except TypeError:  # an unhashable argument
        return fn(*inputs)
    if isinstance(entry, _Plan):
        ops_mod._ops(inputs[0])  # (an eager call: counted toward ``ops.EAGER_HINT``)
        return entry.run(inputs)
    out, rec = _record(fn, inputs)
    if rec is None:
        plans.pop(sig, None)
    elif entry == rec.key:  # (the first recording is kept as its key: no buffers held)
        if len(plans) >= MAX_PLANS:
            plans.clear()
        plans[sig] = _Plan(rec)
    else:
        plans[sig] = rec.key
    return out
