"""Architecture adapters: which layers of each supported diffusers model are quantized.

``get_adapter(model_or_class_name)`` returns the ``ModelAdapter`` of a model;
``ADAPTERS`` maps the diffusers class name to it.
"""

from __future__ import annotations

from torch import nn

from svdquant.models.base import ModelAdapter, PointwiseConv, QuantGroup
from svdquant.models.flux import FLUX
from svdquant.models.pixart import PIXART
from svdquant.models.sana import SANA
from svdquant.models.sdxl import SDXL

__all__ = [
    "ADAPTERS",
    "ModelAdapter",
    "PointwiseConv",
    "QuantGroup",
    "UnsupportedModelError",
    "get_adapter",
    "supported",
]

#: diffusers class name -> adapter
ADAPTERS: dict[str, ModelAdapter] = {a.class_name: a for a in (FLUX, PIXART, SDXL, SANA)}


class UnsupportedModelError(ValueError):
    """A model (or checkpoint) of an architecture svdquant has no adapter for."""


def supported() -> str:
    """The supported architectures, as one line for error messages."""
    return ", ".join(f"{a.class_name} ({a.description})" for a in ADAPTERS.values())


def get_adapter(model: nn.Module | str) -> ModelAdapter:
    """The adapter of ``model`` (a module, or its class name / adapter name)."""
    name = model if isinstance(model, str) else type(model).__name__
    for a in ADAPTERS.values():
        if name in (a.class_name, a.name):
            return a
    raise UnsupportedModelError(
        f"unsupported architecture {name!r}; svdquant supports: {supported()}"
    )
