"""The SVDQuant algorithm: calibration statistics, smoothing, low-rank branch, GPTQ."""

from svdquant.algorithm.calibration import ActivationStats, observe
from svdquant.algorithm.gptq import gptq_quantize
from svdquant.algorithm.lowrank import low_rank
from svdquant.algorithm.quantize import ALPHA_GRID, METHODS, quantize_from_stats, quantize_linear
from svdquant.algorithm.smooth import smooth_scales

__all__ = [
    "ALPHA_GRID",
    "METHODS",
    "ActivationStats",
    "gptq_quantize",
    "low_rank",
    "observe",
    "quantize_from_stats",
    "quantize_linear",
    "smooth_scales",
]
