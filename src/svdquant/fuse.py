"""Fused projections: the quantized layers that read one input run as one layer.

A ``QuantGroup`` (``models.base``) quantizes the linears that read the same input with
one smoothing vector, one low-rank down projection and one activation scale, so their
concatenation along N is itself an ``SVDQLinear``. ``fuse_projections`` builds it — for
FLUX.1, each attention's q/k/v (and the text stream's added q/k/v), and in the single
blocks q/k/v together with the MLP's up projection — so the fused engine quantizes the
input once and runs one GEMM with N = 3 · 3072 (or 3 · 3072 + 12288), the wide shapes at
which it is fastest. The GEMM writes each part (q, k, v, mlp) to its own contiguous
tensor (``SVDQLinear.forward_split``): diffusers' own fused path splits one wide output
with ``chunk``, and the strided parts were copied downstream (4.3 ms per FLUX step on
the H100, more than the fusion saved). The numbers are the same as unfused (each output
column is computed from the same quantized input and its own weight row).

Two fusions of the same runtime read activations where they lie: each single block's
``proj_out`` quantizes ``cat([attention output, gelu(mlp)])`` from the two tensors
(``SVDQLinear.forward_cat``: no [tokens, 15360] concatenation and no GELU pass, 6.3 ms of a
FLUX step on an H200 unfused, v15), and each double block's feed-forwards run as fused MLPs
(``kernels.svdq_mlp_triton``: fc1's epilogue writes fc2's quantized input). Both keep the
modules and their state-dict keys; the numbers are the unfused ones up to GELU's fp32
rounding.

It is a runtime transform, applied after loading and after LoRAs (a layer's LoRA rows and
columns are stacked after the fused layer's shared base branch): ``unfuse_projections``
restores the separate layers (the same objects, bit for bit, with their LoRAs), the
attention processors and the blocks, which saving needs (the LoRA calls unfuse and fuse
again around themselves). Supported: FLUX.1 (``FluxAttention``,
``FluxSingleTransformerBlock``) and diffusers' generic ``Attention`` with its default
processor (PixArt-Σ, SDXL, SANA's cross-attention) and SANA's linear self-attention:
q/k/v of a self-attention, k/v of a cross-attention (its q reads another input) — taken
as views of one output where the GEMM cannot write them apart (attention reads strided
rows) — PixArt's GELU-tanh feed-forwards as fused MLPs and SDXL's GEGLU feed-forwards
with the gate in the up projection's epilogue (``kernels.svdq_geglu_triton``: it writes
the down projection's quantized input); and PixArt-Σ's and SANA's blocks (adaLN-single)
run their norms and residual sums through the same one-pass kernels as FLUX's
(``kernels/modulate.py``: four passes a block instead of diffusers' eleven).
"""

from __future__ import annotations

import functools
import types
import warnings
from typing import Any

import torch
from torch import nn

from svdquant.lora import lora_rows
from svdquant.nn import SVDQLinear

__all__ = ["FusedProjection", "fuse_projections", "unfuse_projections"]

#: (fused name, the separate layers) of FLUX's attention modules
_PARTS = (
    ("to_qkv", ("to_q", "to_k", "to_v")),
    ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
)
#: on a fused module: {fused attribute: (original attribute paths, widths)}, and what to
#: restore (the attention processor, the block class)
_FUSED_ATTR = "_svdquant_fused"
_ORIG_PROCESSOR = "_svdquant_processor"
_ORIG_CLASS = "_svdquant_class"


class FusedProjection(nn.Module):
    """Several projections of the same input as one quantized layer: ``forward`` returns
    the parts (widths ``sizes``) as separate contiguous tensors (``contiguous=False``:
    views of one output where the GEMM cannot write them apart, no copy)."""

    def __init__(self, linear: SVDQLinear, sizes: list[int]) -> None:
        super().__init__()
        self.linear = linear
        self.sizes = list(sizes)

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(
        self, x: torch.Tensor, contiguous: bool = True, last_act: str = "none"
    ) -> tuple[torch.Tensor, ...]:
        return self.linear.forward_split(x, self.sizes, contiguous, last_act)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}"


def _fusable(layers: list[nn.Module]) -> str | None:
    """Why ``layers`` cannot be concatenated along N (None if they can)."""
    if not all(isinstance(m, SVDQLinear) for m in layers):
        return "not all quantized"
    a = layers[0]
    for m in layers[1:]:
        if (m.in_features, m.fmt, m.act_fmt, m.rank, m.backend) != (
            a.in_features, a.fmt, a.act_fmt, a.rank, a.backend,
        ):  # fmt: skip
            return "different shapes or formats"
        if (m.bias is None) != (a.bias is None):
            return "bias on some only"
        for name in ("smooth", "act_amax", "wtensor_scale"):
            if not torch.equal(getattr(m, name), getattr(a, name)):
                return f"different {name} (not quantized as one group)"
        if not torch.equal(_base_down(m), _base_down(a)):  # past it: each layer's LoRAs
            return "different lowrank_down (not quantized as one group)"
    reason = _rank_refused(layers)
    if reason is not None and _rank_refusals is not None:
        _rank_refusals[id(layers[0])] = reason
    return reason


#: While ``fuse_projections`` runs: the groups its LoRAs' stacked rank kept apart (by
#: their first layer), for one warning — a user loses the fusion's speed there.
_rank_refusals: dict[int, str] | None = None


def _rank_refused(layers: list[SVDQLinear]) -> str | None:
    """Why the layers' stacked low-rank branches are too wide to fuse (None if not): the
    stacked rank within ``lora.MAX_RANK`` — or, where each part reads only its own LoRA
    columns (``kernels.gemm.LORA_PARTS``), each part's rank within it and the stacked
    columns within ``kernels.gemm.MAX_STACKED_RANK``, the parts split in the GEMM."""
    from svdquant.kernels import gemm
    from svdquant.kernels.ops import splits_in_gemm
    from svdquant.lora import MAX_RANK

    rank = _concat_rank(layers)
    if rank <= MAX_RANK:
        return None
    if not gemm.LORA_PARTS or _shared_extra(layers):
        return f"their LoRAs stacked to rank {rank}, above lora.MAX_RANK = {MAX_RANK}"
    part = layers[0].rank + max(lora_rows(m) for m in layers)
    if part > MAX_RANK:
        return f"a part's LoRAs stacked to rank {part}, above lora.MAX_RANK = {MAX_RANK}"
    sizes = [m.out_features for m in layers]
    if not splits_in_gemm(layers[0].act_fmt, sizes):  # (else the whole stacked L_up runs)
        return (
            f"their LoRAs stacked to rank {rank}, above lora.MAX_RANK = {MAX_RANK}, and "
            f"parts of {sizes} columns do not split in the GEMM"
        )
    if rank > gemm.MAX_STACKED_RANK:
        return (
            f"their LoRAs stacked to rank {rank}, above kernels.gemm.MAX_STACKED_RANK = "
            f"{gemm.MAX_STACKED_RANK}"
        )
    return None


