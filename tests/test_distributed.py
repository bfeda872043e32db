"""Data-parallel calibration with torch.distributed: 2 ranks (gloo, localhost, CPU) give
the same quantized checkpoint as 1 process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from svdquant.algorithm import ActivationStats
from svdquant.models.tiny import tiny_pipeline

pytestmark = pytest.mark.skipif(
    shutil.which("torchrun") is None and not torch.distributed.is_available(),
    reason="torch.distributed is not available",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quantize(base, out, prompts, nproc: int, gptq: bool = False) -> None:
    argv = ["quantize", "--model", str(base), "--out", str(out), "--rank", "8"]
    argv += ["--prompts", str(prompts), "--num-prompts", "4", "--steps", "2"]
    argv += ["--height", "16", "--width", "16", "--dtype", "float32", "--device", "cpu"]
    argv += ["--max-samples", "64"] + (["--gptq"] if gptq else [])
    _run(argv, nproc)


def _run(argv: list[str], nproc: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "svdquant", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        cmd += ["--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
        cmd += ["-m", "svdquant", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("pixart")
    tiny_pipeline("pixart").save_pretrained(base)
    prompts = tmp_path_factory.mktemp("p") / "prompts.txt"
    prompts.write_text("a cat on a sofa\na red fox in the snow\na lighthouse\na bowl of soup\n")
    return base, prompts


@pytest.mark.parametrize("gptq", [False, True])
def test_two_ranks_give_the_one_rank_checkpoint(setup, tmp_path, gptq):
    base, prompts = setup
    _quantize(base, tmp_path / "one", prompts, 1, gptq)
    _quantize(base, tmp_path / "two", prompts, 2, gptq)
    a = load_file(tmp_path / "one" / "svdquant.safetensors")
    b = load_file(tmp_path / "two" / "svdquant.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        if not gptq:  # max, subsample and α search are exact: bit for bit
            assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), k
        elif a[k].dtype == torch.uint8:  # GPTQ sums a Hessian: equal up to summation order
            assert (a[k] != b[k]).float().mean() < 0.01, k
        else:  # a code that flips can move its group's scale: rarely, and not far
            x, y = a[k].float(), b[k].float()
            assert (~torch.isclose(x, y, rtol=1e-2, atol=1e-3)).float().mean() < 0.01, k
            assert torch.allclose(x, y, rtol=0.1, atol=1e-3), k


def _worker(rank: int, port: int, batches: list[torch.Tensor], out: dict) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    st = ActivationStats(32, hessian=True, max_samples=10)
    for b in batches[rank::2]:
        st.update(b)
    st.all_reduce()
    out[rank] = (st.amax, st.hessian, st.samples, st.num_tokens)
    torch.distributed.destroy_process_group()


def test_all_reduce_of_statistics_matches_one_process():
    import torch.multiprocessing as mp

    batches = [torch.randn(7, 32, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    one = ActivationStats(32, hessian=True, max_samples=10)
    for b in batches:
        one.update(b)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), batches, out), nprocs=2)
        results = dict(out)
    for amax, hessian, samples, n in results.values():
        assert torch.equal(amax, one.amax) and torch.equal(samples, one.samples)
        assert torch.allclose(hessian, one.hessian, rtol=1e-5, atol=1e-5)
        assert n == 35


def test_two_ranks_give_the_one_rank_evaluation(setup, tmp_path):
    base, prompts = setup
    _quantize(base, tmp_path / "q", prompts, 1)
    reports = []
    for nproc in (1, 2):
        out = tmp_path / f"eval{nproc}"
        argv = ["eval", "--model", str(base), "--quantized", str(tmp_path / "q")]
        argv += ["--prompts", str(prompts), "--num-images", "3", "--steps", "2", "--out"]
        argv += [str(out), "--height", "16", "--width", "16", "--dtype", "float32"]
        _run([*argv, "--device", "cpu"], nproc)
        reports.append(json.loads((out / "metrics.json").read_text()))
    assert reports[0]["metrics"] == reports[1]["metrics"]  # images sharded, then gathered
    assert reports[1]["ranks"] == 2 and reports[1]["num_images"] == 3
