"""LoRAs on a quantized model, without requantization.

A LoRA adds ``strength · scale · (x Aᵀ) Bᵀ`` to a linear layer (A [r, K] the down
factor, B [N, r] the up factor, ``scale = alpha / r``). An ``SVDQLinear`` already has a
16-bit low-rank branch ``((x / s) L_downᵀ) L_upᵀ``; since that branch sees ``x / s``, the
LoRA is exactly the branch extended by ``A · s`` (each input channel j scaled by s_j) and
``strength · scale · B``. So loading a LoRA concatenates rows to ``lowrank_down`` and
columns to ``lowrank_up``: no requantization, the same forward, the exact LoRA delta (up
to 16-bit rounding of the two factors).

The base branch (the first ``layer.rank`` rows / columns) is never modified, so unloading
restores it bit for bit. Each LoRA's factors are kept on the layer (a plain attribute,
outside ``state_dict()``), so ``set_lora_strength`` can rescale one LoRA and
``unload_lora`` can remove just that one. While LoRAs are loaded, ``state_dict()`` (and so
``save_pretrained_quantized``) returns the base model only; loading a state dict into a
layer that carries LoRAs is refused (unload them first).

Layers that stayed ``nn.Linear`` (e.g. FLUX's embedders and final ``proj_out``) get the
LoRA as an add-on: a forward hook adds the delta; their weights are not touched.

``svdquant.fuse_projections`` fuses layers that carry LoRAs: their LoRA rows and columns
are stacked after the shared base branch of the fused layer (the same terms for every
output). LoRAs are loaded, rescaled and unloaded on separate layers: on a fused model
those calls unfuse it for the change and fuse it again.

File formats (safetensors): diffusers/PEFT (``<prefix>.<module>.lora_A.weight`` /
``lora_B.weight``, alpha from a ``.alpha`` tensor or the file's ``lora_adapter_metadata``)
and kohya (``lora_unet_<module with _>.lora_down.weight`` / ``lora_up.weight`` /
``alpha``), including the original-FLUX (BFL) layer names used by kohya's sd-scripts and
others (``double_blocks_0_img_attn_qkv``, ``single_blocks_0_linear1``, ...), whose fused
layers map onto diffusers' split ones by splitting B by rows. See docs/lora.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from svdquant.nn import SVDQLinear

__all__ = [
    "MAX_RANK",
    "LoraError",
    "LoraFileError",
    "LoraInfo",
    "LoraMismatchError",
    "LoraRankError",
    "list_loras",
    "load_lora",
    "read_lora",
    "set_lora_strength",
    "unload_lora",
]

#: Default limit on a layer's total low-rank rank (base branch + all loaded LoRAs).
MAX_RANK = 256

_LAYER_ATTR = "_svdquant_loras"  # on each layer: {lora name: _Adapter}
_HOOKS_ATTR = "_svdquant_lora_hooks"  # on each layer: the hook handles while LoRAs are loaded
_MODEL_ATTR = "_svdquant_lora_registry"  # on the model: {lora name: LoraInfo}


class LoraError(ValueError):
    """A LoRA that cannot be loaded (the message names the file)."""


class LoraFileError(LoraError):
    """A corrupt, truncated or unsupported LoRA file."""


class LoraMismatchError(LoraError):
    """A LoRA that does not fit the model: keys that match no layer, or wrong shapes."""


class LoraRankError(LoraError):
    """A layer's low-rank branch would exceed the rank limit."""


@dataclass
class LoraInfo:
    """What ``list_loras`` reports about one loaded LoRA."""

    name: str
    path: str
    strength: float
    format: str  # "peft" or "kohya"
    layers: list[str]  # the model's layers it modifies
    rank: int  # the largest rank of its factors


@dataclass
class LoraPair:
    """One LoRA module of a file: ``down`` A [r, K], ``up`` B [N, r], ``scale`` alpha / r."""

    key: str  # the module name as written in the file
    down: torch.Tensor
    up: torch.Tensor
    scale: float


