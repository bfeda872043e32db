"""What zeroing the low-rank sums costs the activation quantize, on the GPU.

Where the quantize splits K across programs (most shapes), each adds its partial
low-rank sums atomically into ``lora_act``, which must start at zero: ``quantize_act``
allocates it with ``torch.zeros`` — a fill kernel before the quantize in every layer. This
times, replayed from a CUDA graph at the small models' shapes (M tokens, K columns, rank
32), the quantize as the engine runs it against the same kernel writing into buffers
zeroed once outside the graph (``out=``: its sums are wrong after the first replay, its
time is not), and the fill alone. If the fill's share is large, a quantize that needs no
zeroed output (the last program of each row block summing the partials) is worth its
complexity.

    PYTHONPATH=src:bench python bench/probe_quantize_memset.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

#: (M, K): SDXL's 32² and 64² levels, PixArt-Σ's and SANA's widths, FLUX's
SHAPES = ((1024, 1280), (4096, 640), (4096, 1152), (1024, 2240), (4608, 3072))


def probe(m: int, k: int) -> dict:
    from gemm import bench_graph

    from svdquant.kernels.quantize import quantize_act

    g = torch.Generator(device="cuda").manual_seed(m + k)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    smooth = torch.rand(k, device="cuda", generator=g) + 0.5
    down = (torch.randn(32, k, device="cuda", generator=g) / k**0.5).bfloat16()
    scale = torch.ones(1, device="cuda")
    xq, lora = quantize_act(x, smooth, down, scale, k, "int4")
    lora.zero_()
    return {
        "M": m,
        "K": k,
        "engine_us": bench_graph(lambda: quantize_act(x, smooth, down, scale, k, "int4")),
        "preset_us": bench_graph(
            lambda: quantize_act(x, smooth, down, scale, k, "int4", out=(xq, lora))
        ),
        "fill_us": bench_graph(lambda: torch.zeros(m, 32, device="cuda")),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_quantize_memset: needs a CUDA GPU")
    from gemm import run_info, write_result

    rows = [probe(m, k) for m, k in SHAPES]
    print("| M | K | quantize as run µs | into zeroed buffers µs | fill alone µs |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['M']} | {r['K']} | {r['engine_us']:.1f} | {r['preset_us']:.1f} | "
              f"{r['fill_us']:.1f} |")  # fmt: skip
    result = {**run_info(), "rows": rows}
    print("->", write_result(result, args.out, "probe_quantize_memset"))
    return result


if __name__ == "__main__":
    main()
