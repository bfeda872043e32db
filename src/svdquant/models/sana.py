"""SANA: ``SanaTransformer2DModel`` (linear attention DiT; its feed-forward GLUMBConv does
its projections with 1×1 convolutions, which we quantize as linear layers)."""

from svdquant.models.base import ModelAdapter

SANA = ModelAdapter(
    name="sana",
    class_name="SanaTransformer2DModel",
    component="transformer",
    description="SANA transformer",
    keep=(
        (
            r"time_embed\..*",
            "AdaLN-single timestep embedder and its shared modulation linear: "
            "M = batch, ~1% of the weights, its output scales every token",
        ),
        (r"caption_projection\..*", "Gemma caption embedder: the paper keeps embedders 16-bit"),
        (r"proj_out", "final projection to the velocity: error goes straight into the output"),
    ),
    shared_inputs=(
        r"(.*\.attn1)\.to_[qkv]",  # linear self-attention: q/k/v read the modulated norm output
        r"(.*\.attn2)\.to_[kv]",  # cross-attention: k/v read the caption embeddings
    ),
    pointwise_convs=(r".*\.ff\.conv_inverted", r".*\.ff\.conv_point"),
    notes=(
        "GLUMBConv's 1×1 convolutions conv_inverted and conv_point become 4-bit linear "
        "layers over channels; its depthwise 3×3 conv_depth and the patch embedder stay "
        "16-bit (not GEMMs).",
    ),
)
