"""Quantize a full-size FLUX.1-dev transformer (real config, random weights) and report
the time it takes and the checkpoint size against bf16.

    python bench/flux_quantize.py --out-json results.json [--tiny] [--prompts 4]

Calibration is synthetic: the transformer runs on random latents and text features (1024
x 1024 image: 4096 image tokens, 512 text tokens) at several timesteps. Random weights
have no outliers, so this measures time and memory, not quality. ``--tiny`` builds a
2-layer model so the script can be checked on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import tempfile
import time

import torch

FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TINY = dict(FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6))  # fmt: skip


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    from diffusers import FluxTransformer2DModel

    import svdquant
    from svdquant.pipeline import save_pretrained_quantized

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--prompts", type=int, default=4, help="synthetic calibration runs")
    p.add_argument("--out-json", default=None)
    p.add_argument("--fmt", default="int4")
    args = p.parse_args()

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TINY if args.tiny else FLUX_DEV
    img_tokens, txt_tokens = (64, 16) if args.tiny else (4096, 512)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = FluxTransformer2DModel(**cfg).eval()
    torch.set_default_dtype(torch.float32)
    build_s = time.perf_counter() - t0
    bf16_bytes = _nbytes(model.state_dict().values())
    n_params = sum(p.numel() for p in model.parameters())

    g = torch.Generator(dev).manual_seed(1)

    def calibration(m: torch.nn.Module) -> None:
        for i in range(args.prompts):
            m(
                hidden_states=torch.randn(1, img_tokens, 64, generator=g, device=dev).bfloat16(),
                encoder_hidden_states=torch.randn(
                    1, txt_tokens, cfg["joint_attention_dim"], generator=g, device=dev
                ).bfloat16(),
                pooled_projections=torch.randn(
                    1, cfg["pooled_projection_dim"], generator=g, device=dev
                ).bfloat16(),
                timestep=torch.tensor([(i + 0.5) / args.prompts], device=dev),
                guidance=torch.tensor([3.5], device=dev),
                img_ids=torch.zeros(img_tokens, 3, device=dev),
                txt_ids=torch.zeros(txt_tokens, 3, device=dev),
                return_dict=False,
            )

    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    svdquant.quantize_model(model, calibration, svdquant.QuantizeConfig(fmt=args.fmt))
    if dev == "cuda":
        torch.cuda.synchronize()
    quant_s = time.perf_counter() - t0
    peak_gpu = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    q_bytes = _nbytes(model.state_dict().values())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save_pretrained_quantized(model, tmp)
        save_s = time.perf_counter() - t0
        file_bytes = os.path.getsize(os.path.join(tmp, "svdquant.safetensors"))
    n_q = sum(isinstance(m, svdquant.SVDQLinear) for m in model.modules())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    # the device's copy of the tree has no .git: the caller passes the commit
    commit_id = commit.stdout.strip() if commit.returncode == 0 else os.environ.get("GIT_COMMIT")
    res = {
        "bench": "flux_quantize",
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit_id,
        "torch": torch.__version__,
        "config": "tiny" if args.tiny else "FLUX.1-dev",
        "fmt": args.fmt,
        "params": n_params,
        "quantized_layers": n_q,
        "calibration_runs": args.prompts,
        "build_s": round(build_s, 1),
        "quantize_s": round(quant_s, 1),
        "save_s": round(save_s, 1),
        "peak_gpu_bytes": peak_gpu,
        "bf16_bytes": bf16_bytes,
        "quantized_bytes": q_bytes,
        "checkpoint_file_bytes": file_bytes,
        "ratio_bf16_over_quantized": round(bf16_bytes / q_bytes, 3),
    }
    print(json.dumps(res, indent=1))
    print("| params | layers | quantize | bf16 | svdquant file | ratio |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {n_params / 1e9:.2f}B | {n_q} | {quant_s:.0f} s | {bf16_bytes / 2**30:.2f} GiB | "
        f"{file_bytes / 2**30:.2f} GiB | {bf16_bytes / q_bytes:.2f}x |"
    )
    if args.out_json:
        with open(args.out_json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
