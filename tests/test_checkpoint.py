"""Checkpoints: round trips, meta-device loading, and every way a file can be wrong."""

import json
import struct

import pytest
import safetensors.torch
import torch
from torch import nn

import svdquant
from svdquant import CheckpointError, SVDQLinear, load_quantized, save_quantized
from svdquant.checkpoint import FILENAME


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 40), nn.LayerNorm(40))


def _quantized(fmt: str = "int4") -> nn.Module:
    model = _model()
    x = torch.randn(32, 48)
    h = model[1](model[0](x))
    model[0] = svdquant.quantize_linear(model[0], x, fmt=fmt, rank=4)
    model[2] = svdquant.quantize_linear(model[2], h, fmt=fmt, rank=4)
    return model


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_layer_round_trip(tmp_path, fmt):
    q = _quantized(fmt)[0]
    file = save_quantized(q, tmp_path / "layer")
    assert file == tmp_path / "layer" / FILENAME
    r = load_quantized(tmp_path / "layer")
    assert isinstance(r, SVDQLinear) and r.config() == q.config()
    for k, v in q.state_dict().items():
        a, b = r.state_dict()[k].reshape(-1), v.reshape(-1)
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), k
    x = torch.randn(5, 48)
    assert torch.equal(r(x), q(x))


def test_model_round_trip_into_a_meta_model(tmp_path):
    q = _quantized()
    save_quantized(q, tmp_path / "m.safetensors")
    with torch.device("meta"):
        shell = _model()  # 16-bit architecture, no memory
    loaded = load_quantized(tmp_path / "m.safetensors", shell)
    assert isinstance(loaded[0], SVDQLinear) and isinstance(loaded[2], SVDQLinear)
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    x = torch.randn(7, 48)
    assert torch.equal(loaded(x), q(x))


def test_save_refuses_a_model_without_quantized_layers(tmp_path):
    with pytest.raises(ValueError, match="no SVDQLinear"):
        save_quantized(_model(), tmp_path)


def _saved(tmp_path) -> tuple:
    q = _quantized()
    return q, save_quantized(q, tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no svdquant checkpoint"):
        load_quantized(tmp_path / "nothing")


@pytest.mark.parametrize("keep", [4, 100, -50])
def test_truncated_file_names_the_file(tmp_path, keep):
    _, file = _saved(tmp_path)
    data = file.read_bytes()
    file.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=str(file).replace("/", ".")) as e:
        load_quantized(file, _model())
    if keep < 0:
        assert "tensor" in str(e.value)  # names the tensor that runs past the end


def test_flipped_bytes_name_the_tensor(tmp_path):
    _, file = _saved(tmp_path)
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF  # inside the data of the last tensor
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensor '.*' is corrupt"):
        load_quantized(file, _model())


def _rewrite(file, fn_tensors=None, fn_meta=None):
    tensors = safetensors.torch.load_file(file)
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        meta = json.loads(fh.read(n))["__metadata__"]
    cfg = json.loads(meta["svdquant"])
    if fn_tensors:
        fn_tensors(tensors)
    if fn_meta:
        fn_meta(cfg)
    safetensors.torch.save_file(tensors, file, metadata={"svdquant": json.dumps(cfg)})


def test_missing_tensor(tmp_path):
    _, file = _saved(tmp_path)
    _rewrite(file, lambda t: t.pop("2.smooth"))
    with pytest.raises(CheckpointError, match=r"tensor '2\.smooth' is missing"):
        load_quantized(file, _model())


def test_extra_tensor(tmp_path):
    _, file = _saved(tmp_path)
    _rewrite(file, lambda t: t.update({"5.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor '5\.weight'"):
        load_quantized(file, _model())


def test_wrong_dtype(tmp_path):
    _, file = _saved(tmp_path)

    def to_bf16(t):
        t["0.wscales"] = t["0.wscales"].bfloat16()

    _rewrite(file, to_bf16, lambda c: c.pop("crc32"))
    with pytest.raises(CheckpointError, match=r"tensor '0.wscales' is torch.bfloat16"):
        load_quantized(file, _model())


def test_newer_format_version(tmp_path):
    _, file = _saved(tmp_path)
    _rewrite(file, fn_meta=lambda c: c.update(format_version=99))
    with pytest.raises(CheckpointError, match="version 99 is newer"):
        load_quantized(file, _model())


def test_checkpoint_of_another_model(tmp_path):
    _, file = _saved(tmp_path)
    other = nn.Sequential(nn.Linear(48, 64), nn.GELU(), nn.Linear(64, 41))
    with pytest.raises(CheckpointError, match=r"'2' is .* another model"):
        load_quantized(file, other)
    with pytest.raises(CheckpointError, match="'2' does not exist"):
        load_quantized(file, nn.Sequential(nn.Linear(48, 64)))
    with pytest.raises(CheckpointError, match="pass `model=`"):
        load_quantized(file)


def test_not_an_svdquant_file(tmp_path):
    file = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, file)
    with pytest.raises(CheckpointError, match="not an svdquant checkpoint"):
        load_quantized(file)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    q, file = _saved(tmp_path)
    before = file.read_bytes()

    def dies_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("svdquant.checkpoint.save_file", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(q, tmp_path)
    assert file.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [FILENAME]  # no temp file left behind
    load_quantized(file, _model())
