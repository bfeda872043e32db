"""Tiny, randomly initialised diffusers pipelines of each supported architecture, built
offline from configs (no downloads): for tests, demos and smoke runs of the CLI.

They use the real diffusers and transformers classes (denoiser, text encoders, VAE,
scheduler). The tokenizers are word-level ``PreTrainedTokenizerFast`` built in memory
over the words of the shipped calibration prompts, because the real CLIP/T5/Gemma
tokenizer files are not available offline; the pipelines only need their call API.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from svdquant.prompts import load_prompts

__all__ = ["ARCHITECTURES", "tiny_call_kwargs", "tiny_pipeline", "tiny_tokenizer"]

ARCHITECTURES = ("flux", "pixart", "sdxl", "sana")

_VOCAB = 512
_MAXLEN = 16


def tiny_tokenizer(vocab_size: int = _VOCAB, max_length: int = _MAXLEN) -> Any:
    """A word-level fast tokenizer over the calibration prompts' words (lowercased)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    words: dict[str, int] = {}
    for p in load_prompts():
        for w in re.findall(r"\w+|[^\w\s]", p.lower()):
            words[w] = words.get(w, 0) + 1
    ranked = sorted(words, key=lambda w: (-words[w], w))[: vocab_size - len(specials)]
    vocab = {t: i for i, t in enumerate(specials + ranked)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        bos_token="<s>",
        model_max_length=max_length,
    )


def _clip(hidden: int, projection: int | None = None) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=_MAXLEN,
        projection_dim=projection or hidden,
        bos_token_id=3,
        eos_token_id=1,
        pad_token_id=0,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=_VOCAB,
            d_model=d_model,
            d_ff=2 * d_model,
            d_kv=8,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _vae(latent_channels: int = 4, shift_factor: float | None = None) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=shift_factor,
    )


def tiny_pipeline(arch: str, seed: int = 0) -> Any:
    """A tiny random pipeline of ``arch`` (one of ``ARCHITECTURES``), in fp32 on the CPU,
    every model in eval mode (as ``from_pretrained`` leaves them: no dropout).

    Generate with ``pipe(**tiny_call_kwargs(arch), prompt=...)``.
    """
    pipe = _build(arch, seed)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    return pipe


def _build(arch: str, seed: int) -> Any:
    import diffusers

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    if arch == "flux":
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(8, 8, 16),
        )
        return diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=_vae(4, shift_factor=0.0),
            text_encoder=_clip(32),
            tokenizer=tok,
            text_encoder_2=_t5(32),
            tokenizer_2=tiny_tokenizer(),
            transformer=transformer,
        )
    if arch == "pixart":
        transformer = diffusers.PixArtTransformer2DModel(
            sample_size=8,
            num_layers=2,
            patch_size=1,
            attention_head_dim=32,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=64,
            caption_channels=32,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
        )
        return diffusers.PixArtSigmaPipeline(
            tokenizer=tok,
            text_encoder=_t5(32),
            vae=_vae(4),
            transformer=transformer,
            scheduler=diffusers.DPMSolverMultistepScheduler(),
        )
    if arch == "sdxl":
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
            norm_num_groups=8,
        )
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(4),
            text_encoder=_clip(32),
            text_encoder_2=_clip(32, projection=32),
            tokenizer=tok,
            tokenizer_2=tiny_tokenizer(),
            unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler(),
        )
    if arch == "sana":
        from transformers import Gemma2Config, Gemma2Model

        transformer = diffusers.SanaTransformer2DModel(
            patch_size=1,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=32,
            num_cross_attention_heads=2,
            cross_attention_head_dim=32,
            cross_attention_dim=64,
            caption_channels=32,
            sample_size=8,
        )
        gemma = Gemma2Model(
            Gemma2Config(
                vocab_size=_VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=512,
                pad_token_id=0,
                eos_token_id=1,
                bos_token_id=3,
            )
        )
        vae = diffusers.AutoencoderDC(
            in_channels=3,
            latent_channels=4,
            attention_head_dim=2,
            encoder_block_types=("ResBlock", "EfficientViTBlock"),
            decoder_block_types=("ResBlock", "EfficientViTBlock"),
            encoder_block_out_channels=(8, 8),
            decoder_block_out_channels=(8, 8),
            encoder_qkv_multiscales=((), (5,)),
            decoder_qkv_multiscales=((), (5,)),
            encoder_layers_per_block=(1, 1),
            decoder_layers_per_block=(1, 1),
            downsample_block_type="conv",
            upsample_block_type="interpolate",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            scaling_factor=0.41407,
        )
        tok_long = tiny_tokenizer(max_length=512)
        return diffusers.SanaPipeline(
            tokenizer=tok_long,
            text_encoder=gemma,
            vae=vae,
            transformer=transformer,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHITECTURES}")


def tiny_call_kwargs(arch: str) -> dict[str, Any]:
    """Call arguments that suit ``tiny_pipeline(arch)`` (small images, short prompts)."""
    kw: dict[str, Any] = {"height": 16, "width": 16, "num_inference_steps": 3}
    if arch == "flux":
        kw.update(max_sequence_length=_MAXLEN, guidance_scale=3.5)
    elif arch == "pixart":
        kw.update(max_sequence_length=_MAXLEN, use_resolution_binning=False, clean_caption=False)
    elif arch == "sana":  # SANA wants sizes divisible by 32
        kw.update(
            height=32,
            width=32,
            max_sequence_length=_MAXLEN,
            use_resolution_binning=False,
            complex_human_instruction=None,
            clean_caption=False,
        )
    return kw
