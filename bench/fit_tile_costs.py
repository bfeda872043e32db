"""Fit ``gemm_ws.TILE_COSTS`` to a ``bench/probe_ws_tiles.py`` run, and check the fit.

Per tile, least squares (relative: each point weighted by 1 / its time) of the measured
µs against ``c + waves · (a + b · K)``, waves = ⌈tiles / multiprocessors⌉ (each program
of the persistent grid walks that many tiles). Then, at every shape of the fitted run and
of each ``--check`` run (out of sample), the tile the model picks against the fastest
measured among the fitted tiles: how often it is the fastest, and what picking it loses.

    PYTHONPATH=src python bench/fit_tile_costs.py bench/results/probe_ws_tiles-…-v45-pingpong.json \
        [--tiles 128x256x3x8,128x128x4x4pp,...] [--check other.json] [--sms 132]

CPU only; prints the dict to paste into ``gemm_ws.TILE_COSTS``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import numpy as np

from svdquant.kernels.gemm_ws import Tile, tile_cost, tile_name

#: The tiles fitted by default: the ones that were fastest somewhere in v45's probe.
DEFAULT_TILES = "128x256x3x8,128x128x4x4,64x128x6x4,128x128x4x4pp,64x128x6x4pp"


def parse_tile(name: str) -> Tile:
    """A probe's tile name as ``gemm_ws``'s tile (``gemm_ws.tile_name``'s inverse); v44's
    names carried a fifth field, programs a multiprocessor (only ``x1``, one program, is
    a tile the kernel launches)."""
    pp = name.endswith("pp")
    fields = [int(v) for v in name.removesuffix("pp").split("x")]
    if len(fields) == 5 and fields.pop() != 1:
        raise ValueError(f"{name}: two programs a multiprocessor, not a gemm_ws tile")
    return (*fields, 2 if pp else 1)


def _canonical(tiles: dict) -> dict:
    """A row's tiles under today's names (v44's runs named them with a fifth field)."""
    out = {}
    for name, v in tiles.items():
        with contextlib.suppress(ValueError):  # two programs a multiprocessor: gone
            out[tile_name(parse_tile(name))] = v
    return out


def _timings(rows: list[dict], names: list[str]) -> list[tuple[int, int, int, dict]]:
    """(M, N, K, {tile name: µs}) per shape, the tiles of ``names`` that ran and agreed
    with the reference (as the probe's ``best`` takes them)."""
    out = []
    for r in rows:
        tiles = _canonical(r["tiles"])
        ok = 1.01 * min((v["err"] for v in tiles.values() if "err" in v), default=0.0)
        t = {
            n: tiles[n]["us"]
            for n in names
            if "us" in tiles.get(n, {}) and tiles[n]["err"] <= max(4e-3, ok)
        }
        out.append((r["M"], r["N"], r["K"], t))
    return out


def fit(rows: list[dict], names: list[str], sms: int) -> dict[str, tuple[float, float, float]]:
    """(c, a, b) per tile name, least squares relative to each point's time."""
    costs = {}
    for name in names:
        tile = parse_tile(name)
        pts = [(m, n, k, t[name]) for m, n, k, t in _timings(rows, [name]) if name in t]
        if len(pts) < 3:
            raise SystemExit(f"{name}: {len(pts)} timed shapes, need 3 to fit")
        # the model is linear in (c, a, b): its value at (1, 0, 0), (0, 1, 0), (0, 0, 1)
        a = np.array([[tile_cost(e, tile, m, n, k, sms) for e in np.eye(3)] for m, n, k, _ in pts])
        y = np.array([p[3] for p in pts])
        a = a / y[:, None]
        c, aa, b = np.linalg.lstsq(a, np.ones_like(y), rcond=None)[0]
        costs[name] = (round(float(c), 3), round(float(aa), 3), round(float(b), 6))
    return costs


def check(rows: list[dict], costs: dict, sms: int) -> dict:
    """At each shape: the model's pick among the fitted tiles against the fastest
    measured of them. Returns counts and the worst loss."""
    hits, within3, worst, n_shapes = 0, 0, (1.0, None), 0
    for m, n, k, t in _timings(rows, list(costs)):
        if not t:
            continue
        n_shapes += 1

        pick = min(t, key=lambda name, m=m, n=n, k=k: tile_cost(costs[name], parse_tile(name),
                                                                m, n, k, sms))  # fmt: skip
        best = min(t, key=t.get)
        loss = t[pick] / t[best]
        hits += pick == best
        within3 += loss <= 1.03
        if loss > worst[0]:
            worst = (loss, f"M={m} N={n} K={k}: {pick} {t[pick]:.1f} vs {best} {t[best]:.1f}")
    return {"shapes": n_shapes, "fastest": hits, "within_3pct": within3, "worst": worst}


def _rows(path: str) -> list[dict]:
    """A probe run's rows, or a one-line reason why not."""
    try:
        return json.loads(Path(path).read_text())["rows"]
    except FileNotFoundError:
        raise SystemExit(f"fit_tile_costs: no such run {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SystemExit(f"fit_tile_costs: {path} is not a probe_ws_tiles run ({e})") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a probe_ws_tiles JSON to fit")
    p.add_argument("--tiles", default=DEFAULT_TILES)
    p.add_argument("--check", action="append", default=[], help="a run to check against")
    p.add_argument("--sms", type=int, default=132, help="the GPU's multiprocessors")
    a = p.parse_args(argv)
    names = a.tiles.split(",")
    rows = _rows(a.run)
    costs = fit(rows, names, a.sms)
    print("TILE_COSTS = {")
    for name, abc in costs.items():
        print(f"    {parse_tile(name)}: {abc},")
    print("}")
    print("in sample:", check(rows, costs, a.sms))
    for path in a.check:
        print(path, check(_rows(path), costs, a.sms))


if __name__ == "__main__":
    main()
