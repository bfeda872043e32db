"""Image metrics between a 16-bit model's images and the quantized model's, from
well-kept libraries (torchmetrics). Metrics that need network weights are computed only
where those weights are already on disk; otherwise they are skipped with a message that
says what to provide. Nothing is ever downloaded.

Images are float tensors [B, 3, H, W] in [0, 1].
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["image_metrics"]

# torchvision's file name of the ImageNet AlexNet that LPIPS is built on
_ALEXNET = "alexnet-owt-7be5be79.pth"
# torch-fidelity's file name of the FID Inception network
_INCEPTION = "weights-inception-2015-12-05-6726825d.pth"


def psnr_ssim(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB, capped at 100 for identical images) and SSIM."""
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    psnr = peak_signal_noise_ratio(test, ref, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(test, ref, data_range=1.0)
    return {"psnr": psnr.clamp_max(100.0).mean().item(), "ssim": float(ssim)}


def _lpips(ref: torch.Tensor, test: torch.Tensor) -> float | str:
    if importlib.util.find_spec("torchvision") is None:
        return "skipped: LPIPS needs torchvision and its AlexNet weights (not installed)"
    hub = Path(torch.hub.get_dir()) / "checkpoints" / _ALEXNET
    if not hub.is_file():
        return f"skipped: LPIPS needs the AlexNet weights at {hub} (not downloaded here)"
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    return float(metric(test.float().cpu(), ref.float().cpu()))


def _fid(ref: torch.Tensor, test: torch.Tensor) -> float | str:
    if importlib.util.find_spec("torch_fidelity") is None:
        return "skipped: FID needs torch-fidelity and its Inception weights (not installed)"
    weights = (
        Path(torch.hub.get_dir()) / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    )
    if not weights.is_file():
        return f"skipped: FID needs the Inception weights at {weights} (not downloaded here)"
    if ref.shape[0] < 2:
        return "skipped: FID needs at least 2 images per set"
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(normalize=True)
    fid.update(ref.float().cpu(), real=True)
    fid.update(test.float().cpu(), real=False)
    return float(fid.compute())


def _clip(test: torch.Tensor, prompts: list[str], clip_model: str | None) -> float | str:
    if not clip_model:
        return "skipped: CLIP score needs local CLIP weights (--clip-model DIR)"
    if not os.path.isdir(clip_model):
        return f"skipped: no CLIP model directory at {clip_model}"
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=clip_model)
    return float(metric((test.float().cpu() * 255).to(torch.uint8), prompts))


def image_metrics(
    ref: torch.Tensor,
    test: torch.Tensor,
    prompts: list[str] | None = None,
    *,
    clip_model: str | None = None,
) -> dict[str, float | str]:
    """PSNR, SSIM, LPIPS, FID (``test`` against ``ref`` as the reference set) and the CLIP
    score of ``test``. A metric that cannot run here holds a string saying why."""
    if ref.shape != test.shape:
        raise ValueError(f"image sets differ in shape: {tuple(ref.shape)} vs {tuple(test.shape)}")
    out: dict[str, float | str] = dict(psnr_ssim(ref, test))
    out["lpips"] = _lpips(ref, test)
    out["fid"] = _fid(ref, test)
    out["clip_score"] = _clip(test, prompts or [], clip_model)
    return out