def _shared_extra(layers: list[SVDQLinear]) -> bool:
    """Whether the layers' LoRA rows are one (none, or a LoRA whose down factor the group
    shares, as a kohya/BFL ``qkv`` LoRA's): the fused layer then keeps them once."""
    a = layers[0]
    return all(torch.equal(_lora_down(m), _lora_down(a)) for m in layers)


def _concat_rank(layers: list[SVDQLinear]) -> int:
    """The fused layer's low-rank rank: the base branch and each layer's LoRA rows."""
    a = layers[0]
    if _shared_extra(layers):
        return a.lowrank_down.shape[0]
    return a.rank + sum(lora_rows(m) for m in layers)


def _base_down(layer: SVDQLinear) -> torch.Tensor:
    """The quantization's own low-rank down projection (a LoRA appends rows after it)."""
    return layer.lowrank_down[: layer.rank]


def _lora_down(layer: SVDQLinear) -> torch.Tensor:
    """The LoRA rows of ``layer``'s low-rank down projection, without the zero rows that
    pad a lone layer's branch (``lora.RANK_MULTIPLE``: a fused group pads its compact
    L_up instead, ``compact_width``)."""
    return layer.lowrank_down[layer.rank : layer.rank + lora_rows(layer)]


def _shell(like: SVDQLinear, out_features: int) -> SVDQLinear:
    """An empty layer (meta device) like ``like`` with ``out_features`` outputs."""
    return SVDQLinear.from_config(
        {**like.config(), "out_features": out_features}, device="meta", backend=like.backend
    )


def _concat(layers: list[SVDQLinear]) -> SVDQLinear:
    """The layers as one, along N. Their LoRAs (rows each appended to its own
    ``lowrank_down``, columns to its ``lowrank_up``) are stacked after the shared base
    branch — ``[base; A_1; A_2; ...]`` down, ``[U_i, 0, .., B_i, .., 0]`` up for layer i's
    rows — so every output column gets exactly its own layer's low-rank terms; LoRA rows
    the layers share are kept once. A group stacked past ``lora.MAX_RANK`` (fused by its
    parts, ``kernels.gemm.MAX_STACKED_RANK``) keeps only the compact L_up ``[U_i, B_i]``
    (``lora_parts``, ``_compact_sizes``): the stacked one would be mostly zeros."""
    a = layers[0]
    r = a.rank
    fused = _shell(a, sum(m.out_features for m in layers))
    for name in ("qweight", "wscales") + (("bias",) if a.bias is not None else ()):
        setattr(fused, name, torch.cat([getattr(m, name) for m in layers]))
    for name in ("wtensor_scale", "smooth", "act_amax"):
        setattr(fused, name, getattr(a, name))
    if _shared_extra(layers):  # no LoRA, or one down factor for the group: kept once
        fused.lowrank_down = a.lowrank_down
        fused.lowrank_up = torch.cat([m.lowrank_up for m in layers])
    else:
        from svdquant.kernels.reference import compact_width, expand_lowrank_parts
        from svdquant.lora import MAX_RANK

        extra = [lora_rows(m) for m in layers]
        fused.lowrank_down = torch.cat([_base_down(a)] + [_lora_down(m) for m in layers])
        # the layers' own [U_i, B_i] rows, stacked: the compact L_up of the parts [r, *extra]
        own = [
            nn.functional.pad(m.lowrank_up[:, : r + e], (0, max(extra) - e))
            for m, e in zip(layers, extra, strict=True)
        ]
        sizes, compact = [m.out_features for m in layers], torch.cat(own)
        if fused.lowrank_down.shape[0] > MAX_RANK:  # fused by its parts (``_rank_refused``)
            fused.lora_parts, fused._compact_sizes = [r, *extra], sizes
            width = compact_width(fused.lora_parts)
            fused.lowrank_up = nn.functional.pad(compact, (0, width - compact.shape[1]))
        else:
            fused.lowrank_up = expand_lowrank_parts(compact, [r, *extra], sizes)
            _keep_parts(fused, layers, extra)
    fused.alpha = a.alpha
    if all(m.fp8_weights() is not None for m in layers):  # keep_fp8_weights: kept fused
        fused.keep_fp8_weights(codes_on_host=all(m.codes_on_host() for m in layers))
    else:  # (codes some part kept on the host go back to the GPU: nothing widens them there)
        fused.keep_fp8_weights(False)
    return fused


def _keep_parts(fused: SVDQLinear, layers: list[SVDQLinear], extra: list[int]) -> None:
    """Note on ``fused`` which of its low-rank columns each part uses, ``lora_parts`` =
    [r, *extra] (the base, then each layer's own LoRA rows): with
    ``kernels.gemm.LORA_PARTS`` each part of the split GEMM reads only those, against a
    compact L_up (rank 48 instead of 80 or 96 for rank-16 LoRAs on FLUX's q/k/v), made
    here while the switch is on, else at the first eager call that wants it."""
    fused.lora_parts = [layers[0].rank, *extra]
    from svdquant.kernels import gemm

    if gemm.LORA_PARTS:
        sizes = [m.out_features for m in layers]
        keep_compact_up(fused, sizes)


def keep_compact_up(fused: SVDQLinear, sizes: list[int]) -> torch.Tensor:
    """``fused``'s compact L_up for its ``lora_parts``, kept as a buffer outside its
    state dict (it follows moves and casts)."""
    from svdquant.kernels.reference import compact_lowrank_parts

    compact = compact_lowrank_parts(fused.lowrank_up, fused.lora_parts, sizes)
    fused.register_buffer("lowrank_up_parts", compact, persistent=False)
    return compact


def _split(fused: SVDQLinear, sizes: list[int]) -> list[SVDQLinear]:
    """New layers made of ``fused``'s output parts (widths ``sizes``), base branch only."""
    parts, start = [], 0
    for n in sizes:
        part = _shell(fused, n)
        part.alpha = fused.alpha
        _refill(part, fused, slice(start, start + n))
        parts.append(part)
        start += n
    return parts


def _release(layer: SVDQLinear) -> None:
    """Drop the tensors of a layer now held by its fused layer: it stays, out of the
    module tree, with its attributes, LoRAs and hooks, until ``_refill`` on unfuse."""
    for name, t in list(layer.named_buffers(recurse=False)):
        setattr(layer, name, t.new_empty(0))


