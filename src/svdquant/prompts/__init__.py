"""Calibration prompts: a varied set shipped with the package (``calibration.txt``,
written for svdquant: people, animals, places, food, objects, styles, text in images),
and loading a user's own text file of prompts (one per line)."""

from __future__ import annotations

import os
import random
from importlib import resources
from pathlib import Path

__all__ = ["load_prompts", "parse_prompts"]


def parse_prompts(text: str) -> list[str]:
    """Prompts from ``text``: one per line; blank lines and ``#`` comments are skipped."""
    return [s.strip() for s in text.splitlines() if s.strip() and not s.lstrip().startswith("#")]


def load_prompts(
    path: str | os.PathLike[str] | None = None, n: int | None = None, *, seed: int = 0
) -> list[str]:
    """Load calibration prompts.

    Args:
        path: a text file with one prompt per line; ``None``: the shipped set.
        n: how many to return; ``None`` for all. A subset is a seeded random sample
            (the same ``seed`` gives the same prompts), so it stays varied.
    """
    if path is None:
        text = resources.files(__name__).joinpath("calibration.txt").read_text("utf-8")
        where = "the shipped calibration set"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"prompt file not found: {p}")
        text = p.read_text("utf-8")
        where = str(p)
    prompts = parse_prompts(text)
    if not prompts:
        raise ValueError(f"no prompts in {where} (one prompt per line)")
    if n is not None:
        if n <= 0:
            raise ValueError(f"the number of prompts must be positive, got {n}")
        if n < len(prompts):
            prompts = random.Random(seed).sample(prompts, n)
    return prompts
