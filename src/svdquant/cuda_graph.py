"""Replay a denoiser's forward from CUDA graphs: the speed of ``torch.compile`` without
its compilation.

Our quantized layers launch their Triton kernels from Python, so an eager FLUX.1-dev step
at batch 1 is bound by the host (H200: 195 ms against 140 ms replayed from a CUDA graph,
``bench/NOTES.md`` v32). ``torch.compile(mode="reduce-overhead")`` removes that cost but
compiles for minutes per resolution; ``cuda_graphed(module)`` captures the module's
forward as it is, in about two steps' time::

    pipe.transformer = svdquant.cuda_graphed(pipe.transformer)
    image = pipe(prompt).images[0]      # the pipeline calls it as before

Each input signature (tensor shapes, dtypes and devices; every other argument's value)
gets its own graph: the first call runs eagerly (the GEMM picks its tiles), the second
captures, later ones copy the inputs into the graph's buffers and replay. What the graph
reads besides its inputs — weights, LoRA factors, activation scales — is read at the
addresses it had at capture: ``svdquant.load_lora`` and its siblings drop the graphs when
given the pipeline or the wrapper; after other changes that are not in place, call
``reset()``. Changes in place are read by the next replay, and where the graph replays a
copy the engine keeps (a wide-rank layer's folded L_down, a kept fp8 weight:
``kernels.kept``), a change to its source makes the next call run eagerly and the graph
be captured again.
Calls the graph cannot serve run eagerly: on the CPU, with a CPU tensor among the inputs,
with gradients enabled (pipelines run under ``torch.no_grad()``), while another capture
is running, past ``max_graphs`` signatures, or after a capture failed (with one warning
that says why). Moving or casting the wrapper drops its graphs (a move that leaves every
tensor where it was keeps them). Save the inner module, not the wrapper.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from typing import Any

import torch
from torch import nn

from svdquant.kernels import kept

__all__ = ["CUDAGraphed", "cuda_graphed"]


#: Signatures remembered as seen once: arguments that differ on every call (a Python
#: float timestep) never reach a capture, and must not grow the set without bound.
_MAX_SEEN = 64


class _Uncapturable(Exception):
    """A call whose inputs a graph cannot take (a CPU tensor, an unhashable argument)."""


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # the static buffers, in the order ``_flatten`` gives
    output: Any
    sources: list  # what the engine's kept copies it replays were made from (``kernels.kept``)


def _flatten(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value``'s hashable description, its tensors appended to ``tensors``."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cuda":
            raise _Uncapturable(f"a {value.device.type} tensor among the inputs")
        tensors.append(value)
        return ("T", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_flatten(v, tensors) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _flatten(v, tensors)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError as e:
        raise _Uncapturable(f"an argument of type {type(value).__name__}") from e
    return ("V", type(value).__name__, value)


def _map_tensors(value: Any, fn: Any) -> Any:
    """``value`` with each tensor ``t`` in it replaced by ``fn(t)``, in ``_flatten``'s
    order, every container rebuilt as its own type (named tuples and dataclasses too:
    diffusers' outputs)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = dataclasses.fields(value)
        return type(value)(**{f.name: _map_tensors(getattr(value, f.name), fn) for f in fields})
    if isinstance(value, dict):
        return type(value)((k, _map_tensors(v, fn)) for k, v in value.items())
    return value


def _clone(value: Any) -> Any:
    """A copy of a graph's output that the next replay does not overwrite."""
    return _map_tensors(value, torch.Tensor.clone)


class CUDAGraphed(nn.Module):
    """``module`` whose forward is replayed from CUDA graphs; see the module docstring.

    Attributes the wrapper does not have are looked up on ``module`` (a pipeline reads
    its denoiser's ``config``, ``dtype``, ``cache_context``, ...).
    """

    def __init__(self, module: nn.Module, max_graphs: int = 4) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"cuda_graphed wraps a torch.nn.Module, got {type(module).__name__}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be a positive int, got {max_graphs!r}")
        super().__init__()
        self.module = module
        self.max_graphs = max_graphs
        self._graphs: dict[Any, _Graph] = {}
        self._seen: set[Any] = set()
        self._pool = None
        self._failed: str | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:
                raise
            return getattr(inner, name)

    def _apply(self, fn: Any, recurse: bool = True) -> CUDAGraphed:
        before = self._addresses()
        out = super()._apply(fn, recurse)
        if self._addresses() != before:  # moved or cast: the graphs read the old tensors
            self.reset()
        return out

    def _addresses(self) -> list[tuple[int, torch.dtype, torch.device]]:
        """Where the module's tensors are: a move that changes nothing (accelerate's CPU
        offload moves the model to its device before every call) keeps the graphs."""
        tensors = itertools.chain(self.module.parameters(), self.module.buffers())
        return [(t.data_ptr(), t.dtype, t.device) for t in tensors]

    def reset(self) -> None:
        """Drop every graph (and its memory): the next calls capture again."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None
        self._failed = None

    @property
    def num_graphs(self) -> int:
        """How many input signatures have a captured graph."""
        return len(self._graphs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._failed is not None or torch.is_grad_enabled():
            return self.module(*args, **kwargs)
        tensors: list[torch.Tensor] = []
        try:
            key = _flatten((args, kwargs), tensors)
        except _Uncapturable:
            return self.module(*args, **kwargs)
        if not tensors or torch.cuda.is_current_stream_capturing():
            return self.module(*args, **kwargs)
        entry = self._graphs.get(key)
        if entry is not None and not kept.unchanged(entry.sources):
            self.reset()  # a kept copy it replays is stale: captured again from the next call
            self._seen.add(key)
            return self.module(*args, **kwargs)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return self.module(*args, **kwargs)
            if key not in self._seen:  # a signature's first call runs eagerly
                if len(self._seen) >= _MAX_SEEN:  # arguments that change on every call
                    self._seen.clear()
                self._seen.add(key)
                return self.module(*args, **kwargs)
            with torch.cuda.device(tensors[0].device):
                entry = self._capture(key, args, kwargs, tensors)
            if entry is None:
                return self.module(*args, **kwargs)
        for buf, t in zip(entry.inputs, tensors, strict=True):
            if buf.data_ptr() != t.data_ptr():
                buf.copy_(t)
        entry.graph.replay()
        return _clone(entry.output)

    def _capture(self, key: Any, args: Any, kwargs: Any, tensors: list[torch.Tensor]):
        """Capture the forward on static copies of the inputs; None (and eager from then
        on, with a warning) if the forward cannot be captured."""
        statics = [t.clone() for t in tensors]
        it = iter(statics)
        s_args, s_kwargs = _map_tensors((args, kwargs), lambda _t: next(it))
        graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # a warm-up on a side stream, as capture asks
                self.module(*s_args, **s_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            with kept.recording() as sources, torch.cuda.graph(graph, pool=self._pool):
                output = self.module(*s_args, **s_kwargs)
        except Exception as e:  # a host sync, a CPU op, an allocation the capture refuses
            self._failed = f"{type(e).__name__}: {e}"
            _end_failed_capture()
            warnings.warn(
                f"svdquant.cuda_graphed: {type(self.module).__name__}'s forward could not be "
                f"captured in a CUDA graph ({self._failed.splitlines()[0][:300]}); it runs "
                "eagerly from now on",
                stacklevel=3,
            )
            return None
        if self._pool is None:
            self._pool = graph.pool()
        entry = _Graph(graph, statics, output, sources)
        self._graphs[key] = entry
        return entry


def _end_failed_capture() -> None:
    """Leave the current device's random number generator as an aborted capture should.

    A capture that fails (a host sync inside it) ends without PyTorch closing the default
    CUDA generator's capture state, and every later random op on the device (the
    pipeline's noise, a test's ``torch.randn``) then fails with "Offset increment outside
    graph capture encountered unexpectedly" (seen with torch 2.11). One trivial capture
    opens and closes that state again."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the CUDA graph is empty": it is meant to be
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                pass
    except Exception:  # the device is unusable anyway; the caller runs eagerly and says why
        pass


def cuda_graphed(module: nn.Module, max_graphs: int = 4) -> CUDAGraphed:
    """``module`` with its forward replayed from CUDA graphs (one per input signature, at
    most ``max_graphs``); already wrapped modules are returned as they are."""
    if isinstance(module, CUDAGraphed):
        return module
    return CUDAGraphed(module, max_graphs)
