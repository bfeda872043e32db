"""PixArt-Σ (and PixArt-α): ``PixArtTransformer2DModel``, a 0.6B DiT with AdaLN-single
(one modulation MLP shared by every block) and T5 cross-attention."""

from svdquant.models.base import ModelAdapter

PIXART = ModelAdapter(
    name="pixart",
    class_name="PixArtTransformer2DModel",
    component="transformer",
    description="PixArt-Σ / PixArt-α transformer",
    keep=(
        (
            r"adaln_single\..*",
            "AdaLN-single: the timestep embedder and the one modulation "
            "linear shared by all blocks (M = batch, ~1% of the weights); its output scales "
            "every token of every block",
        ),
        (r"caption_projection\..*", "T5 caption embedder: the paper keeps embedders 16-bit"),
        (
            r"proj_out",
            "final projection to the noise/variance: error goes straight into the "
            "output; the paper keeps it 16-bit",
        ),
    ),
    shared_inputs=(
        r"(.*\.attn1)\.to_[qkv]",  # self-attention: q/k/v read the modulated norm output
        r"(.*\.attn2)\.to_[kv]",  # cross-attention: k/v read the caption embeddings
    ),
)
