"""FLUX's adaptive norms and gated residuals: diffusers' passes against one-pass kernels.

    PYTHONPATH=src python bench/probe_modulate.py [--tiles 2x8,4x8,...] [--out DIR]

``layer_norm(x) · (1 + scale) + shift`` (``AdaLayerNormZero``/``ZeroSingle``'s modulation,
~115 per FLUX step): PyTorch's three passes (``nn.LayerNorm`` without affine weights, the
product, the sum) against ``kernels.layer_norm_modulate``, replayed from a CUDA graph at
FLUX.1's 1024² sizes (4096 image tokens of a double block, 4608 of a single block, 512
text tokens), 3072 channels, bf16; and ``residual + gate · x`` (each branch joining the
residual stream, ~115 a step: two PyTorch passes) against ``kernels.gate_residual``;
at the double blocks' sizes, the attention output's gated sum and the feed-forward's norm
after it (four passes) against ``kernels.gate_residual_modulate`` and against our two
kernels in turn; outputs compared. ``--tiles`` also times each kernel at each (rows per
program, warps) of ``modulate.TILE``. Writes ``probe_modulate-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemm import bench_graph, run_info, write_result
from probe_layer import constants

from svdquant import kernels
from svdquant.kernels import modulate, reference

CASES = (("double, image", 4096, 6), ("single", 4608, 3), ("double, text", 512, 6))


def _seq(out):
    """An op's outputs as a tuple (one tensor or several)."""
    return out if isinstance(out, tuple) else (out,)


def _two_kernels(residual, gate, x, scale, shift, eps):
    """``gate_residual`` then ``layer_norm_modulate``: what ``gate_residual_modulate``
    does in one pass."""
    h = kernels.gate_residual(residual, gate, x)
    return h, kernels.layer_norm_modulate(h, scale, shift, eps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", default="", help="e.g. 2x8,4x8,1x4: rows x warps")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    tiles = [tuple(int(v) for v in t.split("x")) for t in a.tiles.split(",") if t]
    c, dt = 3072, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(f"{'case':>14} | diffusers us | ours us | x")
    for name, s, chunks in CASES:
        x = torch.randn(1, s, c, device="cuda", generator=g, dtype=dt)
        emb = torch.randn(1, chunks * c, device="cuda", generator=g, dtype=dt)
        norm = (x, emb[:, c : 2 * c], emb[:, :c], 1e-6)
        gated = (torch.randn_like(x), emb[:, 2 * c : 3 * c], x)
        both = (*gated, emb[:, 4 * c : 5 * c], emb[:, 3 * c : 4 * c], 1e-6)
        ops = [("layer_norm_modulate", name, norm), ("gate_residual", "  gate", gated)]
        if chunks == 6:  # a double block: the attention's gated sum, then the MLP's norm
            ops.append(("gate_residual_modulate", "  gate+norm", both))
        for op, label, args in ops:
            theirs = getattr(reference, f"{op}_ref")
            ours = getattr(kernels, op)
            pairs = zip(_seq(ours(*args)), _seq(theirs(*args)), strict=True)
            diff = max((a.float() - b.float()).abs().max().item() for a, b in pairs)
            base = bench_graph(lambda f=theirs, a=args: f(*a))
            fused = bench_graph(lambda f=ours, a=args: f(*a))
            per_tile = {}
            for tile in tiles:
                with constants([(modulate, "TILE", tile)]):
                    key = "x".join(map(str, tile))
                    per_tile[key] = bench_graph(lambda f=ours, a=args: f(*a))
            extra = {}
            if op == "gate_residual_modulate":  # against our two one-pass kernels in turn
                extra["two_kernels_us"] = bench_graph(lambda a=args: _two_kernels(*a))
            rows.append({"op": op, "case": name, "tokens": s, "channels": c,
                         "diffusers_us": base, "ours_us": fused, "x": base / fused,
                         "max_abs_diff": diff, "tile": list(modulate.TILE),
                         "tiles_us": per_tile, **extra})  # fmt: skip
            print(f"{label:>14} | {base:12.1f} | {fused:7.1f} | {base / fused:.2f}  "
                  f"(max |diff| {diff:.1e})"
                  + "".join(f"  {t}: {us:.1f}" for t, us in per_tile.items())
                  + "".join(f"  two kernels: {us:.1f}" for us in extra.values()))  # fmt: skip
    print("->", write_result({**run_info(), "rows": rows}, a.out, "probe_modulate"))


if __name__ == "__main__":
    main()