@dataclass
class _Adapter:
    """One LoRA on one layer. ``down`` is A · s for an ``SVDQLinear`` (in the branch's
    dtype) and A for an ``nn.Linear``; ``up`` is B, unscaled (so the strength can change).
    An ``SVDQLinear``'s are kept on the host: the layer holds them stacked into its
    low-rank branch on its device (``_rebuild``), so the GPU holds a LoRA once."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    strength: float

    @property
    def factor(self) -> float:
        return self.strength * self.scale


@dataclass
class _Target:
    """Where (part of) a LoRA pair goes: layer ``module`` takes rows ``rows`` of B."""

    module: str
    rows: slice | torch.Tensor = field(default_factory=lambda: slice(None))


# --- reading files -----------------------------------------------------------------------

_SUFFIXES = {  # key ending -> (factor, format)
    ".lora_A.weight": ("down", "peft"),
    ".lora_B.weight": ("up", "peft"),
    ".lora_A.default.weight": ("down", "peft"),
    ".lora_B.default.weight": ("up", "peft"),
    ".lora_down.weight": ("down", "kohya"),
    ".lora_up.weight": ("up", "kohya"),
    ".lora.down.weight": ("down", "peft"),  # diffusers' older attention-processor format
    ".lora.up.weight": ("up", "peft"),
    ".alpha": ("alpha", None),
}
_UNSUPPORTED = {  # key fragment -> what it is
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "hada_": "LoHa",
    "lokr_": "LoKr",
}


def _split_key(key: str) -> tuple[str, str, str | None] | None:
    for suffix, (what, fmt) in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], what, fmt
    return None


def _strip_component(key: str) -> str:
    return key.split(".", 1)[1] if key.startswith(("transformer.", "unet.")) else key


def _peft_scales(meta: dict[str, str], bases: list[str]) -> dict[str, float]:
    """alpha per base key from diffusers' ``lora_adapter_metadata`` (a PEFT LoraConfig,
    keys optionally prefixed ``transformer.``); ``scale = alpha / r`` is applied later."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    cfg = {_strip_component(k): v for k, v in cfg.items()}
    alpha = cfg.get("lora_alpha")
    if alpha is None:
        return {}
    patterns = cfg.get("alpha_pattern") or {}
    out = {}
    for base in bases:
        a = alpha
        for pat, value in patterns.items():
            if re.fullmatch(rf"(.*\.)?{pat}", base):
                a = value
        out[base] = float(a)
    return out


def read_lora(path: str | os.PathLike[str]) -> tuple[list[LoraPair], str, list[str]]:
    """Read a LoRA safetensors file: ``(pairs, format, skipped keys)``.

    Text-encoder entries (``lora_te*``, ``text_encoder*.``) are skipped: svdquant patches
    the denoiser only. Raises ``LoraFileError`` for a corrupt or unsupported file.
    """
    from safetensors import SafetensorError, safe_open

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA file at {file}")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraFileError(f"{file}: not a readable safetensors file ({e})") from None

    parts: dict[str, dict[str, torch.Tensor]] = {}
    formats: set[str] = set()
    skipped, bad = [], []
    for key, t in tensors.items():
        if key.startswith(("lora_te", "text_encoder", "te1.", "te2.")):
            skipped.append(key)
            continue
        kind = next((v for k, v in _UNSUPPORTED.items() if k in key), None)
        if kind:
            raise LoraFileError(f"{file}: {kind} weights ({key!r}) are not supported, only LoRA")
        split = _split_key(key)
        if split is None:
            bad.append(key)
            continue
        base, what, fmt = split
        parts.setdefault(base, {})[what] = t
        if fmt:
            formats.add(fmt)
    if bad:
        raise LoraFileError(
            f"{file}: {len(bad)} key(s) are not LoRA factors: {_listing(bad)} "
            f"(expected names ending in one of {sorted(_SUFFIXES)})"
        )
    if not parts:
        raise LoraFileError(f"{file}: no LoRA weights for the denoiser in this file")
    peft_alpha = _peft_scales(meta, list(parts))

    pairs = []
    for base, p in parts.items():
        if "down" not in p or "up" not in p:
            raise LoraFileError(
                f"{file}: {base!r} has {sorted(p)} but a LoRA needs both down and up factors"
            )
        down, up = p["down"], p["up"]
        if down.ndim == 4 and down.shape[2:] == (1, 1):  # 1x1 convolution LoRA
            down, up = down.flatten(1), up.flatten(1)
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoraFileError(
                f"{file}: {base!r}: down {tuple(down.shape)} and up {tuple(up.shape)} are "
                "not the factors of one LoRA ([r, K] and [N, r])"
            )
        if not (down.is_floating_point() and up.is_floating_point()):
            raise LoraFileError(f"{file}: {base!r}: LoRA factors must be floating point")
        r = down.shape[0]
        alpha = float(p["alpha"]) if "alpha" in p else peft_alpha.get(base, float(r))
        pairs.append(LoraPair(base, down, up, alpha / r))
    fmt = "kohya" if formats == {"kohya"} else "peft"
    return pairs, fmt, skipped


