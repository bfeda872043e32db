"""SDXL: ``UNet2DConditionModel`` (2.6B; the transformer blocks hold most linear weights,
the ResNet blocks are 3×3 convolutions)."""

from svdquant.models.base import ModelAdapter

SDXL = ModelAdapter(
    name="sdxl",
    class_name="UNet2DConditionModel",
    component="unet",
    description="SDXL / SD UNet (linear layers of the transformer blocks)",
    keep=(
        (
            r"time_embedding\..*",
            "timestep embedder: M = batch, tiny (the paper keeps embedders 16-bit)",
        ),
        (r"add_embedding\..*", "SDXL's text-time (pooled text + size) embedder: same reason"),
        (
            r".*\.time_emb_proj",
            "per-ResNet timestep projection: M = batch, ~1% of the "
            "weights, and it shifts every pixel of its block",
        ),
        (
            r".*\.attentions\.\d+\.proj_in",
            "Transformer2DModel input projection between the "
            "conv and attention worlds: kept 16-bit as in the paper",
        ),
        (
            r".*\.attentions\.\d+\.proj_out",
            "Transformer2DModel output projection into the residual: kept 16-bit as in the paper",
        ),
    ),
    shared_inputs=(
        r"(.*\.attn1)\.to_[qkv]",  # self-attention
        r"(.*\.attn2)\.to_[kv]",  # cross-attention: k/v read the text embeddings
    ),
    notes=(
        "3×3 convolutions (ResNet blocks, down/up samplers, conv_in/conv_out) stay 16-bit: "
        "this adapter quantizes linear layers only.",
    ),
)
