"""The decoding GEMM against the widen + GEMM it would replace, at the issue's shapes.

For each M and (N, K) of ``bench/gemm.py`` (int4, rank 32, bias), replayed from CUDA
graphs in one run: cuBLAS BF16 ``F.linear``; the quantize; the widen; our GEMM on the
widened weight; the GEMM decoding the stored weight in its K loop (``PackedWeight``);
and the layer both ways (quantize + widen + GEMM, quantize + decoding GEMM). Checks that
both GEMMs give the same bits and records the tile the autotuner chose. Decides
``ops.DECODE_MAX_M``; for NOTES.md.

    PYTHONPATH=src python bench/probe_decode_gemm.py [--ms 512,1024,2048,4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from gemm import NKS, Layer, bench_graph, run_info, write_result

from svdquant.kernels import gemm as gemm_mod
from svdquant.kernels import reference as ref
from svdquant.kernels.gemm import PackedWeight, fp8_gemm
from svdquant.kernels.quantize import quantize_act
from svdquant.kernels.widen import widen_weight


def probe(m: int, n: int, k: int) -> dict:
    x = torch.randn(m, k, device="cuda").bfloat16()
    layer = Layer(n, k)
    s = ref.act_scale_from_amax(layer.act_amax)
    kp = layer.qweight.shape[1] * 2
    w = (layer.qweight, layer.wscales, layer.wtensor_scale, layer.fmt)
    packed = PackedWeight(*w)
    xq, lora = quantize_act(x, layer.smooth, layer.down, s, kp, "int4")
    wq, s_ch = widen_weight(*w)
    tail = (layer.up, layer.bias, torch.bfloat16)

    def widened():
        return fp8_gemm(xq, wq, s_ch, s, lora, *tail)

    def decoded():
        return fp8_gemm(xq, packed, None, s, lora, *tail)

    def layer_widen():
        xq_, lora_ = quantize_act(x, layer.smooth, layer.down, s, kp, "int4")
        wq_, s_ch_ = widen_weight(*w)
        return fp8_gemm(xq_, wq_, s_ch_, s, lora_, *tail)

    def layer_decode():
        xq_, lora_ = quantize_act(x, layer.smooth, layer.down, s, kp, "int4")
        return fp8_gemm(xq_, packed, None, s, lora_, *tail)

    row: dict = {"M": m, "N": n, "K": k}
    row["same_bits"] = bool(torch.equal(widened(), decoded()))
    row["decode_config"] = str(gemm_mod._fp8_gemm_decode_kernel.best_config)
    row["bf16_us"] = bench_graph(lambda: F.linear(x, layer.w16, layer.bias))
    row["quantize_us"] = bench_graph(
        lambda: quantize_act(x, layer.smooth, layer.down, s, kp, "int4")
    )
    row["widen_us"] = bench_graph(lambda: widen_weight(*w))
    row["gemm_us"] = bench_graph(widened)
    row["decode_gemm_us"] = bench_graph(decoded)
    row["layer_widen_us"] = bench_graph(layer_widen)
    row["layer_decode_us"] = bench_graph(layer_decode)
    for key in ("gemm_us", "decode_gemm_us", "layer_widen_us", "layer_decode_us"):
        row[key.replace("_us", "_x")] = row["bf16_us"] / row[key]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="512,1024,2048,4096")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args()
    result = run_info()
    result["rows"] = []
    print(
        f"{'M':>5} {'N':>6} {'K':>6} | {'bf16':>6} {'quant':>6} {'widen':>6} {'gemm':>6} "
        f"{'decode':>6} | {'layerW':>6} {'layerD':>6} | layW x  layD x  bits  config"
    )
    for m in (int(v) for v in args.ms.split(",")):
        for n, k in NKS:
            r = probe(m, n, k)
            result["rows"].append(r)
            print(
                f"{m:5d} {n:6d} {k:6d} | {r['bf16_us']:6.1f} {r['quantize_us']:6.1f} "
                f"{r['widen_us']:6.1f} {r['gemm_us']:6.1f} {r['decode_gemm_us']:6.1f} | "
                f"{r['layer_widen_us']:6.1f} {r['layer_decode_us']:6.1f} | "
                f"{r['layer_widen_x']:5.2f}  {r['layer_decode_x']:5.2f}  "
                f"{'same' if r['same_bits'] else 'DIFF'}  {r['decode_config']}",
                flush=True,
            )
    print("->", write_result(result, args.out, "probe_decode_gemm"))


if __name__ == "__main__":
    main()
