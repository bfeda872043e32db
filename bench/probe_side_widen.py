"""Can the weight widen hide behind compute-bound work on a second stream?

The per-call widen (4-bit weight -> fp8 GEMM operand, memory-bound) is ~5 ms of a FLUX.1
step (v36 profile) and what `keep_fp8_weights` buys back with 4-8 GB of memory. The
widen depends on no activation, so it could run ahead, on a side stream, beside work that
leaves DRAM idle: attention (cuDNN / flash, compute-bound), the GEMMs, SDXL's convs. This
probe replays from CUDA graphs, for each main work A and a set of widens W (a FLUX double
block's eight weights, or one 3072 x 12288 weight):

* ``main`` A alone, ``side`` W alone, ``seq`` A then W on one stream;
* ``conc`` W forked onto a second stream beside A and joined after (stream priority
  ``lo``: default, ``hi``: -1, higher than the main stream's; graphs keep the priority
  only if instantiated with node priorities, which the two columns show);

and prints how much of W's time the overlap hides: ``(seq - conc) / side``.

    PYTHONPATH=src python bench/probe_side_widen.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gemm import Layer, bench_graph, run_info, write_result

from svdquant.kernels.widen import widen_weight

#: A FLUX.1 double block's weights, (N, K): fused q/k/v of each stream, the two output
#: projections, the two feed-forwards' up and down projections.
DOUBLE_BLOCK = [(9216, 3072)] * 2 + [(3072, 3072)] * 2 + [(12288, 3072)] * 2 + [(3072, 12288)] * 2


def _widens(shapes):
    layers = [Layer(n, k, seed=i) for i, (n, k) in enumerate(shapes)]
    outs = [torch.empty(n, k, dtype=torch.float8_e4m3fn, device="cuda") for n, k in shapes]

    def run():
        for layer, out in zip(layers, outs, strict=True):
            widen_weight(layer.qweight, layer.wscales, layer.wtensor_scale, "int4", out=out)

    return run


def _mains():
    dev = "cuda"
    q1 = torch.randn(1, 24, 4608, 128, device=dev, dtype=torch.bfloat16)
    k1, v1 = torch.randn_like(q1), torch.randn_like(q1)
    q2 = torch.randn(2, 10, 4096, 64, device=dev, dtype=torch.bfloat16)
    k2, v2 = torch.randn_like(q2), torch.randn_like(q2)
    xc = torch.randn(2, 640, 64, 64, device=dev, dtype=torch.bfloat16)
    wc = torch.randn(640, 640, 3, 3, device=dev, dtype=torch.bfloat16) * 0.02
    x = torch.randn(4608, 3072, device=dev, dtype=torch.bfloat16)
    w = torch.randn(12288, 3072, device=dev, dtype=torch.bfloat16) * 0.02
    fp8 = Layer(12288, 3072, seed=99)
    fp8.keep_fp8_weights()
    return {
        "flux_attention": lambda: F.scaled_dot_product_attention(q1, k1, v1),
        "sdxl_attention": lambda: F.scaled_dot_product_attention(q2, k2, v2),
        "sdxl_conv": lambda: F.conv2d(xc, wc, padding=1),
        "bf16_linear": lambda: F.linear(x, w),
        "fp8_layer_kept": lambda: fp8(x, kept=fp8.kept),
    }


def _conc(main, side, stream):
    def run():
        cur = torch.cuda.current_stream()
        stream.wait_stream(cur)
        with torch.cuda.stream(stream):
            side()
        main()
        cur.wait_stream(stream)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    streams = {"lo": torch.cuda.Stream(), "hi": torch.cuda.Stream(priority=-1)}
    sides = {"block": _widens(DOUBLE_BLOCK), "one": _widens([(3072, 12288)])}
    result = {**run_info(), "rows": []}
    print(f"{'main':>15} {'side':>6} | main us | side us |  seq us | conc lo | conc hi | "
          "hidden lo / hi")  # fmt: skip
    for mname, mfn in _mains().items():
        t_main = bench_graph(mfn)
        for sname, sfn in sides.items():
            row = {"main": mname, "side": sname, "main_us": t_main}
            row["side_us"] = bench_graph(sfn)
            row["seq_us"] = bench_graph(lambda m=mfn, s=sfn: (m(), s()))
            for pname, st in streams.items():
                row[f"conc_{pname}_us"] = bench_graph(_conc(mfn, sfn, st))
                row[f"hidden_{pname}"] = (row["seq_us"] - row[f"conc_{pname}_us"]) / row["side_us"]
            result["rows"].append(row)
            print(f"{mname:>15} {sname:>6} | {t_main:7.1f} | {row['side_us']:7.1f} | "
                  f"{row['seq_us']:7.1f} | {row['conc_lo_us']:7.1f} | {row['conc_hi_us']:7.1f} | "
                  f"{row['hidden_lo']:5.2f} / {row['hidden_hi']:5.2f}")  # fmt: skip
    print(write_result(result, a.out, "probe_side_widen-h200"))


if __name__ == "__main__":
    main()
