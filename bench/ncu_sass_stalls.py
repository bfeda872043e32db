"""Where a kernel's warps stall, from Nsight Compute's per-instruction source page.

Reads ``ncu -i REPORT --page source --csv --print-source sass`` (plain or gzipped) and,
for each profiled launch of ``--kernel``, groups its SASS instructions by how many times
each was executed — instructions of one loop or one epilogue run equally often — and
prints each group's share of the warp stall samples, its instruction count and its top
stall reasons; then the opcode mix of the group given by ``--ops`` (an execution count).
For NOTES.md: e.g. how much of the MMA warps' time a GEMM's epilogue takes against its K
loop, and what the epilogue's instructions are.

    python bench/ncu_sass_stalls.py bench/results/ncu-…-sass.csv.gz \
        [--kernel _fp8_gemm_ws_kernel] [--ops 13824]
"""

from __future__ import annotations

import argparse
import collections
import csv
import gzip
import io
from pathlib import Path

SAMPLES = "Warp Stall Sampling (All Samples)"


def launches(path: Path) -> list[tuple[str, list[dict]]]:
    """(kernel name, its instruction rows) for every launch in the page."""
    raw = path.read_bytes()
    text = gzip.decompress(raw).decode() if raw[:2] == b"\x1f\x8b" else raw.decode()
    out: list[tuple[str, list[dict]]] = []
    header: list[str] = []
    for row in csv.reader(io.StringIO(text)):
        if not row:
            continue
        if row[0] == "Kernel Name":
            out.append((row[1], []))
        elif row[0] == "Address":
            header = row
        elif out and header:
            out[-1][1].append(dict(zip(header, row, strict=False)))
    return out


def _int(v: str | None) -> int:
    return int(float(v)) if v else 0


def summary(rows: list[dict], top: int = 10) -> list[dict]:
    """Per execution count: instructions, share of stall samples, top stall reasons."""
    total = sum(_int(r.get(SAMPLES)) for r in rows) or 1
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    groups: dict[int, list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups[_int(r.get("Instructions Executed"))].append(r)
    out = []
    for ex, rs in groups.items():
        samples = sum(_int(r.get(SAMPLES)) for r in rs)
        why = collections.Counter({k[6:]: sum(_int(r.get(k)) for r in rs) for k in reasons})
        top3 = {k: v / max(samples, 1) for k, v in why.most_common(3)}
        out.append({"executed": ex, "instructions": len(rs), "share": samples / total,
                    "reasons": top3})  # fmt: skip
    return sorted(out, key=lambda g: -g["share"])[:top]


def opcodes(rows: list[dict], executed: int) -> collections.Counter:
    """The opcode mix of the instructions executed ``executed`` times."""
    mix: collections.Counter = collections.Counter()
    for r in rows:
        if _int(r.get("Instructions Executed")) == executed:
            words = r["Source"].split()
            words = words[1:] if words and words[0].startswith("@") else words
            if words:
                mix[words[0]] += 1
    return mix


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page", type=Path, help="ncu's --page source --csv output (.csv or .csv.gz)")
    p.add_argument("--kernel", default="_fp8_gemm_ws_kernel")
    p.add_argument("--ops", type=int, default=None, help="an execution count: its opcode mix")
    a = p.parse_args(argv)
    if not a.page.is_file():
        raise SystemExit(f"no such file: {a.page}")
    found = [(name, rows) for name, rows in launches(a.page) if name == a.kernel and rows]
    if not found:
        raise SystemExit(f"no launch of {a.kernel!r} in {a.page}")
    for i, (_, rows) in enumerate(found):
        print(f"{a.kernel} launch {i}: {len(rows)} instructions")
        for g in summary(rows):
            why = ", ".join(f"{k} {v:.0%}" for k, v in g["reasons"].items())
            print(f"  executed {g['executed']:>8}: {g['instructions']:>5} instructions, "
                  f"{g['share']:6.1%} of the stall samples ({why})")  # fmt: skip
        if a.ops is not None:
            mix = opcodes(rows, a.ops)
            print(f"  executed {a.ops}: {sum(mix.values())} instructions — "
                  + ", ".join(f"{op} {n}" for op, n in mix.most_common(16)))  # fmt: skip


if __name__ == "__main__":
    main()
