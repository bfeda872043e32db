"""A tensor-core W4A16 GEMV with a packed decode: is it faster than today's kernels?

The FMA GEMV is instruction-bound (bench/NOTES.md, v21–v24: 4.6 instructions per 4-bit
code, 28% of DRAM bandwidth). Here the codes become bf16 two at a time — an int4 byte
pair spread with one ``prmt`` and each nibble masked into the mantissa of 128 with one
``lop3`` (``136 + code``, exact in bf16) — and the wgmma does the products against x̂
split into bf16 hi + lo parts (fp32-like accuracy). ``136 · Σ x̂`` per group is taken off
once per step. sm_90 SASS (``bench/sass_report.py``'s compiler, triton 3.6): ~3
instructions per code at 128 rows x 128 columns, 4.1 at 128 x 64 (one group a step, as
here); the same for any M ≤ 16, where the FMA kernel's cost grows with M.

A probe, not a library kernel: int4 weights, no low-rank branch, no bias (the main
product only), x̂'s planes prepared by torch. It checks its output against
``reference.w4a16_linear_ref`` and times it against ``kernels.gemv.gemv`` on the same
prepared inputs (CUDA graphs, the zero fill of its fp32 output included), at FLUX.1's
modulation shape (N = 18432, K = 3072), M = 1, 4, 16. Needs an sm_90 GPU (inline PTX).

    PYTHONPATH=src python bench/probe_gemv_mma.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from gemm import Layer, _commit, bench_graph

from svdquant.kernels import gemv as gemv_mod
from svdquant.kernels import reference as ref

N, K, GROUP, OFFSET = 18432, 3072, 64, 136.0


@triton.jit
def _decode_pair(b):
    """uint8 [.., n] -> (low nibbles, high nibbles) as bf16 ``136 + code``, two bytes per
    instance: xor 0x88 makes each nibble ``code + 8``; ``prmt`` puts byte 1 at bit 16;
    ``lop3`` keeps one nibble per half and ORs in 128's bits (0x4300)."""
    return tl.inline_asm_elementwise(
        """{
        .reg .b32 t, a, c;
        .reg .b16 h;
        xor.b16 h, $2, 0x8888;
        cvt.u32.u16 t, h;
        prmt.b32 a, t, 0, 0x4140;
        shr.b32 c, a, 4;
        lop3.b32 $0, a, 0x000F000F, 0x43004300, 0xea;
        lop3.b32 $1, c, 0x000F000F, 0x43004300, 0xea;
        }""",
        "=r,=r,h",
        [b],
        dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True,
        pack=2,
    )


