"""The epilogue that writes the next layer's quantized input, on gemm_ws, tile by tile.

At the models' fc1 shapes (a GELU-tanh MLP's up projection: FLUX 12288 x 3072, PixArt-Σ
4608 x 1152; a GEGLU's: SDXL 2 x 2560 x 640 and 2 x 5120 x 1280) and M tokens, replayed
from CUDA graphs in one run: BF16 ``F.linear`` + activation; the Triton GEMM with
``quantize_next``'s epilogue (the GELU MLPs' default; SDXL's before v46); ``fp8_gemm_ws``
writing its 16-bit output (the GEMM's own time, gated: ``fp8_gemm_ws_gated``) and
``fp8_gemm_ws_next`` (the same with the codes and low-rank sums written instead) with
each candidate tile forced; the standalone quantize of the 16-bit output. ``…pp`` tiles
run their epilogue beside the other MMA partition's K loop, the others after their own.
Each way's codes against the Triton epilogue's (share of equal bytes) and its low-rank
sums (relative error). ``--fast-rcp``: the GELU-tanh shapes again with
``_triton_common.FAST_RCP`` (the Triton epilogue and gemm_ws's at its own tile), its codes
compared byte for byte; ``--tiles next``: only ``gemm_ws.NEXT_TILE`` forced.

    PYTHONPATH=src:bench python bench/probe_ws_next.py [--ms 4096] [--shapes flux,pixart,...] \
        [--tiles all|next] [--fast-rcp]
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
from probe_layer import constants, with_constants

from svdquant.kernels import _triton_common, gemm, gemm_gated, gemm_ws
from svdquant.kernels import reference as ref
from svdquant.kernels._triton_common import num_sms
from svdquant.kernels.quantize import quantize_act
from svdquant.kernels.widen import widen_weight

#: name -> (N of the up projection's output, K, gated): the next layer's K is N.
SHAPES = {
    "flux": (12288, 3072, False),
    "pixart": (4608, 1152, False),
    "sdxl640": (2560, 640, True),
    "sdxl1280": (5120, 1280, True),
}


def _row(m: int, name: str, tiles: list, fast_rcp: bool = False) -> dict:
    n, k, gated = SHAPES[name]
    act = "gelu" if gated else "gelu_tanh"
    up = Layer(2 * n if gated else n, k, seed=1)
    x = torch.randn(m, k, device="cuda").bfloat16()
    s = ref.act_scale_from_amax(up.act_amax)
    xq, lora = quantize_act(x, up.smooth, up.down, s, up.qweight.shape[1] * 2, "int4")
    wq, s_ch = widen_weight(up.qweight, up.wscales, up.wtensor_scale, up.fmt)
    args = (xq, wq, s_ch, s, lora, up.up, up.bias, torch.bfloat16)
    down = Layer(k, n, seed=2)  # the next layer: input width n
    s2 = ref.act_scale_from_amax(down.act_amax)
    k_out2 = down.qweight.shape[1] * 2
    nxt_args = (act, down.smooth, down.down, s2, k_out2, "int4")
    triton = with_constants(  # the Triton kernel's epilogue, whatever the defaults
        gemm_gated.fp8_gemm_gated_next if gated else gemm.fp8_gemm_quantize_next,
        [(gemm_gated, "WS_GATED", False), (gemm, "WS_NEXT", False)],
    )

    def triton_next():
        return triton(*args, *nxt_args)

    def ws_next():  # gemm_ws's epilogue, at the tile pick_tile or TILE_OVERRIDE gives
        nxt = gemm.next_layer_input(m, n, x.device, *nxt_args)[2]
        return gemm_ws.fp8_gemm_ws_next(*args, nxt, gated=gated)

    r: dict = {"M": m, "shape": name, "N": n, "K": k, "gated": gated, "tiles": {}}

    def bf16() -> torch.Tensor:
        y = F.linear(x, up.w16, up.bias)
        if gated:
            v, g = y.chunk(2, dim=-1)
            return v * F.gelu(g)
        return F.gelu(y, approximate="tanh")

    r["bf16_us"] = bench_graph(bf16)
    want_q, want_l = triton_next()
    r["triton_next_us"] = bench_graph(triton_next)
    plain = gemm_ws.fp8_gemm_ws_gated if gated else gemm_ws.fp8_gemm_ws
    h = plain(*args)
    h = h if gated else ref.activation_ref(h, act).to(h.dtype)
    r["quantize_us"] = bench_graph(
        lambda: quantize_act(h, down.smooth, down.down, s2, k_out2, "int4")
    )
    for tile in tiles:
        if not gemm_ws.tile_fits(tile, 32):
            continue
        with constants([(gemm_ws, "TILE_OVERRIDE", tile)]):
            q, lr = ws_next()
            r["tiles"][gemm_ws.tile_name(tile)] = {
                "ws_us": bench_graph(lambda: plain(*args)),
                "ws_next_us": bench_graph(ws_next),
                "codes_equal": (q.view(torch.uint8) == want_q.view(torch.uint8))
                .float()
                .mean()
                .item(),
                "lora2_rel": ((lr - want_l).norm() / want_l.norm().clamp_min(1e-30)).item(),
            }
    if fast_rcp and act == "gelu_tanh":  # GELU-tanh without the division's range check
        for key, fn in (("triton_next", triton_next), ("ws_next", ws_next)):
            before = fn()[0].view(torch.uint8)
            fast = with_constants(fn, [(_triton_common, "FAST_RCP", True)])
            r[key + "_fast_rcp_same_bytes"] = torch.equal(fast()[0].view(torch.uint8), before)
            r[key + "_us_again"] = bench_graph(fn)
            r[key + "_fast_rcp_us"] = bench_graph(fast)
    sms = num_sms(x.device)
    r["picked"] = gemm_ws.tile_name(gemm_ws.pick_tile(m, 2 * n if gated else n, k, 32, sms))
    return r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ms", default="4096")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--tiles", choices=("all", "next"), default="all",
                   help="every candidate tile, or only gemm_ws.NEXT_TILE")  # fmt: skip
    p.add_argument("--fast-rcp", action="store_true",
                   help="also time the GELU-tanh shapes with _triton_common.FAST_RCP, "
                   "its codes compared with the division's")  # fmt: skip
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--tag", default=None)
    a = p.parse_args(argv)
    if not torch.cuda.is_available() or not gemm_ws.available(torch.device("cuda")):
        raise SystemExit("probe_ws_next needs an sm_90 GPU and a triton with Gluon")
    unknown = set(a.shapes.split(",")) - set(SHAPES)
    if unknown:
        raise SystemExit(f"--shapes: unknown {sorted(unknown)}; known {sorted(SHAPES)}")
    torch.manual_seed(0)
    rows = []
    for m in (int(v) for v in a.ms.split(",")):
        for name in a.shapes.split(","):
            tiles = gemm_ws.CANDIDATE_TILES if a.tiles == "all" else (gemm_ws.NEXT_TILE,)
            rows.append(_row(m, name, list(tiles), a.fast_rcp))
            print(rows[-1], flush=True)
    stem = "probe_ws_next" + (f"-{a.tag}" if a.tag else "")
    path = write_result({**run_info(), "rows": rows}, a.out, stem)
    tiles = sorted({t for r in rows for t in r["tiles"]})
    print("| M | shape | BF16 | Triton next | quantize | " + " | ".join(tiles) + " | picked |")
    print("|---" * (5 + len(tiles)) + "|---|")
    for r in rows:
        cells = [
            f"{r['tiles'][t]['ws_us']:.0f} / {r['tiles'][t]['ws_next_us']:.0f}"
            if t in r["tiles"]
            else "–"
            for t in tiles
        ]
        print(f"| {r['M']} | {r['shape']} | {r['bf16_us']:.0f} | {r['triton_next_us']:.0f} | "
              f"{r['quantize_us']:.0f} | " + " | ".join(cells) + f" | {r['picked']} |")  # fmt: skip
    print("(tile cells: µs of the GEMM writing 16 bits / writing the next layer's codes)")
    for r in rows:
        for key in ("triton_next", "ws_next"):
            if key + "_fast_rcp_us" in r:
                print(f"M {r['M']} {r['shape']} {key}: {r[key + '_us_again']:.1f} µs, with "
                      f"FAST_RCP {r[key + '_fast_rcp_us']:.1f}, the same bytes: "
                      f"{r[key + '_fast_rcp_same_bytes']}")  # fmt: skip
    print(f"-> {path}")


if __name__ == "__main__":
    main()
