"""A gated linear unit's down-projection input: fused quantize against the unfused passes.

    PYTHONPATH=src:bench python bench/probe_gated.py [--out DIR]

SDXL's feed-forwards are GEGLUs: ``up(h)`` [M, 2H], then ``x · gelu(gate)`` of its halves,
then the down projection. Unfused, the GELU and the product are two elementwise kernels
before the down projection's quantize; fused (``quantize_act(gated=True)``,
``SVDQLinear.forward_gated``), the quantize reads both halves where they lie. Times, at
SDXL's shapes (1024², batch 1 and 2: H = 2560 at 4096 / 8192 tokens, 5120 at 1024 /
2048), each replayed from a CUDA graph in one run:

- ``unfused``: ``F.gelu`` + the product + ``quantize_act`` (what the model ran before);
- ``gated`` with each tile of ``quantize.GATED_TILE`` in ``--tiles``.

``--ff``: the whole feed-forward instead (C = 640 at 4096 / 8192 tokens, 1280 at 1024 /
2048; up C -> 8C, GEGLU, down 4C -> C; random weights quantized at rank 32), three ways in
one run: BF16 (``F.linear``, ``F.gelu``, the product, ``F.linear``), ours with the gated
quantize (``SVDQLinear.forward_gated``) and ours with the GEGLU in the up projection's
epilogue (``kernels.svdq_geglu_triton`` with ``gemm_gated.WS_GATED`` off: the Triton
kernel), each checked against the other, and (on sm_90) that epilogue on the
warp-specialized GEMM (``WS_GATED``, the default since v46: the down projection's
quantize in its epilogue too, one pass); then each piece alone (BF16's two GEMMs and gate;
our up projection's quantize and widen, gated GEMM, down projection's widen and GEMM; on
sm_90 the Gluon GEMM writing h and the quantize of h).

``--configs``: the gated up projection at those shapes with each of its tiles forced (and
the ``EXTRA_TILES`` the autotuner does not try), four runs each: the same codes every run,
the share of codes that differ from the reference on the GPU's own up projection (a tile
that computes wrongly shows; rounding does not), and its time.

Writes ``probe_gated-<date>.json`` under ``--out`` and prints a table. GPU only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from probe_layer import constants, with_constants

#: ``--configs`` also times these tiles (BLOCK_M, BLOCK_H, BLOCK_K, warps, stages), not
#: among the autotuner's (v42: 1.1-1.9x slower than its best at every shape; the two
#: that won, 128 x 128 x 64 and 64 x 64 x 128 with 3 stages, joined it).
EXTRA_TILES = ((64, 128, 128, 8, 3), (64, 128, 128, 8, 4), (128, 64, 128, 8, 4))

SHAPES = ((4096, 2560), (1024, 5120), (8192, 2560), (2048, 5120))


def probe_ff(m: int, c: int) -> dict:
    """One GEGLU feed-forward at M tokens, C channels: BF16, gated quantize, epilogue."""
    from gemm import bench_graph

    import svdquant
    from svdquant import kernels
    from svdquant.kernels import gemm_gated, gemm_ws

    gen = torch.Generator(device="cuda").manual_seed(0)
    h = 4 * c
    lin_up = torch.nn.Linear(c, 2 * h).to("cuda", torch.bfloat16)
    lin_down = torch.nn.Linear(h, c).to("cuda", torch.bfloat16)
    x = torch.randn(m, c, device="cuda", generator=gen).to(torch.bfloat16)

    def bf16() -> torch.Tensor:
        v, g = F.linear(x, lin_up.weight, lin_up.bias).chunk(2, dim=-1)
        return F.linear(v * F.gelu(g), lin_down.weight, lin_down.bias)

    up = svdquant.quantize_linear(lin_up, x, rank=32, alpha=0.5)
    v, g = lin_up(x).chunk(2, dim=-1)
    down = svdquant.quantize_linear(lin_down, v * F.gelu(g), rank=32, alpha=0.5)

    def gated() -> torch.Tensor:
        v, g = up(x).chunk(2, dim=-1)
        return down.forward_gated(v, g, "gelu")

    def geglu() -> torch.Tensor:
        return kernels.svdq_geglu_triton(x, up, down, "gelu")

    epilogue = with_constants(geglu, [(gemm_gated, "WS_GATED", False)])  # the Triton kernel
    ws = with_constants(geglu, [(gemm_gated, "WS_GATED", True)])  # gemm_ws's one pass

    a, b, want = gated(), epilogue(), bf16()
    row: dict = {"m": m, "c": c, "h": h}
    row["epilogue_vs_gated_max_abs"] = float((a.float() - b.float()).abs().max())
    row["gated_vs_bf16_rel"] = float((a.float() - want.float()).norm() / want.float().norm())
    ways = [("bf16", bf16), ("gated", gated), ("epilogue", epilogue)]
    if gemm_ws.available(x.device):
        row["ws_vs_epilogue_max_abs"] = float((ws().float() - b.float()).abs().max())
        ways += [("ws", ws)]
    for name, fn in ways:
        row[name + "_us"] = bench_graph(fn)
    parts = _ff_parts(x, lin_up, lin_down, up, down)
    row["parts_us"] = {name: bench_graph(fn) for name, fn in parts}
    return row


def _ff_parts(x, lin_up, lin_down, up, down) -> list[tuple[str, object]]:
    """The feed-forward's pieces each way, each to be timed alone (where the time goes):
    BF16's up GEMM, gate and down GEMM; ours: the up projection's quantize and widen, the
    gated GEMM, the down projection's widen and GEMM."""
    from svdquant.kernels import gemm_gated, gemm_ws, ops

    x2 = x.reshape(-1, up.in_features)
    y = F.linear(x, lin_up.weight, lin_up.bias)
    v, g = y.chunk(2, dim=-1)
    hid = v * F.gelu(g)
    xq, lora, w1, c1, s1 = ops._fp8_operands(
        x2, up.qweight, up.wscales, up.wtensor_scale, up.smooth, up.act_amax,
        up.lowrank_down, up.fmt, up.act_fmt,
    )  # fmt: skip
    s2 = ops._act_scale(down.act_amax)
    k_out2 = down.qweight.shape[1] * 2

    def gated_next():
        """The up projection writing the down projection's input."""
        return ops._EAGER.fp8_gemm_gated_next(
            xq, w1, c1, s1, lora, up.lowrank_up, up.bias, x.dtype, "gelu", down.smooth,
            down.lowrank_down, s2, k_out2, down.act_fmt,
        )  # fmt: skip

    gated_gemm = with_constants(gated_next, [(gemm_gated, "WS_GATED", False)])  # Triton's
    xq2, lora2 = gated_gemm()
    w2, c2 = ops._EAGER.widen_weight(down.qweight, down.wscales, down.wtensor_scale, down.fmt)
    ws = []
    if gemm_ws.available(x.device):  # the Gluon GEMM writing h, then h's quantize

        def ws_gated_gemm():
            return gemm_ws.fp8_gemm_ws_gated(xq, w1, c1, s1, lora, up.lowrank_up, up.bias,
                                             x.dtype)  # fmt: skip

        hv = ws_gated_gemm()
        one_pass = with_constants(gated_next, [(gemm_gated, "WS_GATED", True)])
        ws = [("ws_gated_gemm", ws_gated_gemm), ("down_quantize", lambda: ops._EAGER.quantize_act(
            hv, down.smooth, down.lowrank_down, s2, k_out2, down.act_fmt)),
            ("ws_one_pass", one_pass)]  # fmt: skip
    return [
        *ws,
        ("bf16_up", lambda: F.linear(x, lin_up.weight, lin_up.bias)),
        ("bf16_gate", lambda: v * F.gelu(g)),
        ("bf16_down", lambda: F.linear(hid, lin_down.weight, lin_down.bias)),
        ("up_quantize_widen", lambda: ops._fp8_operands(
            x2, up.qweight, up.wscales, up.wtensor_scale, up.smooth, up.act_amax,
            up.lowrank_down, up.fmt, up.act_fmt)),
        ("gated_gemm", gated_gemm),
        ("down_widen", lambda: ops._EAGER.widen_weight(
            down.qweight, down.wscales, down.wtensor_scale, down.fmt)),
        ("down_gemm", lambda: ops._EAGER.fp8_gemm(
            xq2, w2, c2, s2, lora2, down.lowrank_up, down.bias, x.dtype)),
    ]  # fmt: skip