# --- mapping file keys to the model's layers -----------------------------------------------

_PREFIXES = (
    "base_model.model.",
    "transformer.",
    "unet.",
    "model.diffusion_model.",
    "diffusion_model.",
    "lora_unet_",
    "lora_transformer_",
)

_QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
_ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")


def _flux_bfl(name: str) -> tuple[str, ...] | str | None:
    """The diffusers layers behind an original-FLUX (BFL) layer name, underscored
    (``double_blocks_0_img_attn_qkv``). A tuple: a fused layer whose output rows are the
    listed layers' outputs in order. ``"norm_out.linear:swap"``: BFL's final modulation is
    (shift, scale), diffusers' (scale, shift)."""
    parts = "attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin"
    m = re.fullmatch(rf"double_blocks_(\d+)_(img|txt)_({parts})", name)
    if m:
        i, img, part = m.group(1), m.group(2) == "img", m.group(3)
        blk = f"transformer_blocks.{i}."
        table = {
            "attn_qkv": _QKV if img else _ADD_QKV,
            "attn_proj": "attn.to_out.0" if img else "attn.to_add_out",
            "mlp_0": "ff.net.0.proj" if img else "ff_context.net.0.proj",
            "mlp_2": "ff.net.2" if img else "ff_context.net.2",
            "mod_lin": "norm1.linear" if img else "norm1_context.linear",
        }
        t = table[part]
        return tuple(blk + x for x in t) if isinstance(t, tuple) else blk + t
    m = re.fullmatch(r"single_blocks_(\d+)_(linear1|linear2|modulation_lin)", name)
    if m:
        blk = f"single_transformer_blocks.{m.group(1)}."
        part = m.group(2)
        if part == "linear1":
            return tuple(blk + x for x in (*_QKV, "proj_mlp"))
        return blk + ("proj_out" if part == "linear2" else "norm.linear")
    fixed = {
        "img_in": "x_embedder",
        "txt_in": "context_embedder",
        "final_layer_linear": "proj_out",
        "final_layer_adaLN_modulation_1": "norm_out.linear:swap",
        "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    }
    return fixed.get(name)


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a LoRA can target: ``SVDQLinear`` and ``nn.Linear``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDQLinear | nn.Linear)}


def _resolve(key: str, layers: dict[str, nn.Module], flat: dict[str, str]) -> list[_Target]:
    """The targets of one file key, or [] if it matches no layer."""
    name = key
    for p in _PREFIXES:
        if name.startswith(p):
            name = name[len(p) :]
            break
    if name in layers:  # diffusers dotted names
        return [_Target(name)]
    under = name.replace(".", "_")
    if under in flat:  # kohya: diffusers names with "_" for "."
        return [_Target(flat[under])]
    bfl = _flux_bfl(under)  # original-FLUX names (kohya underscored or dotted)
    if bfl is None:
        return []
    if isinstance(bfl, str):
        mod, _, how = bfl.partition(":")
        if mod not in layers:
            return []
        if how == "swap":
            n = _out_features(layers[mod])
            h = n // 2
            return [_Target(mod, torch.cat([torch.arange(h, n), torch.arange(0, h)]))]
        return [_Target(mod)]
    if not all(m in layers for m in bfl):
        return []
    out, start = [], 0
    for mod in bfl:
        n = _out_features(layers[mod])
        out.append(_Target(mod, slice(start, start + n)))
        start += n
    return out