def _refill(layer: SVDQLinear, fused: SVDQLinear, rows: slice) -> None:
    """Give a released layer back its own tensors from ``fused`` (its output ``rows``),
    bit for bit, and its LoRAs' low-rank terms (``lora._rebuild``)."""
    from svdquant import lora

    r = layer.rank
    for name in ("qweight", "wscales") + (("bias",) if fused.bias is not None else ()):
        setattr(layer, name, getattr(fused, name)[rows].clone())
    for name in ("wtensor_scale", "smooth", "act_amax"):
        setattr(layer, name, getattr(fused, name).clone())
    layer.lowrank_down = _base_down(fused).clone()
    layer.lowrank_up = fused.lowrank_up[rows, :r].clone()
    if lora._adapters(layer):
        lora._rebuild(layer)
    if fused.fp8_weights() is not None:
        layer.keep_fp8_weights(codes_on_host=fused.codes_on_host())


@functools.cache
def _flux_runtime() -> tuple[type, type]:
    """(attention processor, single-block class) of the fused FLUX runtime: diffusers'
    own code with the projections taken from ``FusedProjection`` layers."""
    from diffusers.models.transformers import transformer_flux as tf

    class FluxFusedAttnProcessor:
        """``FluxAttnProcessor`` with q/k/v (and the text stream's) from fused layers, or
        passed in (``qkv``: the single block computed them with its MLP input, and says
        its layer's ``backend``). q and k are normalized, concatenated and rotated in one
        pass each (``kernels.rms_norm_rope``) where the norms are ``torch.nn.RMSNorm``
        and the rotary embedding a (cos, sin) pair."""

        _attention_backend = None
        _parallel_config = None

        def __call__(
            self,
            attn: nn.Module,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            image_rotary_emb: Any = None,
            qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
            backend: str | None = None,
        ) -> Any:
            query, key, value = attn.to_qkv(hidden_states) if qkv is None else qkv
            if backend is None:
                backend = _own_backend(attn.to_qkv, hidden_states.device)
            heads = (query, key, value)
            heads = tuple(t.unflatten(-1, (-1, attn.head_dim)) for t in heads)
            added = None
            if attn.added_kv_proj_dim is not None:
                added = attn.to_added_qkv(encoder_hidden_states)
                added = tuple(t.unflatten(-1, (-1, attn.head_dim)) for t in added)
            if _norm_rope_fusable(attn, heads[0], image_rotary_emb):
                # one pass per tensor: norm, text heads first, rotation (kernels/rope.py)
                eq, ek, ev = (None,) * 3 if added is None else added
                nq, nk = (None,) * 2 if added is None else (attn.norm_added_q, attn.norm_added_k)
                query = _norm_rope(heads[0], attn.norm_q, image_rotary_emb, backend, eq, nq)
                key = _norm_rope(heads[1], attn.norm_k, image_rotary_emb, backend, ek, nk)
                value = heads[2] if ev is None else torch.cat([ev, heads[2]], dim=1)
            else:
                query, key, value = attn.norm_q(heads[0]), attn.norm_k(heads[1]), heads[2]
                if added is not None:
                    eq, ek, ev = added
                    query = torch.cat([attn.norm_added_q(eq), query], dim=1)
                    key = torch.cat([attn.norm_added_k(ek), key], dim=1)
                    value = torch.cat([ev, value], dim=1)
                if image_rotary_emb is not None:
                    query = tf.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                    key = tf.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            hidden_states = tf.dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=self._attention_backend,
                parallel_config=self._parallel_config,
            )
            hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
            if encoder_hidden_states is None:
                return hidden_states
            n_txt = encoder_hidden_states.shape[1]
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [n_txt, hidden_states.shape[1] - n_txt], dim=1
            )
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states

    class FusedFluxSingleTransformerBlock(tf.FluxSingleTransformerBlock):
        """The single block with q/k/v and the MLP's up projection as one layer
        (``qkv_mlp``): the norm output is quantized once for all four; ``proj_out`` reads
        the attention output and the MLP's GELU without their concatenation."""

        def forward(
            self,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            temb: torch.Tensor,
            image_rotary_emb: Any = None,
            joint_attention_kwargs: dict[str, Any] | None = None,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if joint_attention_kwargs:
                raise ValueError(
                    f"fused FLUX blocks take no joint_attention_kwargs (got "
                    f"{sorted(joint_attention_kwargs)}); call svdquant.unfuse_projections first"
                )
            n_txt = encoder_hidden_states.shape[1]
            hidden_states = _joined(encoder_hidden_states, hidden_states)
            residual = hidden_states
            norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
            gelu_cat = isinstance(self.proj_out, SVDQLinear) and _is_gelu_tanh(self.act_mlp)
            # the GELU that only proj_out reads: in the fused GEMM's epilogue, or its quantize
            in_gemm = gelu_cat and _act_in_gemm()
            mlp_act, tail_act = ("gelu_tanh", "none") if in_gemm else ("none", "gelu_tanh")
            q, k, v, mlp = self.qkv_mlp(norm_hidden_states, last_act=mlp_act)
            attn_output = self.attn.processor(
                self.attn,
                norm_hidden_states,
                image_rotary_emb=image_rotary_emb,
                qkv=(q, k, v),
                backend=_own_backend(self.qkv_mlp, hidden_states.device),
            )
            if gelu_cat:
                # the quantize reads both parts: no [M, 15360] concatenation, no GELU pass
                proj = self.proj_out.forward_cat(attn_output, mlp, tail_act)
            else:
                proj = self.proj_out(torch.cat([attn_output, self.act_mlp(mlp)], dim=2))
            hidden_states = _gate_add(residual, gate, proj, self.qkv_mlp, clip_fp16=True)
            return hidden_states[:, :n_txt], hidden_states[:, n_txt:]

    return FluxFusedAttnProcessor, FusedFluxSingleTransformerBlock


def _norm_rope_fusable(attn: nn.Module, query: torch.Tensor, rotary: Any) -> bool:
    """Whether q/k go through ``kernels.rms_norm_rope``: the kernel is on, the norms are
    ``torch.nn.RMSNorm`` with one eps, the rotary embedding is diffusers' real
    (cos, sin) pair over the whole sequence."""
    from svdquant.kernels import rope

    names = ("norm_q", "norm_k")
    if attn.added_kv_proj_dim is not None:
        names += ("norm_added_q", "norm_added_k")
    norms = [getattr(attn, n, None) for n in names]
    return (
        rope.ENABLED
        and all(isinstance(n, nn.RMSNorm) for n in norms)
        and len({n.eps for n in norms}) == 1
        and isinstance(rotary, tuple)
        and len(rotary) == 2
        and all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in rotary)
        and rotary[0].shape[-1] == query.shape[-1]
    )


