"""The norm that writes the next layer's quantized input, against the norm then the quantize.

    PYTHONPATH=src:bench python bench/probe_norm_quantize.py [--tiles 16x128x4,32x128x8]
                                                             [--out DIR]

At PixArt-Σ's, SANA's and FLUX's block sizes (1024², batch 1 and 2; rank 32, int4
activations) it times, replayed from a CUDA graph, ``layer_norm_modulate`` followed by
``quantize_act`` (two kernels and the quantize's zeroing fill, as the fused blocks run
them with ``modulate.NORM_QUANTIZE`` off) against ``norm_modulate_quantize`` (one kernel)
at each ``(rows per program, columns per step, warps)`` of ``--tiles``, and counts the
codes that differ between the two ways (the mean and variance are summed in another
order: a code now and then, where the rounding is close). Writes
``probe_norm_quantize-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

#: (model, tokens per image, channels)
CASES = (("PixArt-Σ", 4096, 1152), ("SANA", 1024, 2240), ("FLUX.1 double", 4096, 3072))


def parse_tiles(spec: str) -> list[tuple[int, int, int]]:
    """``"16x128x4,32x128x8"`` -> [(16, 128, 4), (32, 128, 8)]."""
    tiles = []
    for part in spec.split(","):
        try:
            m, k, w = (int(v) for v in part.lower().split("x"))
        except ValueError as e:
            raise SystemExit(f"--tiles wants ROWSxCOLSxWARPS,..., got {part!r}") from e
        tiles.append((m, k, w))
    return tiles


def probe(name: str, s: int, c: int, batch: int, tiles: list[tuple[int, int, int]]) -> dict:
    from gemm import bench_graph

    from svdquant.kernels import norm_quantize
    from svdquant.kernels.modulate import layer_norm_modulate
    from svdquant.kernels.quantize import quantize_act

    g = torch.Generator(device="cuda").manual_seed(s + c + batch)
    x = torch.randn(batch, s, c, device="cuda", generator=g).bfloat16()
    scale = (torch.randn(batch, c, device="cuda", generator=g) * 0.1).bfloat16()
    shift = (torch.randn(batch, c, device="cuda", generator=g) * 0.1).bfloat16()
    smooth = torch.rand(c, device="cuda", generator=g) + 0.5
    down = (torch.randn(32, c, device="cuda", generator=g) / c**0.5).bfloat16()
    act = torch.full((1,), 0.05, device="cuda")
    k_out = -(-c // 64) * 64

    def apart():
        y = layer_norm_modulate(x, scale, shift, 1e-6)
        return quantize_act(y.view(-1, c), smooth, down, act, k_out, "int4")

    ref_q, _ = apart()
    row = {"model": name, "batch": batch, "M": batch * s, "C": c, "apart_us": bench_graph(apart)}
    old = norm_quantize.TILE
    try:
        for tile in tiles:
            norm_quantize.TILE = tile
            fused = lambda: norm_quantize.norm_modulate_quantize(  # noqa: E731
                x, scale, shift, 1e-6, smooth, down, act, k_out, "int4"
            )
            q, _ = fused()
            key = "x".join(map(str, tile))
            row[f"fused_{key}_us"] = bench_graph(fused)
            row[f"fused_{key}_code_mismatch"] = (q.float() != ref_q.float()).float().mean().item()
    finally:
        norm_quantize.TILE = old
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", default="16x128x4", type=parse_tiles)
    p.add_argument("--batches", default="1,2")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_norm_quantize: needs a CUDA GPU")
    from gemm import run_info, write_result

    batches = [int(b) for b in args.batches.split(",")]
    rows = [probe(n, s, c, b, args.tiles) for n, s, c in CASES for b in batches]
    keys = ["x".join(map(str, t)) for t in args.tiles]
    print("| model | batch | M | C | norm + quantize µs | "
          + " | ".join(f"one kernel {k} µs (codes differing)" for k in keys) + " |")  # fmt: skip
    print("|---|---|---|---|---|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{r[f'fused_{k}_us']:.1f} ({r[f'fused_{k}_code_mismatch']:.1e})" for k in keys]
        print(f"| {r['model']} | {r['batch']} | {r['M']} | {r['C']} | {r['apart_us']:.1f} | "
              + " | ".join(cells) + " |")  # fmt: skip
    result = {**run_info(), "tiles": keys, "rows": rows}
    print("->", write_result(result, args.out, "probe_norm_quantize"))
    return result


if __name__ == "__main__":
    main()
