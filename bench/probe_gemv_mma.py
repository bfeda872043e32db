"""The packed-decode tensor-core GEMV against today's W4A16 kernels, on the GPU.

``kernels.gemv.PACKED_MMA`` (off until this probe says otherwise) sends int4 weights at
more than ``FMA_MAX_M`` tokens to ``_w4a16_packed_kernel``: two codes decoded per
instance of a small PTX routine into bf16 ``136 + code`` and multiplied on the tensor
cores against x̂'s bf16 hi/lo planes (bench/NOTES.md, v21–v24: ~4 instructions per code
in its sm_90 SASS, against 4.6 for the FMA kernel at one token and 8.4 for the
tensor-core kernel). Here, at FLUX.1's modulation shape (N = 18432, K = 3072, rank 32,
bias), M = 1, 2, 4, 8, 16, replayed from CUDA graphs: the whole ``w4a16_linear`` as it
runs today and with the packed kernel for every M (``FMA_MAX_M = 0``), each checked
against ``reference.w4a16_linear_ref``; and BF16 ``F.linear`` of the same run.

    PYTHONPATH=src python bench/probe_gemv_mma.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gemm import Layer, bench_graph, run_info, write_result

from svdquant.kernels import gemv as gemv_mod
from svdquant.kernels import reference as ref

N, K = 18432, 3072


def probe(m: int, layer: Layer) -> dict:
    """Today's path and the packed kernel at ``m`` tokens (time, error, ratio to BF16)."""
    x = torch.randn(m, K, device="cuda").bfloat16()
    args = (layer.qweight, layer.wscales, layer.wtensor_scale, layer.smooth, layer.down)
    args += (layer.up, layer.bias, "int4")
    y_ref = ref.w4a16_linear_ref(x, *args)
    row: dict = {"M": m, "today": "fma" if m <= gemv_mod.FMA_MAX_M else "mma"}
    row["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    default_max = gemv_mod.FMA_MAX_M
    for name, packed, fma_max in (("today", False, default_max), ("packed", True, 0)):
        gemv_mod.PACKED_MMA, gemv_mod.FMA_MAX_M = packed, fma_max
        try:
            y = gemv_mod.w4a16_linear(x, *args)
            row[f"{name}_rel_err"] = float((y.float() - y_ref.float()).norm() / y_ref.norm())
            row[f"{name}_us"] = bench_graph(lambda: gemv_mod.w4a16_linear(x, *args))
            row[f"{name}_x"] = row["bf16_us"] / row[f"{name}_us"]
        except Exception as e:  # the PTX or a tile that does not compile
            row[f"{name}_error"] = str(e)[:300]
        finally:
            gemv_mod.PACKED_MMA, gemv_mod.FMA_MAX_M = False, default_max
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    torch.manual_seed(0)
    layer = Layer(N, K)
    rows = []
    for m in (1, 2, 4, 8, 16):
        rows.append(probe(m, layer))
        print(json.dumps({c: round(v, 4) if isinstance(v, float) else v
                          for c, v in rows[-1].items()}), flush=True)  # fmt: skip
    result = {
        **run_info(),
        "tiles": dict(gemv_mod.TILES),
        "rows": rows,
    }
    path = write_result(result, a.out, "probe_gemv_mma")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