def _norm_rope(
    x: torch.Tensor,
    norm: nn.RMSNorm,
    rotary: tuple[torch.Tensor, torch.Tensor],
    backend: str,
    head: torch.Tensor | None = None,
    head_norm: nn.RMSNorm | None = None,
) -> torch.Tensor:
    """``rope(cat([head_norm(head), norm(x)], 1))`` through ``kernels.rms_norm_rope``."""
    from svdquant import kernels

    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    cos, sin = (t.to(x.device) for t in rotary)
    hw = None if head_norm is None else head_norm.weight
    return kernels.rms_norm_rope(x, norm.weight, eps, cos, sin, head, hw, backend=backend)


def _act_in_gemm() -> bool:
    """``kernels.ops.ACT_IN_GEMM``: an activation only the next layer reads goes in the
    GEMM's epilogue of the layer before."""
    from svdquant.kernels import ops

    return ops.ACT_IN_GEMM


def _is_gelu_tanh(module: nn.Module) -> bool:
    return isinstance(module, nn.GELU) and module.approximate == "tanh"


@functools.cache
def _mlp_runtime() -> type:
    """diffusers' ``FeedForward`` (GELU-tanh, dropout, linear) run as one fused MLP."""
    from diffusers.models.attention import FeedForward

    from svdquant import kernels

    class FusedGeluFeedForward(FeedForward):
        """fc1 -> GELU -> fc2 with fc1's GEMM epilogue writing fc2's quantized input
        (``kernels.svdq_mlp_triton``) on the fp8 engine; diffusers' own forward elsewhere
        (the reference backend, training with dropout)."""

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            fc1, drop, fc2 = self.net[0].proj, self.net[1], self.net[2]
            if (not self.training or drop.p == 0) and all(
                kernels.resolve_backend(m.backend, hidden_states.device) == "triton"
                for m in (fc1, fc2)
            ):
                fc1._check_input(hidden_states)
                return kernels.svdq_mlp_triton(hidden_states, fc1, fc2, "gelu_tanh")
            return super().forward(hidden_states, *args, **kwargs)

    return FusedGeluFeedForward


@functools.cache
def _geglu_runtime() -> type:
    """diffusers' ``FeedForward`` with a GEGLU (SDXL's: up projection to 2H, ``x ·
    gelu(gate)``, dropout, linear) with the up projection's GEMM epilogue writing the down
    projection's quantized input (``kernels.svdq_geglu_triton``; with
    ``kernels.ops.GEGLU_EPILOGUE`` off, the down projection's quantize reads both halves
    of the up projection's output: ``SVDQLinear.forward_gated``)."""
    from diffusers.models.attention import FeedForward

    from svdquant import kernels

    class FusedGegluFeedForward(FeedForward):
        """up -> GEGLU -> down with no pass of its own for the GELU, the product and the
        down projection's quantize on the fp8 engine; diffusers' own forward elsewhere
        (the reference backend, training with dropout)."""

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            up, drop, down = self.net[0].proj, self.net[1], self.net[2]
            if (not self.training or drop.p == 0) and all(
                kernels.resolve_backend(m.backend, hidden_states.device) == "triton"
                for m in (up, down)
            ):
                if kernels.ops.GEGLU_EPILOGUE:
                    up._check_input(hidden_states)
                    return kernels.svdq_geglu_triton(hidden_states, up, down, "gelu")
                value, gate = up(hidden_states).chunk(2, dim=-1)
                return down.forward_gated(value, gate, "gelu")
            return super().forward(hidden_states, *args, **kwargs)

    return FusedGegluFeedForward


@functools.cache
def _block_runtime() -> dict[str, type]:
    """FLUX's adaptive norms and double block with the norms' modulation and the gated
    residuals in one pass each (``kernels.layer_norm_modulate``, ``kernels.gate_residual``,
    while ``kernels.modulate.ENABLED``), by the name of the class each replaces."""
    from diffusers.models import normalization as dn
    from diffusers.models.transformers import transformer_flux as tf

    class FusedAdaLayerNormZero(dn.AdaLayerNormZero):
        """``AdaLayerNormZero`` whose attention-branch modulation is one kernel pass."""

        def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
            if self.emb is not None:
                emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
            shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(
                6, dim=1
            )
            x = _modulate(self.norm, x, scale, shift, self.linear)
            return x, gate, shift_mlp, scale_mlp, gate_mlp

    class FusedAdaLayerNormZeroSingle(dn.AdaLayerNormZeroSingle):
        """``AdaLayerNormZeroSingle`` whose modulation is one kernel pass."""

        def forward(self, x, emb=None):
            shift, scale, gate = self.linear(self.silu(emb)).chunk(3, dim=1)
            return _modulate(self.norm, x, scale, shift, self.linear), gate

    class FusedFluxTransformerBlock(tf.FluxTransformerBlock):
        """The double block with its feed-forwards' norms modulated and its four gated
        residuals added in one pass each (the adaptive norms and attention are their
        fused forms already); diffusers' own forward where the attention is not fused
        (another processor, e.g. an IP-adapter's, adds a third output) or
        ``joint_attention_kwargs`` are given."""

        def forward(
            self,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor,
            temb: torch.Tensor,
            image_rotary_emb: Any = None,
            joint_attention_kwargs: dict[str, Any] | None = None,
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if joint_attention_kwargs or not getattr(self.attn, "fused_projections", False):
                return super().forward(hidden_states, encoder_hidden_states, temb,
                                       image_rotary_emb, joint_attention_kwargs)  # fmt: skip
            fc2 = self.ff.net[2]  # the engine layer whose backend the kernels follow
            x, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
            c, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
                encoder_hidden_states, emb=temb
            )
            attn, c_attn = self.attn(
                hidden_states=x, encoder_hidden_states=c, image_rotary_emb=image_rotary_emb
            )
            h, n = _gate_add_modulate(hidden_states, gate, attn, self.norm2, scale_mlp,
                                      shift_mlp, fc2)  # fmt: skip
            h = _gate_add(h, gate_mlp, self.ff(n), fc2)
            e, n = _gate_add_modulate(encoder_hidden_states, c_gate, c_attn, self.norm2_context,
                                      c_scale_mlp, c_shift_mlp, fc2)  # fmt: skip
            e = _gate_add(e, c_gate_mlp, self.ff_context(n), fc2, clip_fp16=True)
            return e, h

    return {
        "AdaLayerNormZero": FusedAdaLayerNormZero,
        "AdaLayerNormZeroSingle": FusedAdaLayerNormZeroSingle,
        "FluxTransformerBlock": FusedFluxTransformerBlock,
    }


