"""The method table of README.md: one linear layer with planted outliers, every method.

    python bench/planted_outliers.py [--json out.json]

Relative output error ‖y_q − y‖ / ‖y‖ on 1024 held-out inputs, after calibrating on
2048 tokens (the same layer and data as tests/test_algorithm.py). CPU, a few seconds.
"""

from __future__ import annotations

import argparse
import json

import torch

import svdquant
from svdquant.testing import planted_outlier_inputs, planted_outlier_layer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    layer = planted_outlier_layer()
    g = torch.Generator().manual_seed(1)
    calib = [planted_outlier_inputs(256, generator=g) for _ in range(8)]
    x = planted_outlier_inputs(1024, generator=torch.Generator().manual_seed(2))
    y = layer(x).detach()
    rows = []
    for fmt in ("int4", "nvfp4"):
        for method in svdquant.METHODS:
            for gptq in (False, True) if method == "svdquant" else (False,):
                q = svdquant.quantize_linear(layer, calib, fmt=fmt, method=method, gptq=gptq)
                err = ((q(x) - y).norm() / y.norm()).item()
                name = method + (" + GPTQ" if gptq else "")
                rows.append({"fmt": fmt, "method": name, "alpha": q.alpha, "rel_error": err})
    print("| format | method | α | relative output error |\n|---|---|---|---|")
    for r in rows:
        alpha = "–" if r["alpha"] == 0 and "smooth" not in r["method"] else r["alpha"]
        print(f"| {r['fmt']} | {r['method']} | {alpha} | {r['rel_error']:.4f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
