"""How fast can a model's host weights become pinned? ``keep_host_copy``'s first image.

    PYTHONPATH=src python bench/probe_pin.py [--gib 4] [--tensor-mib 24] [--out DIR]

``svdquant.keep_host_copy`` pins a model's weights on its first move to the GPU by
copying each into new page-locked memory (``Tensor.pin_memory``): under offload the
first image of FLUX.1-dev with its T5-XXL took 4 s longer than without (v39, 16 GB),
every later one 4.0x shorter. Page-locking the memory the weights already occupy
(``cudaHostRegister``) would skip the allocation and the copy. This probe times, on
``--gib`` GiB of host tensors of ``--tensor-mib`` MiB each (a model's weights), in one run:

- ``pin_memory``: a pinned copy of every tensor (what ``keep_host_copy`` does);
- ``host_register``: ``cudaHostRegister`` of every tensor's memory in place, then
  ``cudaHostUnregister`` (timed apart);
- the copy to the GPU from each (``non_blocking``, synchronized), and from the pageable
  tensors, in GB/s.

Writes ``probe_pin-<date>.json`` under ``--out`` (default ``bench/results``, or ``$OUT``)
and prints a table. GPU only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def _timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _to_gpu(tensors: list[torch.Tensor], out: list[torch.Tensor]) -> None:
    for t, o in zip(tensors, out, strict=True):
        o.copy_(t, non_blocking=True)


def _register(tensors: list[torch.Tensor]) -> None:
    cudart = torch.cuda.cudart()
    for t in tensors:
        err = cudart.cudaHostRegister(t.data_ptr(), t.untyped_storage().nbytes(), 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister failed: error {int(err)}")


def _unregister(tensors: list[torch.Tensor]) -> None:
    cudart = torch.cuda.cudart()
    for t in tensors:
        cudart.cudaHostUnregister(t.data_ptr())


def probe(gib: float, tensor_mib: int) -> dict:
    """The row of timings for ``gib`` GiB in tensors of ``tensor_mib`` MiB."""
    n = max(1, int(gib * 1024 / tensor_mib))
    numel = tensor_mib * 2**20 // 2
    host = [torch.randn(numel).to(torch.bfloat16) for _ in range(n)]
    nbytes = sum(t.numel() * t.element_size() for t in host)
    dev = [torch.empty_like(t, device="cuda") for t in host]
    gb = nbytes / 1e9
    row: dict = {"tensors": n, "bytes": nbytes}
    row["pageable_to_gpu_gbps"] = gb / _timed(lambda: _to_gpu(host, dev))
    pinned: list[torch.Tensor] = []
    row["pin_memory_s"] = _timed(lambda: pinned.extend(t.pin_memory() for t in host))
    row["pinned_to_gpu_gbps"] = gb / _timed(lambda: _to_gpu(pinned, dev))
    pinned.clear()  # the pinned copies go back to PyTorch's host cache
    row["host_register_s"] = _timed(lambda: _register(host))
    row["registered_is_pinned"] = bool(host[0].is_pinned())
    row["registered_to_gpu_gbps"] = gb / _timed(lambda: _to_gpu(host, dev))
    row["host_unregister_s"] = _timed(lambda: _unregister(host))
    row["equal"] = all(torch.equal(t, d.cpu()) for t, d in zip(host[:2], dev[:2], strict=True))
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=4.0)
    p.add_argument("--tensor-mib", type=int, default=24, help="one weight's MiB (FLUX: 18-72)")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_pin: needs a CUDA GPU (pinned memory is a CUDA host feature)")
    from gemm import run_info, write_result

    row = probe(args.gib, args.tensor_mib)
    result = {**run_info(), "gib": args.gib, "tensor_mib": args.tensor_mib, "row": row}
    print("| what | value |\n|---|---|")
    for k, v in row.items():
        print(f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |")
    print("->", write_result(result, args.out, "probe_pin"))
    return result


if __name__ == "__main__":
    main()
