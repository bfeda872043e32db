"""Saving and loading quantized models: one safetensors file whose header carries the
svdquant config (format version, the quantized layers, a CRC32 per tensor).

A checkpoint is ``<dir>/svdquant.safetensors`` (or any ``*.safetensors`` path). Writes
are atomic: a temporary file in the same folder, renamed over the old one only when
complete, so an interrupted save leaves the previous checkpoint intact. Loading checks
everything it can and names the file and the tensor in every error.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from svdquant.nn import SVDQLinear

__all__ = ["FORMAT_VERSION", "CheckpointError", "load_quantized", "save_quantized"]

FORMAT_VERSION = 1
FILENAME = "svdquant.safetensors"
_META_KEY = "svdquant"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupt, truncated, or for another model."""


def _file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p if p.suffix == ".safetensors" else p / FILENAME


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().view(-1).view(torch.uint8).numpy())


def save_quantized(module: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Save a quantized module (an ``SVDQLinear`` or a model containing them).

    ``path`` is a directory (created if needed; the file is ``svdquant.safetensors``) or a
    ``.safetensors`` file. Every tensor of ``module.state_dict()`` is saved: the 4-bit
    layers' buffers and whatever stayed 16-bit. Returns the file written.
    """
    from svdquant.fuse import is_fused

    file = _file(path)
    if is_fused(module):
        raise ValueError(
            "the model's projections are fused (svdquant.fuse_projections), a runtime form "
            "that checkpoints do not hold: call svdquant.unfuse_projections(model) first"
        )
    layers = {n: m.config() for n, m in module.named_modules() if isinstance(m, SVDQLinear)}
    if not layers:
        raise ValueError("the module holds no SVDQLinear layer: quantize it first")
    tensors: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict().items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device: it holds no data to save")
        tensors[name] = t.detach().to("cpu").contiguous().clone()
    meta = {
        "format_version": FORMAT_VERSION,
        "root": "SVDQLinear" if isinstance(module, SVDQLinear) else type(module).__name__,
        "layers": layers,
        "crc32": {name: _crc(t) for name, t in tensors.items()},
    }
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file


def _read_header(file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tensor table and svdquant config of ``file``, checked against its size."""
    if not file.is_file():
        raise FileNotFoundError(f"no svdquant checkpoint at {file}")
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{file}: truncated or corrupt header (says {n} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt header ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    if _META_KEY not in meta:
        raise CheckpointError(f"{file}: not an svdquant checkpoint (no svdquant config in it)")
    try:
        config = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: corrupt svdquant config ({e})") from None
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: checkpoint format version {version!r} is newer than this svdquant "
            f"supports ({FORMAT_VERSION}); upgrade svdquant"
        )
    data_len = size - 8 - n
    for name, info in header.items():
        end = info.get("data_offsets", [0, 0])[1]
        if end > data_len:
            raise CheckpointError(
                f"{file}: truncated: tensor {name!r} ends at byte {end} of the data, "
                f"but the file holds only {data_len}"
            )
    return header, config


def _swap_in_shells(model: nn.Module, layers: dict[str, dict[str, Any]], file: Path) -> None:
    for name, cfg in layers.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
        except AttributeError:
            raise CheckpointError(
                f"{file}: quantized layer {name!r} does not exist in the given "
                f"{type(model).__name__}: the checkpoint is for another model"
            ) from None
        if not isinstance(old, (nn.Linear, SVDQLinear)) or (
            old.in_features,
            old.out_features,
        ) != (cfg["in_features"], cfg["out_features"]):
            raise CheckpointError(
                f"{file}: quantized layer {name!r} is [{cfg['out_features']}, "
                f"{cfg['in_features']}] but the model's {name!r} is {old!r}: the checkpoint "
                "is for another model"
            )
        device = old.wscales.device if isinstance(old, SVDQLinear) else old.weight.device
        setattr(parent, child, SVDQLinear.from_config(cfg, device=device))


def load_quantized(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a checkpoint written by ``save_quantized``.

    Without ``model`` the checkpoint must hold a single ``SVDQLinear``, which is returned.
    With ``model`` (the same architecture, built e.g. on the meta device so its 16-bit
    weights never exist), its quantized ``nn.Linear`` layers are replaced by
    ``SVDQLinear`` shells and every tensor is filled from the file; the model is returned.
    Tensors are read one at a time onto ``device``.

    Raises ``FileNotFoundError`` for a missing file and ``CheckpointError`` (a
    ``ValueError``) naming the file and tensor for anything corrupt, truncated, missing,
    unexpected or of the wrong shape or dtype.
    """
    file = _file(path)
    header, config = _read_header(file)
    layers = config.get("layers") or {}
    if model is None:
        if config.get("root") != "SVDQLinear" or "" not in layers:
            raise CheckpointError(
                f"{file}: holds a quantized {config.get('root')}: pass `model=` (the same "
                "architecture, e.g. built on the meta device) to load it into"
            )
        model = SVDQLinear.from_config(layers[""], device="meta")
    else:
        _swap_in_shells(model, layers, file)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing:
        raise CheckpointError(f"{file}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
    if extra:
        raise CheckpointError(
            f"{file}: unexpected tensor {extra[0]!r} ({len(extra)} not in the model): the "
            "checkpoint is for another model"
        )
    crcs = config.get("crc32", {})
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(file, framework="pt") as f:
        for name, want in expected.items():
            try:
                t = f.get_tensor(name)
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from None
            if t.shape != want.shape or t.dtype != want.dtype:
                raise CheckpointError(
                    f"{file}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, the model "
                    f"expects {want.dtype} {tuple(want.shape)}"
                )
            if name in crcs and _crc(t) != crcs[name]:
                raise CheckpointError(f"{file}: tensor {name!r} is corrupt (checksum mismatch)")
            tensors[name] = t.to(device)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model
