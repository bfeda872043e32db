"""FLUX's q/k preparation: diffusers' passes against the norm + rotary kernel, on the GPU.

    PYTHONPATH=src python bench/probe_rope.py [--tiles 64x4,32x4,...] \
        [--set rope.PACKED=False ...] [--out DIR]

Per attention, q and k are normalized per head (``torch.nn.RMSNorm``), the text stream's
heads concatenated first and the pairs rotated (``apply_rotary_emb``): diffusers runs that
as separate PyTorch ops, ``kernels.rms_norm_rope`` as one pass per tensor. Both are
replayed from a CUDA graph (no launch overhead) at FLUX.1's 1024² sizes — a double block
(512 text + 4096 image tokens) and a single block (4608 tokens, q/k views of the fused
projection's output) — and at 512² (512 + 1024), 24 heads of 128, bf16; outputs compared.
``--tiles`` also times the kernel at each (head rows per program, warps) of the form
that runs (``rope.PACKED_TILE``, or ``rope.TILE`` with ``--set rope.PACKED=False``);
``--set module.NAME=VALUE`` (as in ``probe_layer.py``) times it once more with those
constants set (e.g. ``rope.PACKED=False``: the split kernel), its output compared with
the default's. Writes ``probe_rope-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemm import bench_graph, run_info, write_result
from probe_layer import constants, merge_sets, parse_set

from svdquant import kernels
from svdquant.kernels import rope

CASES = (("double 1024²", 512, 4096), ("single 1024²", 0, 4608), ("double 512²", 512, 1024))


def diffusers_way(qk, text, norms, rot):
    """diffusers' passes: ``RMSNorm`` per tensor, ``cat`` of the text heads, rotation."""
    from diffusers.models.embeddings import apply_rotary_emb

    out = []
    for x, t, norm, norm_text in zip(qk, text, norms[:2], norms[2:], strict=True):
        y = norm(x) if t is None else torch.cat([norm_text(t), norm(x)], dim=1)
        out.append(apply_rotary_emb(y, rot, sequence_dim=1))
    return out


def ours(qk, text, norms, rot):
    """``kernels.rms_norm_rope``: one pass per tensor."""
    return [
        kernels.rms_norm_rope(x, norm.weight, norm.eps, *rot, t, None if t is None else nt.weight)
        for x, t, norm, nt in zip(qk, text, norms[:2], norms[2:], strict=True)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", default="", help="e.g. 64x4,32x4,128x8: rows x warps")
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="MOD.NAME=VALUE")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    tiles = [tuple(int(v) for v in t.split("x")) for t in a.tiles.split(",") if t]
    sets = merge_sets([parse_set(v) for v in a.sets])
    packed = next((v for m, n, v in sets if m is rope and n == "PACKED"), rope.PACKED)
    tile_name = "PACKED_TILE" if packed else "TILE"
    default = getattr(rope, tile_name)
    h, d, dt = 24, 128, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    norms = [torch.nn.RMSNorm(d, eps=1e-6).cuda().to(dt) for _ in range(4)]
    for n in norms:
        n.weight.data.uniform_(0.5, 1.5, generator=g)
    rows = []
    print(f"{'case':>13} | diffusers us | ours us | x")
    for name, s_head, s in CASES:
        width = 3 * h * d if s_head == 0 else h * d  # single blocks: views of q/k/v
        qk = [torch.randn(1, s, width, device="cuda", generator=g, dtype=dt)[..., : h * d]
              .unflatten(-1, (h, d)) for _ in range(2)]  # fmt: skip
        text = [torch.randn(1, s_head, h, d, device="cuda", generator=g, dtype=dt)
                if s_head else None for _ in range(2)]  # fmt: skip
        angle = torch.rand(s_head + s, d // 2, device="cuda", generator=g) * 6
        rot = (angle.cos().repeat_interleave(2, 1), angle.sin().repeat_interleave(2, 1))
        args = (qk, text, norms, rot)
        want, got = diffusers_way(*args), ours(*args)
        diff = max((x.float() - y.float()).abs().max().item()
                   for x, y in zip(got, want, strict=True))  # fmt: skip
        base = bench_graph(lambda a=args: diffusers_way(*a))
        fused = bench_graph(lambda a=args: ours(*a))
        per_tile = {}
        for tile in tiles:
            with constants([*sets, (rope, tile_name, tile)]):
                per_tile["x".join(map(str, tile))] = bench_graph(lambda a=args: ours(*a))
        extra = {}
        if sets:
            with constants(sets):
                same = all(torch.equal(x, y) for x, y in zip(ours(*args), got, strict=True))
                extra = {"set": a.sets, "set_us": bench_graph(lambda a=args: ours(*a)),
                         "set_equal": same}  # fmt: skip
        rows.append({"case": name, "text_tokens": s_head, "tokens": s, "heads": h,
                     "head_dim": d, "diffusers_us": base, "ours_us": fused,
                     "x": base / fused, "max_abs_diff": diff, "tile": [tile_name, *default],
                     "tiles_us": per_tile, **extra})  # fmt: skip
        print(f"{name:>13} | {base:12.1f} | {fused:7.1f} | {base / fused:.2f}  "
              f"(max |diff| {diff:.1e})"
              + "".join(f"  {t}: {us:.1f}" for t, us in per_tile.items())
              + (f"  set: {extra['set_us']:.1f} (equal: {extra['set_equal']})"
                 if extra else ""))  # fmt: skip
    print("->", write_result({**run_info(), "rows": rows}, a.out, "probe_rope"))


if __name__ == "__main__":
    main()
