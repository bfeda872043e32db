"""A wide low-rank input (a fused group's stacked LoRA columns) computed by the quantize's
rank slices, or by the quantize at the base rank plus one cuBLAS GEMM for the LoRA columns.

    PYTHONPATH=src python bench/probe_lora_act.py [--ms 1024,4608] [--ks 3072,15360] \\
        [--ranks 160,544] [--base 32] [--tail 12288] [--dtype float16] [--out DIR]

The sliced quantize re-reads x and recomputes x̂ once per 64-column slice (v56: rank 544
at 4608 x 3072 took longer than BF16's 3072² GEMM). The alternative: ``quantize_act`` at
the base rank, then ``x @ (L_down · diag(1/s))ᵀ`` for the other columns with fp32 output
(``torch.mm(out_dtype=torch.float32)``, the same bf16 products and fp32 sums as the kernel's
folded dot); and the engine's route for it, ``quantize.WIDE_BY_MM`` (the codes by the
kernel at rank 0, every low-rank column by that GEMM, L_down folded once: v56's route
folded it in every call). Each is replayed from a CUDA graph; the two ways' LoRA columns
are compared. The route with ``quantize.KEEP_FOLDS`` off is timed too (the fold in every
call). ``--tail N``: the input ``cat([x, gelu_tanh(tail)])`` of FLUX's single-block
``proj_out`` instead, the slices against ``quantize.WIDE_TAIL_BY_MM``. ``--dtype float16``:
an fp16 model's inputs. ``--ranks 32 --base 0``: the plain layer's rank-32 quantize
(``sliced us``) against the codes alone (``base us``) and a rank-32 GEMM (``mm us``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gemm import bench_graph, run_info, write_result

from svdquant.kernels import quantize as qmod
from svdquant.kernels.quantize import fold_lowrank_down, quantize_act


def _mm_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ wᵀ`` with fp32 output from 16-bit inputs (fp32 sums)."""
    return torch.mm(x, w.t(), out_dtype=torch.float32)


