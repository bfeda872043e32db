"""Resumable model quantization: each quantized group of layers is written to a partial
directory as soon as it is done, so an interrupted run (a crash, a preempted job, Ctrl-C
on a long GPTQ run) starts again where it stopped instead of from scratch.

``<dir>/manifest.json`` names the model class, the quantization config and the groups;
``<dir>/group-NNNN.safetensors`` holds one finished group (written atomically). A
directory made for another model or config is refused, never silently mixed in.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from svdquant import distributed
from svdquant.nn import SVDQLinear

__all__ = ["PartialQuantization"]

logger = logging.getLogger(__name__)
_VERSION = 1


class PartialQuantization:
    """The finished groups of one quantization run, kept in ``path``."""

    def __init__(self, path: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = {"version": _VERSION, **manifest}
        file = self.path / "manifest.json"
        if file.is_file():
            try:
                old = json.loads(file.read_text())
            except json.JSONDecodeError:
                old = None
            if old != json.loads(json.dumps(self.manifest)):
                raise ValueError(
                    f"{self.path} holds a partial quantization of another model or config; "
                    "delete it to start over, or resume with the same model and options"
                )
        elif distributed.is_main():
            self.path.mkdir(parents=True, exist_ok=True)
            _atomic_write(file, lambda tmp: Path(tmp).write_text(json.dumps(self.manifest)))
        distributed.barrier()

    def _file(self, index: int) -> Path:
        return self.path / f"group-{index:04d}.safetensors"

    def load(self, index: int, device: torch.device | str) -> dict[str, SVDQLinear] | None:
        """The layers of group ``index`` if that group was finished, else ``None``."""
        file = self._file(index)
        if not file.is_file():
            return None
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                configs = json.loads(f.metadata()["layers"])
                layers = {}
                for name, cfg in configs.items():
                    layer = SVDQLinear.from_config(cfg["config"], device="meta")
                    state = {k: f.get_tensor(f"{name}/{k}") for k in layer.state_dict()}
                    layer.load_state_dict(state, assign=True)
                    layer.alpha = cfg["alpha"]
                    layers[name] = layer
        except Exception as e:
            logger.warning("svdquant: %s is unreadable (%s); quantizing that group again", file, e)
            return None
        return layers

    def save(self, index: int, layers: dict[str, SVDQLinear]) -> None:
        """Record group ``index`` as finished (rank 0 writes; atomic)."""
        if not distributed.is_main():
            return
        tensors = {
            f"{name}/{k}": t.detach().to("cpu").contiguous()
            for name, layer in layers.items()
            for k, t in layer.state_dict().items()
        }
        meta = {n: {"config": m.config(), "alpha": m.alpha} for n, m in layers.items()}
        _atomic_write(
            self._file(index),
            lambda tmp: save_file(tensors, tmp, metadata={"layers": json.dumps(meta)}),
        )


def _atomic_write(file: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