@triton.jit
def _packed_mma_gemv_kernel(
    xh_ptr,  # bf16 [4, KP/2, 16]: x̂ hi even/odd columns, lo even/odd; tokens padded
    xs_ptr,  # fp32 [KP/64, 16]: 136 · Σ_group (hi + lo)
    q_ptr,  # uint8 [N, KP/2]
    sc_ptr,  # fp16 [N, KP/64]
    ts_ptr,  # fp32 [1]: the tensor scale
    out_ptr,  # fp32 [M, N], zeroed (K split: atomics)
    M,
    N,
    KP,
    k_per_split,
    stride_qn,
    stride_sn,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    HK: tl.constexpr = GROUP // 2  # bytes per row per step: one group
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1)
    j = tl.arange(0, HK)
    t = tl.arange(0, 16)
    plane = (KP // 2) * 16
    q_rows = q_ptr + rows_c[:, None] * stride_qn + j[None, :]
    x_cols = xh_ptr + j[:, None] * 16 + t[None, :]
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, KP), GROUP):
        lo, hi = _decode_pair(tl.load(q_rows + k0 // 2))
        xo = (k0 // 2) * 16
        part = tl.dot(lo, tl.load(x_cols + xo))
        part = tl.dot(hi, tl.load(x_cols + plane + xo), part)
        part = tl.dot(lo, tl.load(x_cols + 2 * plane + xo), part)
        part = tl.dot(hi, tl.load(x_cols + 3 * plane + xo), part)
        sg = tl.load(sc_ptr + rows_c * stride_sn + k0 // GROUP).to(tl.float32)
        xs = tl.load(xs_ptr + (k0 // GROUP) * 16 + t)
        acc += (part - xs[None, :]) * sg[:, None]
    tl.atomic_add(
        out_ptr + t[None, :] * N + rows[:, None],
        acc * tl.load(ts_ptr),
        mask=(rows < N)[:, None] & (t < M)[None, :],
        sem="relaxed",
    )


def prep_planes(x: torch.Tensor, smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂ = x · (1/s) as bf16 hi/lo planes of even/odd columns, and 136 · Σ x̂ per group."""
    m, k = x.shape
    xh = x.float() * (1.0 / smooth.float())
    hi = xh.bfloat16()
    lo = (xh - hi.float()).bfloat16()
    planes = torch.zeros(4, k // 2, 16, dtype=torch.bfloat16, device=x.device)
    for i, part in enumerate((hi[:, 0::2], hi[:, 1::2], lo[:, 0::2], lo[:, 1::2])):
        planes[i, :, :m] = part.t()
    xs = torch.zeros(k // GROUP, 16, device=x.device)
    xs[:, :m] = OFFSET * (hi.float() + lo.float()).reshape(m, k // GROUP, GROUP).sum(-1).t()
    return planes, xs


def packed_gemv(planes, xs, qweight, wscales, wtensor_scale, m, block_n, warps, split):
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    steps = kp // GROUP
    kps = triton.cdiv(steps, split) * GROUP
    out = torch.zeros(m, n, device=qweight.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(kp, kps))
    _packed_mma_gemv_kernel[grid](
        planes, xs, qweight, wscales, wtensor_scale, out, m, n, kp, kps, qweight.stride(0),
        wscales.stride(0), GROUP=GROUP, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return out


def probe(m: int, layer: Layer, w: tuple) -> dict:
    """Today's GEMV kernel and the packed-decode variants at ``m`` tokens."""
    x = torch.randn(m, K, device="cuda").bfloat16()
    none = (layer.down[:0], layer.up[:, :0])
    y_ref = ref.w4a16_linear_ref(x, *w, layer.smooth, *none, None, "int4")
    fma = m <= gemv_mod.FMA_MAX_M
    xh, lora = gemv_mod.prep(x, layer.smooth, none[0], K, "int4", fma=fma)
    q, s, ts, up = gemv_mod._operands(*w, none[1], fma)
    row = {"M": m, "today": "fma" if fma else "mma"}
    row["today_us"] = bench_graph(
        lambda: gemv_mod.gemv(xh, lora, q, s, ts, up, None, "int4", torch.bfloat16)
    )
    planes, xs = prep_planes(x, layer.smooth)
    for block_n, warps, split in ((128, 4, 4), (128, 4, 8), (64, 4, 4), (64, 4, 8)):
        key = f"packed_{block_n}_{warps}_{split}"
        run = lambda b=block_n, wp=warps, sp=split: packed_gemv(  # noqa: E731
            planes, xs, *w, m, b, wp, sp
        )
        try:
            y = run()
            row[key + "_rel_err"] = float((y - y_ref).norm() / y_ref.norm())
            row[key + "_us"] = bench_graph(run)
        except Exception as e:  # a variant that does not compile or fit
            row[key + "_error"] = str(e)[:200]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    torch.manual_seed(0)
    layer = Layer(N, K)
    w = (layer.qweight, layer.wscales, layer.wtensor_scale.float().reshape(1))
    rows = []
    for m in (1, 4, 16):
        rows.append(probe(m, layer, w))
        print(json.dumps({c: round(v, 4) if isinstance(v, float) else v
                          for c, v in rows[-1].items()}))  # fmt: skip
    result = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": rows,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"probe_gemv_mma-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
