"""``svdquant eval``: generate with the same prompts and seeds from the 16-bit pipeline and
the quantized one, compare the images, write a side-by-side grid and a table.

Under ``torchrun`` the images are sharded across ranks and gathered on rank 0, which
computes the metrics once and writes the files.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from svdquant import distributed
from svdquant.eval.images import image_metrics

__all__ = ["generate_images", "image_grid", "run_eval", "write_report"]


def generate_images(
    pipe: Any,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    desc: str = "generating",
    **call_kwargs: Any,
) -> torch.Tensor:
    """Image ``i`` of ``prompts`` with the CPU generator seeded ``seed + i`` (so both
    models and every rank layout see the same noise), as [N, 3, H, W] in [0, 1] on the CPU.
    Under ``torchrun`` each rank generates its share and rank 0 receives them all."""
    mine = distributed.shard(range(len(prompts)))
    pipe.set_progress_bar_config(disable=True)
    params = inspect.signature(pipe.__call__).parameters
    if "height" in call_kwargs and "use_resolution_binning" in params:
        call_kwargs.setdefault("use_resolution_binning", False)  # the size asked for
    out: list[tuple[int, torch.Tensor]] = []
    bar = not distributed.is_main()
    for i in tqdm(mine, desc=f"svdquant eval: {desc}", disable=bar):
        gen = torch.Generator("cpu").manual_seed(seed + i)
        img = pipe(prompt=prompts[i], generator=gen, output_type="pt", **call_kwargs).images
        out.append((i, img[0].float().clamp(0, 1).cpu()))
    if distributed.world_size() > 1:
        parts: list[Any] = [None] * distributed.world_size()
        torch.distributed.all_gather_object(parts, out)
        out = [item for part in parts for item in part]
    out.sort(key=lambda t: t[0])
    return torch.stack([img for _, img in out])


def image_grid(ref: torch.Tensor, test: torch.Tensor, max_rows: int = 8) -> Any:
    """A PIL image: one row per prompt, the 16-bit image left, the quantized one right."""
    from PIL import Image

    n = min(len(ref), max_rows)
    h, w = ref.shape[-2:]
    pad = max(2, w // 64)
    grid = torch.ones(3, n * (h + pad) + pad, 2 * w + 3 * pad)
    for i in range(n):
        y = pad + i * (h + pad)
        grid[:, y : y + h, pad : pad + w] = ref[i]
        grid[:, y : y + h, 2 * pad + w : 2 * pad + 2 * w] = test[i]
    arr = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr)


def _fmt(v: float | str) -> str:
    return f"{v:.4f}" if isinstance(v, float) else "–"


def write_report(out_dir: Path, metrics: dict[str, Any], meta: dict[str, Any]) -> None:
    """``metrics.json`` and ``metrics.md`` (a markdown table, skipped metrics explained)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps({**meta, "metrics": metrics}, indent=1))
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    notes = [f"- {k}: {v}" for k, v in metrics.items() if isinstance(v, str)]
    (out_dir / "metrics.md").write_text("\n".join([*lines, "", *notes]) + "\n")


def run_eval(
    load_reference: Callable[[], Any],
    load_quantized: Callable[[], Any],
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    seed: int = 0,
    clip_model: str | None = None,
    meta: dict[str, Any] | None = None,
    **call_kwargs: Any,
) -> dict[str, Any] | None:
    """Generate from both pipelines (one at a time, so only one is in memory), compare.

    Returns the metrics on rank 0 (``None`` on the other ranks) and writes ``grid.png``,
    ``metrics.json`` and ``metrics.md`` into ``out_dir``.
    """
    if not prompts:
        raise ValueError("evaluation needs at least one prompt")
    images = []
    for load, desc in ((load_reference, "16-bit"), (load_quantized, "4-bit")):
        pipe = load()
        images.append(generate_images(pipe, prompts, seed=seed, desc=desc, **call_kwargs))
        del pipe
    if not distributed.is_main():
        distributed.barrier()
        return None
    ref, test = images
    metrics = image_metrics(ref, test, list(prompts), clip_model=clip_model)
    out = Path(out_dir)
    write_report(out, metrics, {"num_images": len(prompts), "seed": seed, **(meta or {})})
    image_grid(ref, test).save(out / "grid.png")
    distributed.barrier()
    return metrics
