"""The Gluon tensor-core W4A16 GEMV against today's path, on the GPU.

``kernels/gemv_gluon.py`` (``gemv.GLUON``, forced on from one token) against the W4A16
path without it ("default" in the table: the dp4a kernel up to 4 tokens, the packed
tensor-core kernel above — the path before v49) in the same run and BF16
``F.linear``: the whole ``w4a16_linear`` (prep + GEMV, rank 32, bias), replayed from a
CUDA graph, N = 18432 / 9216, K = 3072, and each path's error against the reference.
``--sweep``: the Gluon kernel's groups a step, groups a program and TMA stages at 4 and 16
tokens; ``--split``: the prep and the GEMV timed apart; ``--prep-chunks``: the Gluon path
at each of these prep chunk widths (``gemv.F16_CHUNK``); ``--timeline``: when each of the
Gluon GEMV's programs starts, ends and reaches each phase (``gemv_gluon.TIMELINE``),
against stamps around the whole call, the L2 emptied before each replay (``--warm-code``:
the same call on another weight first, so the kernel's code and x are cached).

    PYTHONPATH=src python bench/probe_gemv_gluon.py [--ms 1,2,3,4,5,8,16] [--sweep] [--split]
        [--timeline [--warm-code]] [--prep-chunks 128,64] [--set MOD.NAME=VALUE ...]
        [--out DIR]

``--set`` (``probe_layer.py``'s): engine constants for the whole run, e.g.
``--set gemv_gluon.STAGES=2``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import globaltimer

sys.path.insert(0, str(Path(__file__).parent))
from gemm import Layer, _graph, bench_graph, bench_graph_clean, run_info, write_result
from probe_layer import constants, merge_sets, parse_set

from svdquant.kernels import gemv, gemv_gluon
from svdquant.kernels import reference as ref


def _rel(y: torch.Tensor, want: torch.Tensor) -> float:
    return ((y.float() - want.float()).norm() / want.float().norm()).item()


def _case(layer: Layer, x: torch.Tensor, gluon: bool) -> tuple[float, float]:
    """(µs replayed, error against the reference) of ``w4a16_linear`` with the Gluon GEMV
    at every token count (``gluon``) or off."""
    saved = gemv.GLUON, gemv.GLUON_MIN_M
    gemv.GLUON, gemv.GLUON_MIN_M = gluon, 1
    try:
        y = layer.w4a16(x)
        w = (layer.qweight, layer.wscales, layer.wtensor_scale, layer.smooth)
        err = _rel(y, ref.w4a16_linear_ref(x, *w, layer.down, layer.up, layer.bias, "int4"))
        return bench_graph(lambda: layer.w4a16(x)), err
    finally:
        gemv.GLUON, gemv.GLUON_MIN_M = saved


def table(ms: list[int], chunks: list[int]) -> list[dict]:
    """BF16, the path without the Gluon GEMV, and with it at each of the prep's ``chunks``
    (``gemv.F16_CHUNK``; the first is the reference of the "x chunk" column)."""
    rows = []
    print(f"{'M':>3} {'N':>6} | bf16 us | default us (err) | chunk: gluon us (err) | "
          "gluon x bf16, x default, x first chunk")  # fmt: skip
    saved = gemv.F16_CHUNK
    try:
        for n in (18432, 9216):
            layer = Layer(n, 3072)
            for m in ms:
                x = torch.randn(m, 3072, device="cuda").bfloat16()
                bf16 = bench_graph(lambda x=x, layer=layer: F.linear(x, layer.w16, layer.bias))
                d_us, d_err = _case(layer, x, False)
                first = None
                for chunk in chunks:
                    gemv.F16_CHUNK = chunk
                    g_us, g_err = _case(layer, x, True)
                    first = first or g_us
                    rows.append(dict(M=m, N=n, K=3072, bf16_us=bf16, default_us=d_us,
                                     default_err=d_err, prep_chunk=chunk, gluon_us=g_us,
                                     gluon_err=g_err))  # fmt: skip
                    print(f"{m:3d} {n:6d} | {bf16:7.1f} | {d_us:6.1f} ({d_err:.1e}) | {chunk:3d}: "
                          f"{g_us:6.1f} ({g_err:.1e}) | {bf16 / g_us:.2f}x {d_us / g_us:.2f}x "
                          f"{first / g_us:.2f}x")  # fmt: skip
    finally:
        gemv.F16_CHUNK = saved
    return rows


def sweep() -> list[dict]:
    rows = []
    saved = (gemv_gluon.TILE, gemv_gluon.MAX_GROUPS, gemv_gluon.STAGES)
    layer = Layer(18432, 3072)
    try:
        for m in (4, 16):
            x = torch.randn(m, 3072, device="cuda").bfloat16()
            for bn, gs, mg, stages in itertools.product((128,), (1, 2), (8, 16), (3, 4)):
                gemv_gluon.TILE, gemv_gluon.MAX_GROUPS = (bn, gs, 4), mg
                gemv_gluon.STAGES = stages
                try:
                    us, err = _case(layer, x, True)
                except Exception as e:  # a tile that does not compile
                    print(f"M={m} tile {bn}x{gs} groups {mg} stages {stages}: {type(e).__name__}")
                    continue
                rows.append(dict(M=m, block_n=bn, groups_per_step=gs, max_groups=mg,
                                 stages=stages, us=us, err=err))  # fmt: skip
                print(f"M={m:2d} BN {bn:3d} GS {gs} groups {mg:2d} stages {stages}: {us:6.1f} us "
                      f"(err {err:.1e})")  # fmt: skip
    finally:
        gemv_gluon.TILE, gemv_gluon.MAX_GROUPS, gemv_gluon.STAGES = saved
    return rows


def split(ms: list[int]) -> list[dict]:
    """The prep alone, the Gluon GEMV alone on its outputs, and the two (PDL), at N = 18432."""
    rows = []
    layer = Layer(18432, 3072)
    kp = layer.qweight.shape[1] * 2
    w = gemv._operands(layer.qweight, layer.wscales, layer.wtensor_scale, layer.up, fma=False)
    for m in ms:
        x = torch.randn(m, 3072, device="cuda").bfloat16()
        args = gemv_gluon.prep_args(m, 18432, kp, x.device)  # (as ``w4a16_linear`` calls it)
        xh, lora = gemv.prep(x, layer.smooth, layer.down, kp, "int4", fma=False, **args)
        prep_us = bench_graph(
            lambda x=x, args=args: gemv.prep(
                x, layer.smooth, layer.down, kp, "int4", fma=False, **args
            )
        )
        gemv_us = bench_graph(
            lambda xh=xh, lora=lora: gemv_gluon.gemv_gluon(
                xh, lora, w[0], w[1], w[2], w[3], layer.bias, torch.bfloat16
            )
        )
        both_us, _ = _case(layer, x, True)
        # what a K split adds around the kernel: the zeroed fp32 buffer and the cast
        frame_us = bench_graph(lambda m=m: torch.zeros(m, 18432, device="cuda").to(torch.bfloat16))
        rows.append(dict(M=m, prep_us=prep_us, gemv_us=gemv_us, both_us=both_us,
                         zeros_and_cast_us=frame_us))  # fmt: skip
        print(f"split M={m:2d}: prep {prep_us:5.1f} us, gemv {gemv_us:5.1f}, both {both_us:5.1f}, "
              f"zeros + cast alone {frame_us:4.1f}")  # fmt: skip
    return rows


@triton.jit
def _stamp(ptr, i):
    tl.store(ptr + i, globaltimer())


#: ``gemv_gluon.read_timeline``'s stamps after the SM and before the end, in order
PHASES = ("start", "requested", "xhat", "staged", "first_codes", "looped", "waited")


def _stamps(buf: torch.Tensor, programs: int, t0: int) -> torch.Tensor:
    """[programs, 1 + len(PHASES) + 1]: the SM, then each phase and the end in µs after
    ``t0``."""
    t = gemv_gluon.read_timeline(buf, programs).cpu()
    return torch.cat([t[:, :1].double(), (t[:, 1:] - t0).double() / 1e3], 1)


def timeline(ms: list[int], reps: int = 30, warm_code: bool = False) -> list[dict]:
    """The Gluon GEMV's programs (N = 18432 and 9216): medians over ``reps`` replays (L2
    emptied by reading before each) of when they start and end and how long each phase
    takes, against a stamp before the whole ``w4a16_linear`` (prep, GEMV, cast) and one
    after it, in µs; and one replay's stamps per program (the median call's)."""
    rows = []
    sweep = torch.ones(2**27, device="cuda")
    stamps = torch.zeros(2, dtype=torch.int64, device="cuda")
    saved = gemv.GLUON, gemv.GLUON_MIN_M, gemv_gluon.TIMELINE
    gemv.GLUON, gemv.GLUON_MIN_M = True, 1
    try:
        for n in (18432, 9216):
            layer = Layer(n, 3072)
            other = Layer(n, 3072) if warm_code else None
            for m in ms:
                x = torch.randn(m, 3072, device="cuda").bfloat16()
                gemv_gluon.TIMELINE = None
                plain_us = bench_graph_clean(lambda x=x, layer=layer: layer.w4a16(x))
                _, split = gemv_gluon._k_split(n, 3072, x.device)
                programs = gemv_gluon.programs(n, 3072, x.device)
                buf = torch.zeros(programs * 16, dtype=torch.int64, device="cuda")
                gemv_gluon.TIMELINE = buf

                def call(x=x, layer=layer):
                    _stamp[(1,)](stamps, 0)
                    layer.w4a16(x)
                    _stamp[(1,)](stamps, 1)

                g = _graph(call)
                g_warm = _graph(lambda x=x, other=other: other.w4a16(x)) if warm_code else None
                runs = []
                for _ in range(reps):
                    sweep.sum()
                    if g_warm is not None:
                        g_warm.replay()
                    g.replay()
                    torch.cuda.synchronize()
                    t0, t1 = stamps.tolist()
                    a = _stamps(buf, programs, t0)
                    run = dict(call_us=(t1 - t0) / 1e3, first_start=a[:, 1].min().item(),
                               last_start=a[:, 1].max().item(), ends_p50=a[:, -1].median().item(),
                               last_end=a[:, -1].max().item(),
                               program_p50=(a[:, -1] - a[:, 1]).median().item(),
                               sms=int(a[:, 0].unique().numel()))  # fmt: skip
                    for j, phase in enumerate((*PHASES[1:], "end"), start=2):  # (durations)
                        run[f"{phase}_p50"] = (a[:, j] - a[:, j - 1]).median().item()
                    run["raw"] = [[round(v, 3) for v in row] for row in a.tolist()]
                    runs.append(run)
                med = {k: sorted(r[k] for r in runs)[reps // 2] for k in runs[0] if k != "raw"}
                # (the replay whose call took the median time: [SM, *PHASES, end] a program)
                med["raw"] = next(r["raw"] for r in runs if r["call_us"] == med["call_us"])
                rows.append(dict(M=m, N=n, K=3072, programs=programs, split=split,
                                 warm_code=warm_code, plain_clean_us=plain_us, **med))  # fmt: skip
                steps = ", ".join(f"{p} +{med[p + '_p50']:.2f}" for p in (*PHASES[1:], "end"))
                print(f"timeline M={m:2d} N={n:5d}: call {med['call_us']:.1f} us (plain "
                      f"{plain_us:.1f}); starts {med['first_start']:.1f}-{med['last_start']:.1f},"
                      f" ends p50 {med['ends_p50']:.1f}, last {med['last_end']:.1f}; a program "
                      f"p50 {med['program_p50']:.1f}: {steps}")  # fmt: skip
    finally:
        gemv.GLUON, gemv.GLUON_MIN_M, gemv_gluon.TIMELINE = saved
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="1,2,3,4,5,8,16")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--split", action="store_true", help="the prep and the GEMV timed apart")
    p.add_argument("--timeline", action="store_true", help="per-program timestamps only")
    p.add_argument("--warm-code", action="store_true",
                   help="--timeline: the kernel's code and x cached first")  # fmt: skip
    p.add_argument(
        "--prep-chunks",
        default=str(gemv.F16_CHUNK),
        help="the prep's columns a program (gemv.F16_CHUNK), comma-separated",
    )
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="MOD.NAME=VALUE")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    a = p.parse_args()
    sets = merge_sets([parse_set(v) for v in a.sets])
    with constants(sets):
        _run(a)


def _run(a: argparse.Namespace) -> None:
    result = {**run_info(), "set": a.sets, "tile": gemv_gluon.TILE,
              "max_groups": gemv_gluon.MAX_GROUPS,
              "programs_per_sm": gemv_gluon.PROGRAMS_PER_SM,
              "stages": gemv_gluon.STAGES}  # fmt: skip
    if a.sweep:
        result["sweep"] = sweep()
    if a.split:
        result["split"] = split([1, 4, 8, 16])
    if a.timeline:
        result["timeline"] = timeline([int(v) for v in a.ms.split(",")], warm_code=a.warm_code)
        print(write_result(result, a.out, "probe_gemv_gluon-h200"))
        return
    result["rows"] = table([int(v) for v in a.ms.split(",")],
                           [int(v) for v in a.prep_chunks.split(",")])  # fmt: skip
    print(write_result(result, a.out, "probe_gemv_gluon-h200"))


if __name__ == "__main__":
    main()
