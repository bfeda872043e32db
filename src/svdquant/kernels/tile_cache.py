"""The fp8 GEMM's autotuned tiles, kept on disk from one process to the next.

Triton's autotuner times every candidate tile on a shape's first call and keeps its pick
in memory only: a FLUX.1-dev model's first step spent 49 s in it on an H200 (v32, against
1.5 s for BF16's), in every new process. Triton's own disk cache refuses configs with a
pre-hook, which ours have (they set the tensor descriptors' boxes). So the GEMM's
launcher records each pick here, and a later process launches with it untimed.

One JSON file per GEMM source and triton version (a changed kernel tunes afresh), its
entries keyed by the GPU model and the launch key, under ``$SVDQUANT_CACHE_DIR`` (default
``$XDG_CACHE_HOME/svdquant``, else ``~/.cache/svdquant``; set it to an empty string to keep
nothing on disk). Written atomically (a temporary file renamed over it, merged with what
other processes wrote meanwhile); a cache that cannot be read or written costs only the
tuning, with one warning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

__all__ = ["forget", "lookup", "record"]

_entries: dict[str, dict[str, Any]] | None = None  # the file's content, read once
_warned = False


@functools.cache
def _version() -> str:
    """Hash of the GEMM's source and triton's version: the file a pick belongs to."""
    import triton

    src = (Path(__file__).parent / "gemm.py").read_bytes()
    return hashlib.sha256(triton.__version__.encode() + src).hexdigest()[:16]


def path() -> Path | None:
    """The cache file, or None when ``SVDQUANT_CACHE_DIR`` is set empty."""
    root = os.environ.get("SVDQUANT_CACHE_DIR")
    if root == "":
        return None
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "svdquant"
    return Path(root) / f"gemm-tiles-{_version()}.json"


@functools.cache
def _gpu(device_type: str, index: int | None) -> str:
    if device_type != "cuda":
        return device_type
    import torch

    from svdquant.kernels._triton_common import device_properties

    p = device_properties(index if index is not None else torch.cuda.current_device())
    return f"{p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs"


def _key(device: Any, key: tuple) -> str:
    return json.dumps([_gpu(device.type, device.index), *map(str, key)])


def _describe(config: Any) -> dict[str, Any]:
    return {"kwargs": config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _warn(what: str, e: Exception) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"svdquant: could not {what} the GEMM's tile cache ({e}); the GEMM tunes its "
            "tiles in each process (set SVDQUANT_CACHE_DIR to a writable folder)",
            stacklevel=4,
        )


def _read(file: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(file.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # unreadable or corrupt: tune, and overwrite it
        _warn("read", e)
        return {}


def lookup(device: Any, key: tuple, configs: list) -> Any:
    """The config among ``configs`` recorded for ``key`` on ``device``'s GPU model, or
    None."""
    global _entries
    file = path()
    if file is None:
        return None
    if _entries is None:
        _entries = _read(file)
    want = _entries.get(_key(device, key))
    for config in configs:
        if want == _describe(config):
            return config
    return None


def record(device: Any, key: tuple, config: Any) -> None:
    """Keep ``config`` for ``key`` on ``device``'s GPU model, in memory and on disk."""
    global _entries
    file = path()
    if file is None:
        return
    if _entries is None:
        _entries = _read(file)
    _entries[_key(device, key)] = _describe(config)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read(file), **_entries}
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f, indent=0, sort_keys=True)
            os.replace(tmp, file)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        _warn("write", e)


def forget() -> None:
    """Drop the recorded tiles, in memory and on disk."""
    global _entries
    _entries = None
    file = path()
    if file is not None:
        with contextlib.suppress(OSError):  # not there to remove (a path that cannot exist)
            file.unlink(missing_ok=True)