FF_SHAPES = ((4096, 640), (1024, 1280), (8192, 640), (2048, 1280))


def probe_configs(m: int, h: int, k: int, act_fmt: str, runs: int = 4) -> list[dict]:
    """The gated up projection with each of its tiles forced, ``runs`` times each: whether
    a tile gives the same codes every run, and how many codes differ from the reference
    on the GPU's own 16-bit up projection (``fp8_gemm`` on the Triton kernel, the same
    MMAs) — a tile that computes wrongly shows here, the fp8 sums' rounding does not."""

    from svdquant.kernels import gemm, gemm_gated
    from svdquant.kernels.reference import quantize_act_gated_ref

    gen = torch.Generator().manual_seed(m + h + k)

    def fp8(t: torch.Tensor) -> torch.Tensor:  # past ±448 the cast gives NaN, not 448
        return t.clamp(-448, 448).to(torch.float8_e4m3fn).cuda()

    xq = fp8(torch.randn(m, k, generator=gen) * 30)
    wq = fp8(torch.randn(2 * h, k, generator=gen) * 100)
    s_ch = (torch.rand(2 * h, generator=gen) * 1e-3).cuda()
    scale = torch.tensor(0.02, device="cuda")
    lora = torch.randn(m, 32, generator=gen).cuda()
    up = (torch.randn(2 * h, 32, generator=gen) * 0.1).to("cuda", torch.bfloat16)
    bias = torch.randn(2 * h, generator=gen).to("cuda", torch.bfloat16)
    smooth2 = (torch.rand(h, generator=gen) * 2 + 0.25).cuda()
    down2 = (torch.randn(32, h, generator=gen) / h**0.5).to("cuda", torch.bfloat16)
    args = (xq, wq, s_ch, scale, lora, up, bias, torch.bfloat16, "gelu", smooth2, down2,
            torch.tensor(0.01, device="cuda"), -(-h // 64) * 64, act_fmt)  # fmt: skip
    with constants([(gemm, "WS_GEMM", False)]):  # the Triton kernel: the same MMAs
        v, g = gemm.fp8_gemm(*args[:8]).chunk(2, dim=-1)
    own = quantize_act_gated_ref(v, g, "gelu", *args[9:])[0].float()
    launch: dict = {}

    def record(kernel, grid, a, flags, *rest) -> None:  # the launch's arguments, no launch
        launch.update(grid=grid, args=a, flags=flags)

    with constants([(gemm, "run_tuned", record), (gemm_gated, "WS_GATED", False)]):
        xq2, lora2 = gemm_gated.fp8_gemm_gated_next(*args)
    import triton
    from gemm import bench_graph

    rows = []
    tuned = list(gemm_gated._gated_kernel.configs)
    extra = [triton.Config({"BLOCK_M": bm, "BLOCK_H": bh, "BLOCK_K": bk, "GROUP_M": 8},
                           num_warps=w, num_stages=st)
             for bm, bh, bk, w, st in EXTRA_TILES]  # fmt: skip
    for i, config in enumerate(tuned + extra):
        kernel = gemm_gated._gated_kernel.fn[launch["grid"]]

        def run(config=config, kernel=kernel) -> None:
            kernel(*launch["args"], **launch["flags"], **config.all_kwargs())

        outs = []
        for _ in range(runs):
            lora2.zero_()
            run()
            torch.cuda.synchronize()
            outs.append(xq2.float().clone())
        rows.append({
            "m": m, "h": h, "k": k, "act_fmt": act_fmt, "config": str(config),
            "same_every_run": all(torch.equal(o, outs[0]) for o in outs),
            "flips_vs_own": float((outs[0] != own).float().mean()),
            "max_abs_vs_own": float((outs[0] - own).abs().max()),
            "autotuned": i < len(tuned), "us": bench_graph(run),
        })  # fmt: skip
    return rows


def probe(m: int, h: int, tiles: list[tuple[int, int, int]]) -> dict:
    from gemm import bench_graph

    from svdquant.kernels import quantize as q
    from svdquant.kernels.reference import act_scale_from_amax

    gen = torch.Generator(device="cuda").manual_seed(0)
    up = torch.randn(m, 2 * h, device="cuda", generator=gen).to(torch.bfloat16)
    x, gate = up.chunk(2, dim=-1)
    smooth = torch.rand(h, device="cuda", generator=gen) + 0.5
    down = torch.randn(32, h, device="cuda", generator=gen).to(torch.bfloat16) * 0.02
    s = act_scale_from_amax((x.float() * F.gelu(gate.float())).abs().amax())
    row: dict = {"m": m, "h": h}

    def unfused() -> None:
        q.quantize_act(x * F.gelu(gate), smooth, down, s, h, "int4")

    row["unfused_us"] = bench_graph(unfused)
    ref = q.quantize_act(x * F.gelu(gate), smooth, down, s, h, "int4")[0]
    for tile in tiles:
        fn = lambda: q.quantize_act(x, smooth, down, s, h, "int4", gate, "gelu", gated=True)  # noqa: E731
        key = "gated_{}x{}x{}".format(*tile)
        with constants([(q, "GATED_TILE", tile)]):
            row[key + "_us"] = bench_graph(fn)
            got = fn()[0]
        row[key + "_mismatch"] = float((got.float() != ref.float()).float().mean())
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", default="64x64x4,64x128x4,32x128x4,128x64x8")
    p.add_argument("--ff", action="store_true", help="the whole feed-forward, three ways")
    p.add_argument(
        "--configs", action="store_true", help="the gated up projection's tiles, each forced"
    )
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_gated: needs a CUDA GPU")
    from gemm import run_info, write_result

    if args.configs:
        rows = [r for m, c in FF_SHAPES for fmt in ("int4", "fp8")
                for r in probe_configs(m, 4 * c, c, fmt)]  # fmt: skip
        print("| M | H | K | act | tile | tuned | µs | same every run | codes ≠ own | max |Δ| |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['m']} | {r['h']} | {r['k']} | {r['act_fmt']} | {r['config'][:60]} | "
                  f"{r['autotuned']} | {r['us']:.1f} | {r['same_every_run']} | "
                  f"{r['flips_vs_own']:.4%} | "
                  f"{r['max_abs_vs_own']:.3g} |")  # fmt: skip
        result = {**run_info(), "mode": "configs", "rows": rows}
        print("->", write_result(result, args.out, "probe_gated_configs"))
        return result
    if args.ff:
        rows = [probe_ff(m, c) for m, c in FF_SHAPES]
        print("| M | C | BF16 µs | gated quantize µs | epilogue µs | epilogue × BF16 | max |Δ| "
              "| gemm_ws µs | gemm_ws × BF16 | its max |Δ| |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            ws = "– | – | –"
            if "ws_us" in r:
                ws = (f"{r['ws_us']:.1f} | {r['bf16_us'] / r['ws_us']:.2f}× | "
                      f"{r['ws_vs_epilogue_max_abs']:.3g}")  # fmt: skip
            print(f"| {r['m']} | {r['c']} | {r['bf16_us']:.1f} | {r['gated_us']:.1f} | "
                  f"{r['epilogue_us']:.1f} | {r['bf16_us'] / r['epilogue_us']:.2f}× | "
                  f"{r['epilogue_vs_gated_max_abs']:.3g} | {ws} |")  # fmt: skip
        for r in rows:
            print(f"M {r['m']}, C {r['c']}: " + ", ".join(
                f"{k} {v:.1f}" for k, v in r["parts_us"].items()))  # fmt: skip
        result = {**run_info(), "mode": "ff", "rows": rows}
        print("->", write_result(result, args.out, "probe_gated_ff"))
        return result

    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",") if t]
    rows = [probe(m, h, tiles) for m, h in SHAPES]
    keys = ["unfused_us"] + ["gated_{}x{}x{}_us".format(*t) for t in tiles]
    print("| M | H | " + " | ".join(k[:-3] for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['m']} | {r['h']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    result = {**run_info(), "tiles": [list(t) for t in tiles], "rows": rows}
    print("->", write_result(result, args.out, "probe_gated"))
    return result


if __name__ == "__main__":
    main()