@contextlib.contextmanager
def _set(**values):
    """``quantize``'s constants set to ``values`` inside, restored after."""
    before = {name: getattr(qmod, name) for name in values}
    for name, value in values.items():
        setattr(qmod, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(qmod, name, value)


def _wide_by_mm(on: bool):
    return _set(WIDE_BY_MM=on)


def _row(x: torch.Tensor, s: torch.Tensor, scale: torch.Tensor, r: int, base: int,
         g: torch.Generator) -> dict:  # fmt: skip
    """One rank's timings (µs) both ways at input ``x``, and their LoRA columns' error."""
    m, k = x.shape
    down = (torch.randn(r, k, device=x.device, generator=g) / k**0.5).to(x.dtype)
    head, extra = down[:base].contiguous(), fold_lowrank_down(down, s)[base:].contiguous()

    def both():
        quantize_act(x, s, head, scale, k, "int4")
        _mm_fp32(x, extra)

    whole = lambda: quantize_act(x, s, down, scale, k, "int4")  # noqa: E731
    with _wide_by_mm(False):
        want, sliced = whole()[1][:, base:], bench_graph(whole)
    with _wide_by_mm(True):  # the engine's route: rank-0 codes, then all columns by cuBLAS
        route = bench_graph(whole)
        with _set(KEEP_FOLDS=False):  # the same, L_down folded in every call
            fold_each = bench_graph(whole)
    return dict(
        m=m, k=k, rank=r, base=base,
        sliced_us=sliced,
        base_us=bench_graph(lambda: quantize_act(x, s, head, scale, k, "int4")),
        mm_us=bench_graph(lambda: _mm_fp32(x, extra)),
        base_mm_us=bench_graph(both),
        wide_by_mm_us=route,
        wide_by_mm_fold_each_us=fold_each,
        rel_err=((_mm_fp32(x, extra) - want).norm() / want.norm()).item(),
    )  # fmt: skip


def _tail_row(x: torch.Tensor, tail: torch.Tensor, s: torch.Tensor, scale: torch.Tensor,
              r: int, g: torch.Generator) -> dict:  # fmt: skip
    """The quantize of ``cat([x, gelu_tanh(tail)])`` (``proj_out``) at rank ``r``: in
    slices against ``WIDE_TAIL_BY_MM`` (the codes alone, torch's GELU written out, two
    GEMMs), µs, and their LoRA columns' error."""
    m, k = x.shape[0], x.shape[1] + tail.shape[1]
    down = (torch.randn(r, k, device=x.device, generator=g) / k**0.5).to(x.dtype)
    call = lambda: quantize_act(x, s, down, scale, k, "int4", tail, "gelu_tanh")  # noqa: E731
    with _set(WIDE_TAIL_BY_MM=False):
        want, sliced = call()[1], bench_graph(call)
    with _set(WIDE_TAIL_BY_MM=True):
        got, route = call()[1], bench_graph(call)
    return dict(m=m, k=k, k_tail=tail.shape[1], rank=r, sliced_us=sliced, wide_tail_us=route,
                rel_err=((got - want).norm() / want.norm()).item())  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="1024,4608")
    p.add_argument("--ks", default="3072,15360")
    p.add_argument("--ranks", default="160,544")
    p.add_argument("--base", type=int, default=32)
    p.add_argument("--tail", type=int, default=0,
                   help="a GELU-tanh tail of this many columns after each K (proj_out: "
                        "--ks 3072 --tail 12288): the sliced quantize against "
                        "WIDE_TAIL_BY_MM instead")  # fmt: skip
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16"],
        default="bfloat16",
        help="the inputs' and L_down's dtype (an fp16 model: SDXL's usual)",
    )
    p.add_argument("--out", default="bench/results")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    if not torch.cuda.is_available():
        sys.exit("probe_lora_act.py needs a CUDA GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    if a.tail:
        print("    M      K    r | sliced us | WIDE_TAIL_BY_MM us |      x | err")
        for m in (int(v) for v in a.ms.split(",")):
            for k in (int(v) for v in a.ks.split(",")):
                x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
                t = torch.randn(m, a.tail, device="cuda", generator=g).to(dtype)
                s = torch.rand(k + a.tail, device="cuda", generator=g) + 0.5
                scale = torch.tensor(4.0, device="cuda") / 7
                for r in (int(v) for v in a.ranks.split(",")):
                    row = _tail_row(x, t, s, scale, r, g)
                    rows.append(row)
                    print(f"{m:5d} {row['k']:6d} {r:4d} | {row['sliced_us']:9.1f} | "
                          f"{row['wide_tail_us']:18.1f} | "
                          f"{row['sliced_us'] / row['wide_tail_us']:5.2f}x | "
                          f"{row['rel_err']:.1e}")  # fmt: skip
        path = write_result({**run_info(), "bench": "probe_lora_act", "tail": a.tail,
                             "dtype": a.dtype, "rows": rows}, a.out, "probe_lora_act")  # fmt: skip
        print("->", path)
        return
    print("    M      K    r | sliced us | base us | mm us | base+mm us | sliced/(base+mm) | "
          "WIDE_BY_MM us | sliced/that | folded each call us | err")  # fmt: skip
    for m in (int(v) for v in a.ms.split(",")):
        for k in (int(v) for v in a.ks.split(",")):
            x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
            s = torch.rand(k, device="cuda", generator=g) + 0.5
            scale = (x.float() / s).abs().amax() / 7
            for r in (int(v) for v in a.ranks.split(",")):
                row = _row(x, s, scale, r, a.base, g)
                rows.append(row)
                ratio = row["sliced_us"] / row["base_mm_us"]
                print(f"{m:5d} {k:6d} {r:4d} | {row['sliced_us']:9.1f} | {row['base_us']:7.1f} | "
                      f"{row['mm_us']:5.1f} | {row['base_mm_us']:10.1f} | {ratio:15.2f}x | "
                      f"{row['wide_by_mm_us']:13.1f} | "
                      f"{row['sliced_us'] / row['wide_by_mm_us']:10.2f}x | "
                      f"{row['wide_by_mm_fold_each_us']:18.1f} | "
                      f"{row['rel_err']:.1e}")  # fmt: skip
    path = write_result({**run_info(), "bench": "probe_lora_act", "dtype": a.dtype,
                         "rows": rows}, a.out, "probe_lora_act")  # fmt: skip
    print("->", path)


if __name__ == "__main__":
    main()
