"""svdquant: 4-bit weights and activations for diffusion models (SVDQuant).

The public API::

    quantize_linear(linear, calib_inputs, fmt="int4", rank=32, alpha=None, gptq=False,
                    method="svdquant") -> SVDQLinear
    SVDQLinear                  # the quantized layer; .dequantize() gives its weight
    save_quantized(module, path) / load_quantized(path, model=None)
    quantize_model(model, calibration, QuantizeConfig(...))   # a whole diffusers model
    load_lora / set_lora_strength / unload_lora / list_loras    # LoRAs, no requantization
    fuse_projections(model) / unfuse_projections(model)       # q/k/v as one layer (FLUX)
    cuda_graphed(module)        # its forward replayed from CUDA graphs (no compilation)
    keep_host_copy(module)      # CPU offload from pinned host copies, no copies back
    keep_fp8_weights(model)     # speed for memory: no per-step widen of the 4-bit weights
"""

from svdquant.algorithm import METHODS, quantize_linear
from svdquant.checkpoint import CheckpointError, load_quantized, save_quantized
from svdquant.cuda_graph import cuda_graphed
from svdquant.formats import FORMATS
from svdquant.fuse import fuse_projections, unfuse_projections
from svdquant.lora import list_loras, load_lora, set_lora_strength, unload_lora
from svdquant.nn import SVDQLinear, keep_fp8_weights
from svdquant.offload import keep_host_copy
from svdquant.quantize_model import QuantizeConfig, quantize_model

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "METHODS",
    "CheckpointError",
    "QuantizeConfig",
    "SVDQLinear",
    "cuda_graphed",
    "fuse_projections",
    "keep_fp8_weights",
    "keep_host_copy",
    "list_loras",
    "load_lora",
    "load_quantized",
    "quantize_linear",
    "quantize_model",
    "save_quantized",
    "set_lora_strength",
    "unfuse_projections",
    "unload_lora",
]
