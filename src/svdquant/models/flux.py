"""FLUX.1 (dev and schnell): ``FluxTransformer2DModel``.

12B parameters in 19 double-stream blocks (image and text streams, joint attention) and
38 single-stream blocks (one stream; attention and MLP in parallel on the same input).
"""

from svdquant.models.base import ModelAdapter

FLUX = ModelAdapter(
    name="flux",
    class_name="FluxTransformer2DModel",
    component="transformer",
    description="FLUX.1 dev / schnell transformer",
    keep=(
        (
            r"time_text_embed\..*",
            "timestep/guidance/pooled-text embedders: M = batch, tiny, "
            "and their output conditions every block (the paper keeps embedders 16-bit)",
        ),
        (
            r"context_embedder",
            "text embedder (T5 features -> width): the paper keeps "
            "embedders 16-bit; runs once per step, 0.1% of the weights",
        ),
        (
            r"x_embedder",
            "patch embedder: K = 64 latent channels, too narrow for 4-bit "
            "groups to pay off; the paper keeps it 16-bit",
        ),
        (
            r"proj_out",
            "final projection to the velocity: its error goes straight into the "
            "output; the paper keeps it 16-bit",
        ),
    ),
    w4a16=(
        (
            r"transformer_blocks\.\d+\.norm1(_context)?\.linear",
            "AdaLayerNormZero modulation: "
            "its activations are SiLU(temb) at M = batch and its outputs scale every token, so "
            "activations stay 16-bit; the weights (3072 -> 18432, ~3.2B parameters over the "
            "model) must be 4-bit or the model stays at 11 GB",
        ),
        (
            r"single_transformer_blocks\.\d+\.norm\.linear",
            "AdaLayerNormZeroSingle modulation: same reason",
        ),
        (r"norm_out\.linear", "AdaLayerNormContinuous modulation of the output: same reason"),
    ),
    shared_inputs=(
        # single blocks: attention q/k/v and the MLP's up projection read the same norm output
        r"(single_transformer_blocks\.\d+)\.(?:attn\.to_[qkv]|proj_mlp)",
        r"(transformer_blocks\.\d+\.attn)\.to_[qkv]",  # image stream
        r"(transformer_blocks\.\d+\.attn)\.add_[qkv]_proj",  # text stream
    ),
)