def _ada_norm_single_step(
    block: nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    self_attention: Any,
    cross_attention: Any,
    feed_forward: Any,
    layer: nn.Module,
) -> torch.Tensor:
    """An adaLN-single block (PixArt-Σ's, SANA's) with its norms and residual sums in four
    kernel passes where diffusers runs eleven: the attention input's norm and modulation,
    the gated attention output's sum, the cross-attention output's sum with the
    feed-forward input's norm and modulation, the gated feed-forward output's sum — the
    same operations in diffusers' order (``kernels/modulate.py``); ``layer``: the engine
    layer whose backend the kernels follow."""
    from svdquant.kernels import modulate

    if modulate.ENABLED:
        # the patch embedder hands the first block a transposed view; the kernels read
        # rows of channels, and their outputs (every later block's input) are such rows
        hidden_states = hidden_states.contiguous()
    b = hidden_states.shape[0]
    mods = (block.scale_shift_table[None] + timestep.reshape(b, 6, -1)).chunk(6, dim=1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (t[:, 0] for t in mods)
    n = _modulate(block.norm1, hidden_states, scale_msa, shift_msa, layer)
    h = _gate_add(hidden_states, gate_msa, self_attention(n), layer)
    attn = cross_attention(h)
    if modulate.ENABLED:  # the ungated sum under a gate of ones: 1 · x is x, exactly
        one = torch.ones_like(gate_mlp)
        h, n = _gate_add_modulate(h, one, attn, block.norm2, scale_mlp, shift_mlp, layer)
    else:  # diffusers' passes, nothing added
        h = attn + h
        n = _modulate(block.norm2, h, scale_mlp, shift_mlp, layer)
    return _gate_add(h, gate_mlp, feed_forward(n), layer)


@functools.cache
def _ada_norm_single_runtime() -> dict[str, type]:
    """PixArt-Σ's blocks (diffusers' ``BasicTransformerBlock``, ``ada_norm_single``) and
    SANA's (``SanaTransformerBlock``) through ``_ada_norm_single_step``, by the name of the
    class each replaces."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

    class FusedAdaNormSingleBlock(BasicTransformerBlock):
        """PixArt's block with its norms and residual sums in one pass each; diffusers' own
        forward for what it does not cover (positional embeddings in the block, GLIGEN,
        chunked feed-forwards, no or only cross-attention, a 4-D stream)."""

        def forward(
            self,
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            encoder_hidden_states: torch.Tensor | None = None,
            encoder_attention_mask: torch.Tensor | None = None,
            timestep: torch.LongTensor | None = None,
            cross_attention_kwargs: dict[str, Any] | None = None,
            class_labels: torch.LongTensor | None = None,
            added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        ) -> torch.Tensor:
            kwargs = dict(cross_attention_kwargs or {})
            if (
                self.pos_embed is not None
                or "gligen" in kwargs
                or self._chunk_size is not None
                or self.attn2 is None
                or self.only_cross_attention
                or hidden_states.dim() != 3
            ):
                return super().forward(hidden_states, attention_mask, encoder_hidden_states,
                                       encoder_attention_mask, timestep, cross_attention_kwargs,
                                       class_labels, added_cond_kwargs)  # fmt: skip
            return _ada_norm_single_step(
                self, hidden_states, timestep,
                lambda n: self.attn1(n, attention_mask=attention_mask, **kwargs),
                lambda h: self.attn2(h, encoder_hidden_states=encoder_hidden_states,
                                     attention_mask=encoder_attention_mask, **kwargs),
                self.ff, self.ff.net[2],
            )  # fmt: skip

    class FusedSanaTransformerBlock(SanaTransformerBlock):
        """SANA's block with its norms and residual sums in one pass each; diffusers' own
        forward without a cross-attention."""

        def forward(
            self,
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            encoder_hidden_states: torch.Tensor | None = None,
            encoder_attention_mask: torch.Tensor | None = None,
            timestep: torch.LongTensor | None = None,
            height: int | None = None,
            width: int | None = None,
        ) -> torch.Tensor:
            if self.attn2 is None or hidden_states.dim() != 3:
                return super().forward(hidden_states, attention_mask, encoder_hidden_states,
                                       encoder_attention_mask, timestep, height, width)  # fmt: skip

            def feed_forward(n: torch.Tensor) -> torch.Tensor:  # GLUMBConv works on NCHW
                y = self.ff(n.unflatten(1, (height, width)).permute(0, 3, 1, 2))
                return y.flatten(2, 3).permute(0, 2, 1)

            return _ada_norm_single_step(
                self, hidden_states, timestep,
                lambda n: self.attn1(n.to(hidden_states.dtype)),  # as diffusers casts it
                lambda h: self.attn2(h, encoder_hidden_states=encoder_hidden_states,
                                     attention_mask=encoder_attention_mask),
                feed_forward, self.ff.conv_point,
            )  # fmt: skip

    return {
        "BasicTransformerBlock": FusedAdaNormSingleBlock,
        "SanaTransformerBlock": FusedSanaTransformerBlock,
    }


def _swap_ada_norm_single(block: nn.Module) -> bool:
    """Run a PixArt-Σ block (``ada_norm_single``, its feed-forward fused) or a SANA block
    (its feed-forward's layers quantized) through ``_ada_norm_single_runtime``: the same
    modules, parameters and state-dict keys; ``unfuse_projections`` swaps back."""
    kind = type(block).__name__
    if kind == "BasicTransformerBlock":
        ok = block.norm_type == "ada_norm_single" and hasattr(block.ff, _ORIG_CLASS)
    else:
        point = getattr(getattr(block.ff, "conv_point", None), "linear", None)
        ok = kind == "SanaTransformerBlock" and isinstance(point, SVDQLinear)
    if not ok or hasattr(block, _ORIG_CLASS):
        return False
    setattr(block, _ORIG_CLASS, type(block))
    block.__class__ = _ada_norm_single_runtime()[kind]
    return True


def _joined(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``cat([first, second], 1)``; while ``kernels.modulate.ENABLED``, without the copy
    where the two are the halves of one tensor, side by side — as each single block gets
    the previous one's output, split into its text and image tokens (a 28 MB copy per
    block at 1024², 38 a step). Traced by ``torch.compile``: always ``cat``."""
    from svdquant.kernels import modulate

    if modulate.ENABLED and not torch.compiler.is_compiling() and first.dim() == 3:
        (b, s1, c), s2 = first.shape, second.shape[1]
        rows = ((s1 + s2) * c, c, 1)  # a contiguous [B, S1 + S2, C] tensor's strides
        if (
            second.shape == (b, s2, c)
            and first.stride() == second.stride() == rows
            and first.dtype == second.dtype
            and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
            and second.data_ptr() == first.data_ptr() + s1 * c * first.element_size()
        ):
            return first.as_strided((b, s1 + s2, c), rows)
    return torch.cat([first, second], dim=1)


def _own_backend(layer: nn.Module, device: torch.device) -> str:
    """The backend (``"triton"`` or ``"reference"``) an ``SVDQLinear`` or a
    ``FusedProjection`` runs on (a 16-bit layer: ``"auto"``'s choice)."""
    from svdquant import kernels

    layer = getattr(layer, "linear", layer)
    return kernels.resolve_backend(getattr(layer, "backend", "auto"), device)


def _plain_norm(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether the modulation kernels compute ``norm(x)``: ``kernels.modulate.ENABLED``,
    ``norm`` a plain ``nn.LayerNorm`` without affine weights, ``x`` [B, S, C]."""
    from svdquant.kernels import modulate

    return (
        modulate.ENABLED
        and type(norm) is nn.LayerNorm
        and norm.weight is None
        and norm.bias is None
        and x.dim() == 3
    )


def _modulate(
    norm: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, layer: nn.Module
) -> torch.Tensor:
    """``norm(x) · (1 + scale) + shift``: one kernel pass, on ``layer``'s backend, where
    ``_plain_norm``."""
    from svdquant import kernels

    if _plain_norm(norm, x):
        backend = _own_backend(layer, x.device)
        return kernels.layer_norm_modulate(x, scale, shift, norm.eps, backend=backend)
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def _gate_add(
    residual: torch.Tensor,
    gate: torch.Tensor,
    x: torch.Tensor,
    layer: nn.Module,
    clip_fp16: bool = False,
) -> torch.Tensor:
    """``residual + gate · x`` (clipped to fp16's range for an fp16 stream where
    ``clip_fp16``): one kernel pass, on ``layer``'s backend, while
    ``kernels.modulate.ENABLED``."""
    from svdquant import kernels
    from svdquant.kernels import modulate

    if modulate.ENABLED:
        backend = _own_backend(layer, x.device)
        return kernels.gate_residual(residual, gate, x, clip_fp16, backend=backend)
    y = residual + gate.unsqueeze(1) * x
    return y.clip(-65504, 65504) if clip_fp16 and y.dtype == torch.float16 else y


def _gate_add_modulate(
    residual: torch.Tensor,
    gate: torch.Tensor,
    x: torch.Tensor,
    norm: nn.Module,
    scale: torch.Tensor,
    shift: torch.Tensor,
    layer: nn.Module,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + gate · x`` and ``norm(h) · (1 + scale) + shift``: one kernel pass
    for both, on ``layer``'s backend, while ``kernels.modulate.FUSE_GATE_NORM`` and
    ``_plain_norm``; else ``_gate_add`` then ``_modulate``."""
    from svdquant import kernels
    from svdquant.kernels import modulate

    if modulate.FUSE_GATE_NORM and _plain_norm(norm, residual):
        backend = _own_backend(layer, x.device)
        return kernels.gate_residual_modulate(
            residual, gate, x, scale, shift, norm.eps, backend=backend
        )
    h = _gate_add(residual, gate, x, layer)
    return h, _modulate(norm, h, scale, shift, layer)


def _swap_class(module: nn.Module) -> bool:
    """Swap a FLUX double block or adaptive norm for its one-pass form (``_block_runtime``:
    same modules, parameters and state-dict keys; ``unfuse_projections`` swaps back)."""
    fused = _block_runtime().get(type(module).__name__)
    if fused is None or hasattr(module, _ORIG_CLASS):
        return False
    setattr(module, _ORIG_CLASS, type(module))
    module.__class__ = fused
    return True


def _fuse_feed_forward(ff: nn.Module) -> bool:
    """Run a diffusers ``FeedForward`` with quantized layers (activations int4 or fp8) fused:
    FLUX's and PixArt's (GELU-tanh, dropout, linear) as one fused MLP, SDXL's GEGLU with
    the up projection's epilogue applying the gate (``_geglu_runtime``). Its class is
    swapped; its modules, parameters and state-dict keys stay."""
    net = getattr(ff, "net", None)
    if type(ff).__name__ != "FeedForward" or net is None or len(net) != 3:
        return False
    act, drop, fc2 = net
    fc1 = getattr(act, "proj", None)
    if not (
        isinstance(drop, nn.Dropout)
        and all(isinstance(m, SVDQLinear) and m.act_fmt in ("int4", "fp8") for m in (fc1, fc2))
    ):
        return False
    kind = type(act).__name__
    if kind == "GELU" and act.approximate == "tanh" and fc1.out_features == fc2.in_features:
        runtime = _mlp_runtime()
    elif kind == "GEGLU" and fc1.out_features == 2 * fc2.in_features:
        runtime = _geglu_runtime()
    else:
        return False
    setattr(ff, _ORIG_CLASS, type(ff))
    ff.__class__ = runtime
    return True


def _refuse_processor(attn: nn.Module, processor: Any) -> None:
    raise ValueError(
        f"this {type(attn).__name__} runs fused projections (svdquant.fuse_projections): "
        "call svdquant.unfuse_projections(model) before setting another attention "
        f"processor ({type(processor).__name__}), then fuse_projections again"
    )


def _install_processor(attn: nn.Module, new: Any) -> None:
    """Run ``attn`` through the fused processor ``new``, keeping the original to restore;
    until then ``set_processor`` (diffusers' ``set_attn_processor``, an IP-adapter's
    loading) refuses with a clear error instead of installing a processor that looks
    for the fused-away layers."""
    setattr(attn, _ORIG_PROCESSOR, attn.processor)
    attn.processor = new
    attn.__dict__["set_processor"] = types.MethodType(_refuse_processor, attn)


def _set_fused_processor(attn: nn.Module) -> None:
    processor_cls, _ = _flux_runtime()
    old = attn.processor
    new = processor_cls()
    new._attention_backend = getattr(old, "_attention_backend", None)
    new._parallel_config = getattr(old, "_parallel_config", None)
    _install_processor(attn, new)


def _fuse_layers(owner: nn.Module, fused_name: str, paths: list[str]) -> bool:
    """Replace the layers at ``paths`` (relative to ``owner``) by one ``FusedProjection``
    named ``fused_name`` on ``owner``; False (nothing changed) if they cannot be fused."""
    layers = [owner.get_submodule(p) for p in paths]
    if _fusable(layers) is not None:
        return False
    sizes = [m.out_features for m in layers]
    setattr(owner, fused_name, FusedProjection(_concat(layers), sizes))
    for p, layer in zip(paths, layers, strict=True):
        parent, _, child = p.rpartition(".")
        delattr(owner.get_submodule(parent) if parent else owner, child)
        _release(layer)
    getattr(owner, _FUSED_ATTR)[fused_name] = (list(paths), sizes, layers)
    return True


def _plain_processor(attn: nn.Module) -> bool:
    """Whether ``attn`` runs diffusers' own processor (an IP-adapter's or a user's stays:
    the fused one would drop what it adds)."""
    return type(getattr(attn, "processor", None)).__name__ == "FluxAttnProcessor"


def _fuse_single_block(block: nn.Module) -> bool:
    attn = block.attn
    if not _plain_processor(attn):
        return False
    paths = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    setattr(block, _FUSED_ATTR, {})
    if not _fuse_layers(block, "qkv_mlp", paths):
        delattr(block, _FUSED_ATTR)
        return False
    _, single_cls = _flux_runtime()
    setattr(block, _ORIG_CLASS, type(block))
    block.__class__ = single_cls
    _set_fused_processor(attn)
    attn.fused_projections = True
    return True


def _fuse_attention(attn: nn.Module) -> bool:
    plan = [(f, list(names)) for f, names in _PARTS if getattr(attn, names[0], None) is not None]
    # both groups or neither: the processor takes the text stream's from a fused layer too
    if not plan or not _plain_processor(attn):
        return False
    if any(_fusable([getattr(attn, n) for n in names]) for _, names in plan):
        return False
    setattr(attn, _FUSED_ATTR, {})
    for fused_name, names in plan:
        _fuse_layers(attn, fused_name, names)
    _set_fused_processor(attn)
    attn.fused_projections = True
    return True


#: diffusers' linear attention (SANA's self-attention), fused by ``_linear_attention_runtime``
_LINEAR_PROCESSOR = "SanaLinearAttnProcessor2_0"

#: Whether the generic fused processor copies q/k/v out of the fused output where the
#: GEMM cannot write them apart (parts meeting off its 256-column tiles: PixArt-Σ's
#: 1152, SANA's 2240, SDXL's 320 and 640) instead of taking them as views — attention
#: reads strided rows, so the copies (~1.2 ms of PixArt-Σ's step, v42 profile) buy
#: nothing. For A/B runs.
GENERIC_CONTIGUOUS = False

#: diffusers' attention processors the fused one stands for: whether each applies q/k's
#: norms before splitting the heads (SANA's cross-attention: across heads) or after
_GENERIC_PROCESSORS = {"AttnProcessor2_0": False, "SanaAttnProcessor2_0": True}


def _generic_attention(attn: nn.Module) -> list[str] | None:
    """The layers of a diffusers ``Attention`` to fuse (q/k/v of a self-attention, k/v
    of a cross-attention), or None where its processor is not one of
    ``_GENERIC_PROCESSORS`` or SANA's linear attention (an IP-adapter's, a user's) or it
    normalizes what the fused processor does not (a spatial or group norm, a normalized
    context)."""
    if type(attn).__name__ != "Attention":
        return None
    processor = type(getattr(attn, "processor", None)).__name__
    if processor not in _GENERIC_PROCESSORS and processor != _LINEAR_PROCESSOR:
        return None
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_cross:
        return None
    names = ["to_k", "to_v"] if attn.is_cross_attention else ["to_q", "to_k", "to_v"]
    if any(getattr(attn, n, None) is None for n in names):
        return None
    return names


@functools.cache
def _attention_runtime() -> type:
    """diffusers' ``AttnProcessor2_0`` with the projections from a fused layer."""
    import torch.nn.functional as F

    class FusedAttnProcessor:
        """``AttnProcessor2_0`` (``norm_first``: ``SanaAttnProcessor2_0``, q/k normalized
        across heads) taking q/k/v from ``attn.to_qkv`` (a self-attention) or k/v from
        ``attn.to_kv`` (a cross-attention): one quantize and one GEMM for the layers that
        read one input."""

        def __init__(self, norm_first: bool = False) -> None:
            self.norm_first = norm_first

        def __call__(
            self,
            attn: nn.Module,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            temb: torch.Tensor | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> torch.Tensor:
            residual = hidden_states
            image = hidden_states.ndim == 4
            if image:
                b, c, h, w = hidden_states.shape
                hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            batch, kv_len, _ = context.shape
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
                attention_mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            contiguous = GENERIC_CONTIGUOUS  # (attention takes strided rows: views)
            if hasattr(attn, "to_qkv"):
                query, key, value = attn.to_qkv(hidden_states, contiguous=contiguous)
                if encoder_hidden_states is not None:  # called with a context after all
                    key, value = attn.to_qkv(context, contiguous=contiguous)[1:]
            else:
                query = attn.to_q(hidden_states)
                key, value = attn.to_kv(context, contiguous=contiguous)
            if self.norm_first:
                query, key = self._norms(attn, query, key)
            head_dim = key.shape[-1] // attn.heads
            query, key, value = (
                t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
            )
            if not self.norm_first:
                query, key = self._norms(attn, query, key)
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
            out = attn.to_out[1](attn.to_out[0](out))
            if image:
                out = out.transpose(-1, -2).reshape(b, c, h, w)
            if attn.residual_connection:
                out = out + residual
            if attn.rescale_output_factor == 1.0:  # x / 1 is x: no pass (one kernel less)
                return out
            return out / attn.rescale_output_factor

        @staticmethod
        def _norms(
            attn: nn.Module, query: torch.Tensor, key: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            query = query if attn.norm_q is None else attn.norm_q(query)
            return query, key if attn.norm_k is None else attn.norm_k(key)

    return FusedAttnProcessor


@functools.cache
def _linear_attention_runtime() -> type:
    """diffusers' ``SanaLinearAttnProcessor2_0`` with q/k/v from a fused layer."""
    import torch.nn.functional as F

    class FusedLinearAttnProcessor:
        """SANA's ReLU linear attention (``SanaLinearAttnProcessor2_0``: the same
        operations in the same order, the same numbers) taking q/k/v from
        ``attn.to_qkv``: one quantize and one GEMM for the three projections."""

        def __call__(
            self,
            attn: nn.Module,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,  # unused, as in diffusers'
        ) -> torch.Tensor:
            dtype = hidden_states.dtype
            contiguous = GENERIC_CONTIGUOUS
            query, key, value = attn.to_qkv(hidden_states, contiguous=contiguous)
            if encoder_hidden_states is not None:  # called with a context after all
                key, value = attn.to_qkv(encoder_hidden_states, contiguous=contiguous)[1:]
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)

            def heads(t: torch.Tensor) -> torch.Tensor:  # [B, T, C] -> [B, heads, C/heads, T]
                return t.transpose(1, 2).unflatten(1, (attn.heads, -1))

            # the kernel feature map phi = relu; v gets a row of ones: its product with
            # phi(k)^T phi(q) carries each query's normalizer
            query = F.relu(heads(query)).float()
            key = F.relu(heads(key).transpose(2, 3)).float()
            value = F.pad(heads(value).float(), (0, 0, 0, 1), mode="constant", value=1.0)
            out = torch.matmul(torch.matmul(value, key), query)
            out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
            out = out.flatten(1, 2).transpose(1, 2).to(dtype)
            out = attn.to_out[1](attn.to_out[0](out))
            return out.clip(-65504, 65504) if dtype == torch.float16 else out

    return FusedLinearAttnProcessor


def _fuse_generic_attention(attn: nn.Module) -> bool:
    names = _generic_attention(attn)
    if names is None or _fusable([getattr(attn, n) for n in names]) is not None:
        return False
    setattr(attn, _FUSED_ATTR, {})
    _fuse_layers(attn, "to_qkv" if len(names) == 3 else "to_kv", names)
    kind = type(attn.processor).__name__
    if kind == _LINEAR_PROCESSOR:
        processor = _linear_attention_runtime()()
    else:
        processor = _attention_runtime()(_GENERIC_PROCESSORS[kind])
    _install_processor(attn, processor)
    attn.fused_projections = True
    return True


def _drop_graphs(model: nn.Module) -> None:
    """A ``cuda_graphed`` wrapper's graphs read the layers fusing replaces: drop them."""
    from svdquant.cuda_graph import CUDAGraphed

    if isinstance(model, CUDAGraphed):
        model.reset()


def fuse_projections(model: nn.Module) -> int:
    """Fuse the quantized projections that read one input in every supported module of
    ``model`` (FLUX.1: q/k/v of each attention and the text stream's added q/k/v; in the
    single blocks q/k/v with the MLP's up projection, and their ``proj_out`` reading the
    attention output and the MLP's GELU without concatenating them; each double block's
    feed-forwards as fused MLPs; the blocks' adaptive norms in one pass where
    ``kernels.modulate.ENABLED``; diffusers' generic ``Attention`` — PixArt-Σ, SDXL, SANA's
    cross-attention — q/k/v of a self-attention and k/v of a cross-attention, SANA's linear
    self-attention's q/k/v, PixArt's GELU-tanh feed-forwards as fused MLPs, SDXL's GEGLU
    feed-forwards with the gate applied in the up projection's epilogue, and PixArt-Σ's
    and SANA's adaLN-single blocks with their norms and residual sums in one pass each
    where ``kernels.modulate.ENABLED``); returns how many attention modules now take fused
    projections. Layers that carry LoRAs are fused with them (stacked after the shared base
    branch: the same outputs); modules whose layers cannot be fused (16-bit, separately
    quantized) or whose attention runs another processor than diffusers' own (an
    IP-adapter's) stay as they are; groups whose LoRAs stack past the kernels' rank limits
    too, with a warning. A ``cuda_graphed`` model's graphs are dropped."""
    global _rank_refusals
    _drop_graphs(model)
    _rank_refusals = {}
    try:
        count = _fuse_all(model)
    finally:
        refused, _rank_refusals = _rank_refusals, None
    if refused:
        warnings.warn(
            f"svdquant: {len(refused)} group(s) of projections left unfused, e.g. "
            f"{next(iter(refused.values()))}: their layers run apart, slower (a LoRA's "
            "rank adds to the stacked rank of every group it touches; docs/lora.md)",
            stacklevel=2,
        )
    return count


def _fuse_all(model: nn.Module) -> int:
    """``fuse_projections``' work; returns how many attention modules it fused."""
    count = 0
    for module in list(model.modules()):
        if getattr(module, _FUSED_ATTR, None) is not None or hasattr(module, _ORIG_CLASS):
            continue
        kind = type(module).__name__
        if kind == "FluxSingleTransformerBlock" and _fuse_single_block(module):
            count += 1
            _swap_class(module.norm)
        elif kind == "FluxTransformerBlock" and any(
            [_fuse_feed_forward(ff) for ff in (module.ff, module.ff_context)]
        ):
            for part in (module, module.norm1, module.norm1_context):
                _swap_class(part)
        elif kind == "BasicTransformerBlock" and getattr(module, "ff", None) is not None:
            _fuse_feed_forward(module.ff)
            _swap_ada_norm_single(module)
        elif kind == "SanaTransformerBlock":
            _swap_ada_norm_single(module)
    for module in list(model.modules()):
        if getattr(module, "fused_projections", False) or hasattr(module, _FUSED_ATTR):
            continue
        kind = type(module).__name__
        if kind == "FluxAttention":
            count += _fuse_attention(module)
        elif kind == "Attention":
            count += _fuse_generic_attention(module)
    return count


def _restore(owner: nn.Module) -> None:
    """Put the fused layers of ``owner`` back: the same layer objects, refilled."""
    for fused_name, (paths, sizes, layers) in getattr(owner, _FUSED_ATTR).items():
        fused = getattr(owner, fused_name).linear
        start = 0
        for p, n, layer in zip(paths, sizes, layers, strict=True):
            _refill(layer, fused, slice(start, start + n))
            start += n
            parent, _, child = p.rpartition(".")
            setattr(owner.get_submodule(parent) if parent else owner, child, layer)
        delattr(owner, fused_name)
    delattr(owner, _FUSED_ATTR)


def _restore_processor(attn: nn.Module) -> None:
    attn.__dict__.pop("set_processor", None)
    attn.processor = getattr(attn, _ORIG_PROCESSOR)
    delattr(attn, _ORIG_PROCESSOR)
    attn.fused_projections = False


def unfuse_projections(model: nn.Module) -> int:
    """Undo ``fuse_projections`` (the separate layers come back bit for bit, with the
    original attention processors and block classes); returns how many attention modules
    were unfused."""
    _drop_graphs(model)
    count = 0
    for module in list(model.modules()):
        if getattr(module, _FUSED_ATTR, None) is None:
            if hasattr(module, _ORIG_CLASS):  # a fused feed-forward, norm or generic block
                module.__class__ = getattr(module, _ORIG_CLASS)
                delattr(module, _ORIG_CLASS)
            continue
        _restore(module)
        if hasattr(module, _ORIG_CLASS):  # a single block: its attention was fused with it
            module.__class__ = getattr(module, _ORIG_CLASS)
            delattr(module, _ORIG_CLASS)
            module = module.attn
        _restore_processor(module)
        count += 1
    return count


def is_fused(model: nn.Module) -> bool:
    """Whether ``fuse_projections`` fused anything in ``model``."""
    return any(getattr(m, _FUSED_ATTR, None) or hasattr(m, _ORIG_CLASS) for m in model.modules())
