"""An interrupted model quantization resumes from its partial directory."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

from svdquant.models.tiny import tiny_call_kwargs, tiny_pipeline
from svdquant.pipeline import denoiser, pipeline_calibration
from svdquant.quantize_model import QuantizeConfig, quantize_model

# the module (``svdquant.quantize_model`` the attribute is the function of the same name)
qm = importlib.import_module("svdquant.quantize_model")
PROMPTS = ["a cat on a sofa", "a red fox in the snow"]


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    pipe = tiny_pipeline("pixart")
    pipe.set_progress_bar_config(disable=True)
    kwargs = {**tiny_call_kwargs("pixart"), "num_inference_steps": 1}
    _, model = denoiser(pipe)
    calib = pipeline_calibration(pipe, PROMPTS, progress=False, **kwargs)
    return model, calib


CFG = dict(rank=4, progress=False, max_samples=64)


def test_interrupted_quantization_resumes(setup, tmp_path, monkeypatch):
    model, calib = setup
    full = quantize_model(copy.deepcopy(model), calib, QuantizeConfig(**CFG))

    real = qm._quantize_group
    calls = []

    def dies_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(qm, "_quantize_group", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(copy.deepcopy(model), calib, QuantizeConfig(**CFG), resume_dir=tmp_path)
    assert len(list(tmp_path.glob("group-*.safetensors"))) == 3

    monkeypatch.setattr(qm, "_quantize_group", lambda *a, **k: calls.append(1) or real(*a, **k))
    calls.clear()
    resumed = quantize_model(
        copy.deepcopy(model), calib, QuantizeConfig(**CFG), resume_dir=tmp_path
    )
    n_groups = len(list(tmp_path.glob("group-*.safetensors")))
    assert len(calls) == n_groups - 3  # only the groups not done before
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n

    # all done: a third run quantizes nothing and does not even calibrate
    calls.clear()
    ran = []
    quantize_model(
        copy.deepcopy(model), lambda m: ran.append(1), QuantizeConfig(**CFG), resume_dir=tmp_path
    )
    assert not calls and not ran


def test_partial_directory_of_another_config_is_refused(setup, tmp_path):
    model, calib = setup
    quantize_model(copy.deepcopy(model), calib, QuantizeConfig(**CFG), resume_dir=tmp_path)
    with pytest.raises(ValueError, match="another model or config"):
        quantize_model(
            copy.deepcopy(model), calib, QuantizeConfig(**{**CFG, "rank": 2}), resume_dir=tmp_path
        )


def test_a_damaged_group_file_is_redone(setup, tmp_path):
    model, calib = setup
    a = quantize_model(copy.deepcopy(model), calib, QuantizeConfig(**CFG), resume_dir=tmp_path)
    victim = sorted(tmp_path.glob("group-*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:100])
    b = quantize_model(copy.deepcopy(model), calib, QuantizeConfig(**CFG), resume_dir=tmp_path)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), n