def _out_features(m: nn.Module) -> int:
    return m.out_features


def _in_features(m: nn.Module) -> int:
    return m.in_features


def _listing(keys: list[str], n: int = 10) -> str:
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


# --- applying ------------------------------------------------------------------------------


def _adapters(layer: nn.Module) -> dict[str, _Adapter]:
    return layer.__dict__.get(_LAYER_ATTR, {})


def _sliced_state_dict(module: SVDQLinear, state_dict: dict, prefix: str, _meta: Any) -> None:
    """state_dict post-hook: save the base low-rank branch only (no LoRA columns)."""
    r = module.rank
    state_dict[prefix + "lowrank_down"] = state_dict[prefix + "lowrank_down"][:r]
    state_dict[prefix + "lowrank_up"] = state_dict[prefix + "lowrank_up"][:, :r]


def _refuse_load(module: nn.Module, _sd: dict, prefix: str, *_args: Any) -> None:
    """load_state_dict pre-hook while LoRAs are loaded."""
    raise LoraError(
        f"layer {prefix.rstrip('.')!r} has LoRAs loaded ({', '.join(_adapters(module))}): "
        "unload them (svdquant.lora.unload_lora) before loading a state dict"
    )


def _linear_hook(module: nn.Linear, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """Forward hook of a 16-bit ``nn.Linear``: add every loaded LoRA's delta."""
    x = args[0]
    for a in _adapters(module).values():
        if a.down.device != x.device or a.down.dtype != x.dtype:
            a.down, a.up = a.down.to(x.device, x.dtype), a.up.to(x.device, x.dtype)
        out = out + a.factor * nn.functional.linear(nn.functional.linear(x, a.down), a.up)
    return out


#: A LoRA'd layer's branch is padded with zero rows (L_down) and columns (L_up) to a
#: multiple of this: the warp-specialized GEMM takes ranks of 16s only (a rank-8 LoRA on a
#: rank-32 layer, 40, would run on the slower Triton GEMM), the quantize computes the
#: same parts either way (40 and 48 are both 32 + 16 there), and zeros add exact zeros.
RANK_MULTIPLE = 16

_PAD_ATTR = "_svdquant_lora_pad"  # on each LoRA'd layer: the zero rows padding its branch


def lora_rows(layer: SVDQLinear) -> int:
    """The LoRA rows of ``layer``'s low-rank branch, past its base rank and before the
    zero rows padding it (``RANK_MULTIPLE``)."""
    return layer.lowrank_down.shape[0] - layer.rank - layer.__dict__.get(_PAD_ATTR, 0)


def _rebuild(layer: SVDQLinear) -> None:
    """Set ``lowrank_down``/``lowrank_up`` to the base branch followed by each LoRA,
    padded with zeros to a multiple of ``RANK_MULTIPLE`` (none without LoRAs)."""
    r = layer.rank
    down, up = layer.lowrank_down, layer.lowrank_up
    downs, ups = [down[:r]], [up[:, :r]]
    for a in _adapters(layer).values():
        downs.append(a.down.to(down.device, down.dtype))
        ups.append((a.up.to(up.device).float() * a.factor).to(up.dtype))
    rows = sum(d.shape[0] for d in downs)
    pad = -rows % RANK_MULTIPLE if len(downs) > 1 else 0
    if pad:
        downs.append(down.new_zeros(pad, down.shape[1]))
        ups.append(up.new_zeros(up.shape[0], pad))
    layer.lowrank_down = torch.cat(downs).contiguous()
    layer.lowrank_up = torch.cat(ups, dim=1).contiguous()
    layer.__dict__[_PAD_ATTR] = pad


def _attach(layer: nn.Module, name: str, adapter: _Adapter) -> None:
    if _LAYER_ATTR not in layer.__dict__:
        layer.__dict__[_LAYER_ATTR] = {}
        if isinstance(layer, SVDQLinear):
            hooks = [
                layer.register_state_dict_post_hook(_sliced_state_dict),
                layer.register_load_state_dict_pre_hook(_refuse_load),
            ]
        else:
            hooks = [layer.register_forward_hook(_linear_hook)]
        layer.__dict__[_HOOKS_ATTR] = hooks
    layer.__dict__[_LAYER_ATTR][name] = adapter
    if isinstance(layer, SVDQLinear):
        _rebuild(layer)


def _detach(layer: nn.Module, name: str) -> None:
    adapters = _adapters(layer)
    adapters.pop(name, None)
    if isinstance(layer, SVDQLinear):
        _rebuild(layer)
    if not adapters:
        for h in layer.__dict__.pop(_HOOKS_ATTR, []):
            h.remove()
        layer.__dict__.pop(_LAYER_ATTR, None)
        layer.__dict__.pop(_PAD_ATTR, None)


def _model(model_or_pipe: Any, changes: bool = True) -> nn.Module:
    """The denoiser of a pipeline, or the module itself — the module inside a
    ``cuda_graphed`` wrapper, whose graphs are dropped when the LoRAs ``changes`` (they
    read the low-rank factors a LoRA replaces)."""
    from svdquant.cuda_graph import CUDAGraphed

    model = model_or_pipe
    if not isinstance(model, nn.Module):
        from svdquant.pipeline import denoiser

        model = denoiser(model_or_pipe)[1]
    if isinstance(model, CUDAGraphed):
        if changes:
            model.reset()
        model = model.module
    return model


@contextlib.contextmanager
def _separate_layers(model: nn.Module) -> Iterator[None]:
    """LoRAs change on separate layers: a fused model (``svdquant.fuse_projections``) is
    unfused for the change and fused again after it, whatever happens — the same runtime,
    its fused layers stacked anew with the LoRAs as they now are."""
    from svdquant.fuse import fuse_projections, is_fused, unfuse_projections

    fused = is_fused(model)
    if fused:
        unfuse_projections(model)
    try:
        yield
    finally:
        if fused:
            fuse_projections(model)


def _registry(model: nn.Module) -> dict[str, LoraInfo]:
    return model.__dict__.setdefault(_MODEL_ATTR, {})


@torch.no_grad()
def load_lora(
    model_or_pipe: Any,
    path: str | os.PathLike[str],
    strength: float = 1.0,
    name: str | None = None,
    *,
    max_rank: int = MAX_RANK,
) -> str:
    """Load the LoRA at ``path`` (diffusers/PEFT or kohya safetensors) into a quantized
    model (or a pipeline's denoiser) at ``strength``; returns its name (default: the
    file's stem). Several LoRAs can be loaded at once; their deltas add up.

    ``SVDQLinear`` layers get the LoRA as extra rank of their low-rank branch (exact, no
    requantization); ``nn.Linear`` layers as a forward hook. Everything is checked before
    any layer changes, so a failed load leaves the model as it was.

    Raises ``LoraFileError`` (corrupt / unsupported file), ``LoraMismatchError`` (keys that
    match no layer, wrong shapes: e.g. a LoRA for another architecture) and
    ``LoraRankError`` (a layer's branch would exceed ``max_rank`` = base rank + LoRA ranks).
    """
    model = _model(model_or_pipe)
    with _separate_layers(model):
        return _load(model, Path(path), strength, name, max_rank)


def _load(model: nn.Module, file: Path, strength: float, name: str | None, max_rank: int) -> str:
    """``load_lora`` on a model whose projections are not fused."""
    name = name if name is not None else file.stem
    registry = _registry(model)
    if name in registry:
        raise LoraError(f"{file}: a LoRA named {name!r} is already loaded; unload it or pass name=")
    pairs, fmt, skipped = read_lora(file)
    layers = _layers(model)
    flat = {n.replace(".", "_"): n for n in layers}

    plan: list[tuple[LoraPair, list[_Target]]] = []
    unmatched = []
    for pair in pairs:
        targets = _resolve(pair.key, layers, flat)
        if targets:
            plan.append((pair, targets))
        else:
            unmatched.append(pair.key)
    arch = type(model).__name__
    if not plan:
        raise LoraMismatchError(
            f"{file}: none of its {len(pairs)} LoRA layers matches a layer of {arch}: is it a "
            f"LoRA for another architecture? Its layers: {_listing(unmatched)}"
        )
    if unmatched:
        raise LoraMismatchError(
            f"{file}: {len(unmatched)} of its {len(pairs)} LoRA layers match no layer of "
            f"{arch}: {_listing(unmatched)}"
        )

    # Check every shape and rank before touching the model.
    extra: dict[str, int] = {}
    for pair, targets in plan:
        n_total = sum(
            _out_features(layers[t.module]) if isinstance(t.rows, slice) else len(t.rows)
            for t in targets
        )
        k = _in_features(layers[targets[0].module])
        if pair.down.shape[1] != k or pair.up.shape[0] != n_total:
            where = " + ".join(t.module for t in targets)
            raise LoraMismatchError(
                f"{file}: LoRA layer {pair.key!r} has down {tuple(pair.down.shape)} and up "
                f"{tuple(pair.up.shape)}, but {arch}.{where} needs [r, {k}] and [{n_total}, r]"
                ": a LoRA for another architecture or model size?"
            )
        for t in targets:
            extra[t.module] = extra.get(t.module, 0) + pair.down.shape[0]
    for mod, r_new in extra.items():
        layer = layers[mod]
        base = layer.rank if isinstance(layer, SVDQLinear) else 0
        total = base + sum(a.down.shape[0] for a in _adapters(layer).values()) + r_new
        if total > max_rank:
            raise LoraRankError(
                f"{file}: layer {mod!r} would have a low-rank branch of rank {total} (base "
                f"{base} + loaded LoRAs + {r_new} from this file), above the limit {max_rank} "
                "(raise it with max_rank=, if the engine supports it)"
            )

    for pair, targets in plan:
        for t in targets:
            layer = layers[t.module]
            up = pair.up[t.rows]
            if isinstance(layer, SVDQLinear):  # on the host (see _Adapter)
                down = pair.down.cpu().float() * layer.smooth.detach().cpu().float()
                down, up = down.to(layer.lowrank_down.dtype), up.cpu()
            else:
                down = pair.down.to(layer.weight.device, layer.weight.dtype)
                up = up.to(layer.weight.device, layer.weight.dtype)
            # one pair can target a layer once; a second pair on it gets its own sub-name
            key = name if name not in _adapters(layer) else f"{name}#{pair.key}"
            _attach(layer, key, _Adapter(down, up.contiguous(), pair.scale, float(strength)))
    if skipped:
        warnings.warn(
            f"{file}: skipped {len(skipped)} text-encoder key(s) (svdquant patches the "
            f"denoiser only): {_listing(skipped, 3)}",
            stacklevel=2,
        )
    registry[name] = LoraInfo(
        name=name,
        path=str(file),
        strength=float(strength),
        format=fmt,
        layers=sorted(extra),
        rank=max(p.down.shape[0] for p, _ in plan),
    )
    return name


def _each(model: nn.Module, name: str, fn: Callable[[nn.Module, str], None]) -> LoraInfo:
    registry = _registry(model)
    if name not in registry:
        raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {sorted(registry)})")
    info = registry[name]
    for mod in info.layers:
        layer = model.get_submodule(mod)
        for key in [k for k in _adapters(layer) if k == name or k.startswith(f"{name}#")]:
            fn(layer, key)
    return info


@torch.no_grad()
def set_lora_strength(model_or_pipe: Any, name: str, value: float) -> None:
    """Change the strength of the loaded LoRA ``name`` (0 turns it off, negative works)."""
    model = _model(model_or_pipe)

    def set_one(layer: nn.Module, key: str) -> None:
        _adapters(layer)[key].strength = float(value)
        if isinstance(layer, SVDQLinear):
            _rebuild(layer)

    with _separate_layers(model):
        _each(model, name, set_one).strength = float(value)


@torch.no_grad()
def unload_lora(model_or_pipe: Any, name: str) -> None:
    """Remove the LoRA ``name``; the layers it touched get back their exact base branch
    (plus any other LoRAs still loaded)."""
    model = _model(model_or_pipe)
    with _separate_layers(model):
        _each(model, name, _detach)
        del _registry(model)[name]


def list_loras(model_or_pipe: Any) -> list[LoraInfo]:
    """The loaded LoRAs, in load order."""
    return list(_registry(_model(model_or_pipe, changes=False)).values())
