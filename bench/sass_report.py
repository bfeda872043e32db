"""What the H100 will run, read without an H100: compile the engine's kernels for sm_90.

    python bench/sass_report.py [--kernels quantize,gemv_fma,...] [--dump DIR] [--json PATH]

Triton compiles for any target on a machine without a GPU (its wheel ships ``ptxas`` and
``cuobjdump``), so the code the kernels become at FLUX's shapes can be inspected on the
CPU: registers and spills (occupancy), global load/store widths (``LDG.E.128`` is a
16-byte vector; ``LDG.E.U8`` a single byte: a mask or an offset the compiler cannot
prove aligned), barriers and shared-memory stores (``BAR.SYNC``/``STS``: data moved
between register layouts), MMA instructions, and — from the TTGIR — the layout
conversions inside the main loop. Two GEMV redesigns of 2026-11-25 came from this report
(bench/NOTES.md, v7–v8): a 4-D token axis that moved the decoded weights through shared
memory every step, and a mask on a strided index that split 16-byte loads into bytes.

The numbers are the local triton's code generation (CI: triton 3.9; the device runs
3.6, whose code can differ): a guide to what to measure, not a measurement.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

#: (kernel name) -> (module, kernel attribute, pointer dtypes, int arguments, constexprs,
#: num_warps); shapes: FLUX.1-dev at 1024x1024 (M = 4608, K = 3072, rank 32; the GEMV at
#: N = 18432, one token)
SPECS: dict[str, Callable[[], dict[str, Any]]] = {}


def _spec(name: str):
    def wrap(fn):
        SPECS[name] = fn
        return fn

    return wrap


def _quantize_spec(
    tail_act: int,
    x: str = "bf16",
    ld: str = "bf16",
    rank: int = 32,
    split: bool = False,
    sliced: bool = False,
    tile: str = "large",
) -> dict[str, Any]:
    from svdquant.kernels import quantize as q

    bm, bk, warps = q.TILES[tile]
    before, q.SPLIT_RANK = q.SPLIT_RANK, split
    br, br2 = q.rank_parts(rank)
    q.SPLIT_RANK = before
    if sliced:  # (``quantize.RANK_SLICES``: a slice of 64 columns a program)
        br, br2 = q.RANK_SLICE, 0
    bm = q.rows_per_program(bm, br + br2)
    k = 15360 if tail_act >= 0 else 3072  # with a tail: FLUX's single-block proj_out input
    return dict(
        kernel=q._quantize_act_kernel,
        ptrs=dict(
            x_ptr=f"*{x}",
            tail_ptr=f"*{x}",
            smooth_ptr="*fp32",
            ld_ptr=f"*{ld}",
            scale_ptr="*fp32",
            xq_ptr="*fp8e4nv",
            lora_ptr="*fp32",
        ),
        ints=dict(
            M=4608,
            K=k,
            K_HEAD=3072,
            K_OUT=k,
            R=rank,
            k_per_split=256,
            stride_xm=3072,
            stride_tm=k - 3072,
            stride_qm=k,
            stride_ldr=k,
            stride_lm=rank,
        ),
        consts=dict(
            INT4=True,
            HAS_LORA=True,
            ATOMIC=True,
            EXACT=False,
            TAIL_ACT=tail_act,
            SEAM_ALIGNED=True,
            ROUND_BF16=False,
            BLOCK_M=bm,
            BLOCK_R=br,
            BLOCK_K=bk,
            BLOCK_R2=br2,
            **({"R_SLICED": True} if sliced else {}),
        ),
        warps=warps,
        stages=1,
    )


@_spec("quantize")
def _quantize() -> dict[str, Any]:
    return _quantize_spec(-1)


# The low-rank branch at a LoRA's stacked ranks: one part padded to a power of two, or
# two (``quantize.SPLIT_RANK``). Rank 48: a rank-16 LoRA on a rank-32 layer; 80: a fused
# double block's q/k/v with one each; 96: a fused single block's four layers.
for _name, _tail, _rank, _split in (
    ("quantize_rank48", -1, 48, False),
    ("quantize_rank48_split", -1, 48, True),
    ("quantize_rank80_split", -1, 80, True),
    ("quantize_rank96", -1, 96, False),
    ("quantize_rank96_split", -1, 96, True),
    ("quantize_cat_rank96_split", 1, 96, True),
    ("quantize_rank160", -1, 160, False),
    ("quantize_rank160_split", -1, 160, True),
):
    SPECS[_name] = functools.partial(_quantize_spec, _tail, rank=_rank, split=_split)
# ranks over 128 in slices of 64 columns, a program each (``quantize.RANK_SLICES``)
SPECS["quantize_rank160_sliced"] = functools.partial(_quantize_spec, -1, rank=160, sliced=True)
SPECS["quantize_cat_rank160_sliced"] = functools.partial(_quantize_spec, 1, rank=160, sliced=True)
# a fused FLUX single block with a rank-128 LoRA on each layer (32 + 4 x 128) at 64 rows
# or fewer: one 1024-wide part against slices (``quantize.rank_slices`` past 256)
SPECS["quantize_small_rank544"] = functools.partial(
    _quantize_spec, -1, rank=544, split=True, tile="small"
)
SPECS["quantize_small_rank544_sliced"] = functools.partial(
    _quantize_spec, -1, rank=544, sliced=True, tile="small"
)


@_spec("quantize_cat")
def _quantize_cat() -> dict[str, Any]:
    """proj_out's input: the attention output, then GELU(the MLP's up projection)."""
    return _quantize_spec(1)


@_spec("quantize_gated")
def _quantize_gated() -> dict[str, Any]:
    """SDXL's GEGLU down projection's input: x · gelu(gate), the two halves of the up
    projection's output (K = 5120, rows 2K apart)."""
    spec = _quantize_spec(3)
    k = 5120
    spec["ints"].update(K=k, K_HEAD=k, K_OUT=k, stride_xm=2 * k, stride_tm=2 * k, stride_qm=k,
                        stride_ldr=k)  # fmt: skip
    spec["consts"].update(GATED=True, SEAM_ALIGNED=False)
    return spec


@_spec("quantize_gated_tanh")
def _quantize_gated_tanh() -> dict[str, Any]:
    spec = _quantize_gated()
    spec["consts"].update(TAIL_ACT=1)
    return spec


@_spec("quantize_fp32_fp16")
def _quantize_fp32_fp16() -> dict[str, Any]:
    """An fp32 model's input against a 16-bit low-rank branch (mixed dtypes)."""
    return _quantize_spec(1, x="fp32", ld="fp16")


@_spec("rope")
def _rope() -> dict[str, Any]:
    """q of a FLUX double block: 512 text + 4096 image tokens, 24 heads of 128."""
    from svdquant.kernels import rope as r

    rows, warps = r.TILE
    return dict(
        kernel=r._rms_norm_rope_kernel,
        ptrs=dict(
            x_ptr="*bf16",
            head_ptr="*bf16",
            w_ptr="*bf16",
            wh_ptr="*bf16",
            cos_ptr="*fp32",
            sin_ptr="*fp32",
            out_ptr="*bf16",
        ),
        ints=dict(
            rows_total=4608 * 24,
            S_HEAD=512,
            S_ALL=4608,
            H=24,
            sxb=4096 * 3072,
            sxs=3072,
            sxh=128,
            shb=512 * 3072,
            shs=3072,
            shh=128,
            scs=128,
            sss=128,
        ),
        floats=dict(eps=1e-6),
        consts=dict(HAS_HEAD=True, HAS_W=True, ROUND_BF16=False, D=128, BLOCK_R=rows),
        warps=warps,
        stages=1,
        options=dict(enable_fp_fusion=False),  # as the launcher
    )


@_spec("rope_packed")
def _rope_packed() -> dict[str, Any]:
    """The same on pairs packed in words (``rope.PACKED``): rows as int32, cos / sin as
    int64, strides in those words."""
    import triton.language as tl

    from svdquant.kernels import rope as r

    spec = _rope()
    spec["kernel"] = r._rms_norm_rope_packed_kernel
    spec["ptrs"] = dict(x_ptr="*i32", head_ptr="*i32", w_ptr="*i32", wh_ptr="*i32",
                        cos_ptr="*i64", sin_ptr="*i64", out_ptr="*i32")  # fmt: skip
    spec["ints"] = {k: v // 2 if k.startswith(("sx", "sh")) else v // 2 if k in ("scs", "sss")
                    else v for k, v in spec["ints"].items()}  # fmt: skip
    rows, warps = r.PACKED_TILE
    spec["consts"] = dict(HAS_HEAD=True, HAS_W=True, ROUND_BF16=False, DTYPE=tl.bfloat16, D=128,
                          BLOCK_R=rows)  # fmt: skip
    spec["warps"] = warps
    return spec


@_spec("modulate")
def _modulate() -> dict[str, Any]:
    """FLUX's adaptive norm on a double block's 4096 image tokens, 3072 channels."""
    from svdquant.kernels import modulate as mo

    rows, warps = mo.TILE
    return dict(
        kernel=mo._layer_norm_modulate_kernel,
        ptrs=dict(x_ptr="*bf16", scale_ptr="*bf16", shift_ptr="*bf16", out_ptr="*bf16"),
        ints=dict(M=4096, S=4096, C=3072, stride_xm=3072, stride_sb=6 * 3072, stride_hb=6 * 3072),
        floats=dict(eps=1e-6),
        consts=dict(ROUND_BF16=False, BLOCK_C=4096, ROWS=rows),
        warps=warps,
        stages=1,
        options=dict(enable_fp_fusion=False),
    )


@_spec("gate_residual")
def _gate_residual() -> dict[str, Any]:
    """A gated branch joining a double block's image stream."""
    from svdquant.kernels import modulate as mo

    rows, warps = mo.TILE
    return dict(
        kernel=mo._gate_residual_kernel,
        ptrs=dict(r_ptr="*bf16", g_ptr="*bf16", x_ptr="*bf16", out_ptr="*bf16"),
        ints=dict(M=4096, S=4096, C=3072, stride_rm=3072, stride_gb=6 * 3072, stride_xm=3072),
        consts=dict(CLIP_FP16=False, ROUND_BF16=False, BLOCK_C=4096, ROWS=rows),
        warps=warps,
        stages=1,
        options=dict(enable_fp_fusion=False),
    )


@_spec("gate_residual_modulate")
def _gate_residual_modulate() -> dict[str, Any]:
    """A double block's attention output joining its image stream, and the feed-forward's
    adaptive norm of the sum."""
    from svdquant.kernels import modulate as mo

    spec = _gate_residual()
    spec["kernel"] = mo._gate_residual_modulate_kernel
    spec["ptrs"] = dict(r_ptr="*bf16", g_ptr="*bf16", x_ptr="*bf16", scale_ptr="*bf16",
                        shift_ptr="*bf16", h_ptr="*bf16", out_ptr="*bf16")  # fmt: skip
    spec["ints"] = {**spec["ints"], "stride_sb": 6 * 3072, "stride_hb": 6 * 3072}
    spec["floats"] = dict(eps=1e-6)
    return spec


@_spec("widen")
def _widen() -> dict[str, Any]:
    from svdquant.kernels import widen as w

    bn, bk, warps = w.TILE
    return dict(
        kernel=w._widen_kernel,
        ptrs=dict(q_ptr="*u8", sc_ptr="*fp16", ts_ptr="*fp32", w_ptr="*fp8e4nv", sch_ptr="*fp32"),
        ints=dict(N=12288, KP=3072, G=48, stride_qn=1536, stride_sn=48, stride_wn=3072),
        consts=dict(
            NVFP4=False,
            EXACT=False,
            DEQUANT=False,
            GROUP=64,
            QMAX=7,
            BLOCK_N=bn,
            BLOCK_G=64,
            BLOCK_K=bk,
            K_FAST=w.K_FAST,
        ),
        warps=warps,
    )


def _gemv_common() -> dict[str, Any]:
    return dict(
        ptrs=dict(
            xh_ptr="*fp32",
            sc_ptr="*fp16",
            ts_ptr="*fp32",
            lora_ptr="*fp32",
            lu_ptr="*bf16",
            bias_ptr="*bf16",
            out_ptr="*bf16",
        ),
        consts=dict(
            NVFP4=False,
            GROUP=64,
            ATOMIC=False,
            HAS_LORA=True,
            HAS_BIAS=True,
            ROUND_BF16=False,
            FP32_PREC="tf32x3",
            PDL=True,
        ),
    )


@_spec("gemv_fma")
def _gemv_fma() -> dict[str, Any]:
    from svdquant.kernels import gemv as g

    bn, bk, warps = g.TILES["fma"]
    d = _gemv_common()
    d["ptrs"]["q_ptr"] = "*i32"
    d["ints"] = dict(
        M=1,
        N=18432,
        R=32,
        S=12,
        kw_per_split=384,
        stride_hm=3072,
        stride_qn=384,
        stride_sn=48,
        stride_ls=32,
        stride_lm=32,
        stride_un=32,
        stride_om=18432,
        magic=g.MAGIC_2P23,
    )
    d["consts"] |= dict(S_BLOCK=16, BLOCK_N=bn, BLOCK_K=bk, KPW=384, BLOCK_M=1)
    return dict(kernel=g._w4a16_fma_kernel, warps=warps, **d)


def _dp4a_spec(m: int) -> dict[str, Any]:
    """The dp4a GEMV (int4 codes against x̂ as 16-bit integers), ``m`` tokens."""
    from svdquant.kernels import gemv as g

    bn, bk, warps = g.TILES["dp4a" if m == 1 else "dp4a_multi"]
    d = _gemv_common()
    d["ptrs"] = {k: v for k, v in d["ptrs"].items() if k != "xh_ptr"}
    d["ptrs"] |= {"xq_ptr": "*i32", "xs_ptr": "*fp32", "q_ptr": "*i32"}
    d["ints"] = dict(
        M=m, N=18432, R=32, S=24, kw_per_split=384, stride_xm=1536, stride_qn=384,
        stride_sn=48, stride_ls=32 * m, stride_lm=32, stride_un=32, stride_om=18432,
    )  # fmt: skip
    consts = {k: v for k, v in d["consts"].items() if k not in ("NVFP4", "GROUP")}
    d["consts"] = consts | dict(
        S_BLOCK=16 // m, BLOCK_N=bn, BLOCK_K=bk, KPW=384, BLOCK_M=m, INTERPRET=False
    )
    return dict(kernel=g._w4a16_dp4a_kernel, warps=warps, **d)


@_spec("gemv_dp4a")
def _gemv_dp4a() -> dict[str, Any]:
    return _dp4a_spec(1)


@_spec("gemv_dp4a_xrows")
def _gemv_dp4a_xrows() -> dict[str, Any]:
    """x̂ addressed per weight row (``gemv.DP4A_X_ROWS``), one token."""
    d = _dp4a_spec(1)
    d["consts"]["X_ROWS"] = True
    return d


@_spec("gemv_dp4a_m4_xrows")
def _gemv_dp4a_m4_xrows() -> dict[str, Any]:
    d = _dp4a_spec(4)
    d["consts"]["X_ROWS"] = True
    return d


@_spec("gemv_dp4a_m4")
def _gemv_dp4a_m4() -> dict[str, Any]:
    return _dp4a_spec(4)


def _packed_spec(groups_per_step: int | None = None) -> dict[str, Any]:
    """The packed-decode tensor-core GEMV (``gemv.PACKED_MMA``), 4 tokens, at
    ``TILES["packed"]`` (its groups per step replaced by ``groups_per_step``)."""
    from svdquant.kernels import gemv as g

    bn, gps, warps = g.TILES["packed"]
    gps = gps if groups_per_step is None else groups_per_step
    d = _gemv_common()
    d["ptrs"] |= {"xh_ptr": "*bf16", "xs_ptr": "*fp32", "q_ptr": "*u8"}
    d["ints"] = dict(
        M=4, N=18432, KP=3072, R=32, S=24, k_per_split=768, stride_qn=1536, stride_sn=48,
        stride_ls=128, stride_lm=32, stride_un=32, stride_om=18432,
    )  # fmt: skip
    d["consts"] |= dict(ASM=True, DOT_FP32=False, BLOCK_N=bn, GROUPS_PER_STEP=gps)
    return dict(kernel=g._w4a16_packed_kernel, warps=warps, **d)


@_spec("gemv_packed")
def _gemv_packed() -> dict[str, Any]:
    return _packed_spec()


@_spec("gemv_packed_g2")
def _gemv_packed_g2() -> dict[str, Any]:
    """The packed GEMV with two groups (128 columns) a loop step."""
    return _packed_spec(2)


def _gluon_gemv_spec(m: int) -> dict[str, Any]:
    """The Gluon tensor-core GEMV (``kernels/gemv_gluon.py``) at ``m`` tokens, N = 18432,
    K = 3072, rank 32, split in 6 (8 groups a program)."""
    import torch
    from triton.experimental.gluon import language as gl

    from svdquant.kernels import gemv_gluon as g

    bn, gs, warps = g.TILE
    flat = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)
    return dict(
        kernel=g._w4a16_gluon_kernel,
        ptrs=dict(xh_ptr="*fp16", xo_ptr="*fp32", x_ptr="*bf16", smooth_ptr="*fp32", q_ptr="*u8",
                  q_desc=_desc(18432, 1536, torch.uint8, gl.uint8, [bn, 32 * gs], flat),
                  sc_ptr="*fp16", ts_ptr="*fp32",
                  lora_ptr="*fp32", lu_ptr="*bf16", bias_ptr="*bf16", out_ptr="*fp32",
                  times_ptr="*i64"),
        ints=dict(M=m, N=18432, K=3072, G=48, R=32, S=24, groups_per_split=8, stride_xm=3072,
                  stride_qn=1536, stride_sn=48, stride_ls=128, stride_lm=32, stride_un=32,
                  stride_om=18432),
        consts=dict(ATOMIC=True, HAS_LORA=True, HAS_BIAS=True, PDL=True, BN=bn, GS=gs, SG=8,
                    T=g.tokens(m), RB=32, STAGES=g.STAGES, SB=32, XIN=g.XHAT_IN_KERNEL,
                    TIMES=False),
        warps=warps,
    )  # fmt: skip


@_spec("gemv_gluon")
def _gemv_gluon() -> dict[str, Any]:
    return _gluon_gemv_spec(4)


@_spec("gemv_gluon_m16")
def _gemv_gluon_m16() -> dict[str, Any]:
    return _gluon_gemv_spec(16)


@_spec("gemv_prep")
def _gemv_prep() -> dict[str, Any]:
    from svdquant.kernels import gemv as g

    return dict(
        kernel=g._prep_kernel,
        ptrs=dict(
            x_ptr="*bf16",
            smooth_ptr="*fp32",
            ld_ptr="*bf16",
            xh_ptr="*fp32",
            lora_ptr="*fp32",
            xs_ptr="*fp32",
        ),
        ints=dict(
            M=1,
            K=3072,
            KP=3072,
            R=32,
            stride_xm=3072,
            stride_ldr=3072,
            stride_hm=3072,
            stride_ls=32,
            stride_lm=32,
        ),
        consts=dict(CHUNK=g.LORA_CHUNK, PLANES=8, PRESCALE=True, PDL=True),
        warps=4,
    )


def _prep_dp4a_spec(ld_first: bool) -> dict[str, Any]:
    """The prep kernel writing the dp4a GEMV's x̂ (``Int16X``), one token."""
    d = _gemv_prep()
    d["ptrs"]["xh_ptr"] = "*i32"
    d["consts"].update(PLANES=2, PRESCALE=False, I16=True, LD_FIRST=ld_first)
    return d


@_spec("gemv_prep_gluon")
def _gemv_prep_gluon() -> dict[str, Any]:
    """The Gluon GEMV's prep without x̂ (``gemv_gluon.XHAT_IN_KERNEL``): the low-rank sums
    of 16 token slots as one dot a rank block, the zeroing; four tokens."""
    d = _gemv_prep()
    d["ints"].update(M=4, stride_ls=4 * 32)
    d["ptrs"]["zero_ptr"] = "*fp32"
    d["ints"]["zero_numel"] = 4 * 18432
    d["consts"].update(CHUNK=128, PLANES=2, PRESCALE=False, F16=8, LD_FIRST=True, ZERO=True,
                       XHAT=False, DOT_PREC="tf32x3")  # fmt: skip
    return d


@_spec("gemv_prep_dp4a")
def _gemv_prep_dp4a() -> dict[str, Any]:
    """The dp4a GEMV's prep, L_down requested first (``gemv.PREP_LD_FIRST``)."""
    return _prep_dp4a_spec(True)


@_spec("gemv_prep_dp4a_ld_late")
def _gemv_prep_dp4a_ld_late() -> dict[str, Any]:
    """The dp4a GEMV's prep, L_down requested after x̂ is stored (before v31)."""
    return _prep_dp4a_spec(False)


@_spec("gemv_mma")
def _gemv_mma() -> dict[str, Any]:
    from svdquant.kernels import gemv as g

    bn, _, warps = g.TILES["mma"]
    d = _gemv_common()
    d["ptrs"]["q_ptr"] = "*u8"
    d["ints"] = dict(
        M=4,
        N=18432,
        KP=3072,
        R=32,
        S=12,
        k_per_split=3072,
        stride_hm=3072,
        stride_qn=1536,
        stride_sn=48,
        stride_ls=128,
        stride_lm=32,
        stride_un=32,
        stride_om=18432,
    )
    d["consts"] |= dict(S_BLOCK=1, DOT_FP32=False, BLOCK_N=bn, BLOCK_K=64)
    return dict(kernel=g._w4a16_mma_kernel, warps=warps, **d)


def _gemm(
    split: bool, tail: bool = False, next_int4: bool = False, tma: bool = False
) -> dict[str, Any]:
    from triton.runtime import JITFunction

    from svdquant.kernels import gemm as g

    fn = g._fp8_gemm_kernel
    while not isinstance(fn, JITFunction):  # the autotuner's wrapped JIT function
        fn = fn.fn
    return dict(
        kernel=fn,
        ptrs=dict(
            a_ptr="*fp8e4nv",
            b_ptr="*fp8e4nv",
            c_ptr="*bf16",
            sch_ptr="*fp32",
            scale_ptr="*fp32",
            lora_ptr="*fp32",
            lu_ptr="*bf16",
            bias_ptr="*bf16",
            inv_s2_ptr="*fp32",
            ld2_ptr="*bf16",
            scale2_ptr="*fp32",
            xq2_ptr="*fp8e4nv",
            lora2_ptr="*fp32",
            ws_ptr="*fp32",
            cnt_ptr="*i32",
        ),
        ints=dict(
            M=4608,
            N=3072 if tail or next_int4 else 21504,
            K=3072,
            R=32,
            M_BUCKET=8192,
            stride_am=3072,
            stride_bn=3072,
            stride_cm=21504,
            stride_lm=32,
            stride_un=32,
            K2_OUT=0,
            R2=0,
            stride_q2m=0,
            stride_ld2=0,
            stride_l2m=0,
            B1=3072,
            B2=6144,
            B3=9216,
            NUM_SMS=132,
            **_no_parts(),
            ACT_FROM=9216,
        ),
        consts=dict(
            HAS_LORA=True,
            HAS_BIAS=True,
            ROUND_BF16=False,
            BLOCK_R=32,
            DOT_FP32=False,
            NEXT=next_int4,
            SPLIT=split,
            ACT=1 if next_int4 else 0,
            NEXT_INT4=next_int4,
            BLOCK_R2=32 if next_int4 else 16,
            TAIL=tail,
            TMA=tma,
            PARTS=False,
            BLOCK_M=128,
            BLOCK_N=256,
            BLOCK_K=128,
            GROUP_M=8,
        ),
        warps=8,
        stages=3,
    )


@_spec("gemm")
def _gemm_plain() -> dict[str, Any]:
    return _gemm(split=False)


@_spec("gemm_gated")
def _gemm_gated() -> dict[str, Any]:
    """SDXL's GEGLU up projection (``gemm_gated``: C = 1280, H = 5120 at 1024 tokens):
    value and gate accumulators, the exact GELU, the int4 quantize of the down
    projection's input and its low-rank share."""
    from triton.runtime import JITFunction

    from svdquant.kernels import gemm_gated as gg

    fn = gg._gated_kernel
    while not isinstance(fn, JITFunction):  # the autotuner's wrapped JIT function
        fn = fn.fn
    d = _gemm(split=False, next_int4=True)
    for name in ("ws_ptr", "cnt_ptr"):
        del d["ptrs"][name]
    ints = d["ints"]
    d["ints"] = dict(M=1024, H=5120, K=1280, R=32, M_BUCKET=1024, stride_am=1280,
                     stride_bn=1280, stride_lm=32, stride_un=32, K2_OUT=5120, R2=32,
                     stride_q2m=5120, stride_ld2=5120, stride_l2m=32)  # fmt: skip
    del ints
    consts = {k: d["consts"][k] for k in ("HAS_LORA", "HAS_BIAS", "ROUND_BF16", "BLOCK_R",
                                          "DOT_FP32", "NEXT_INT4", "BLOCK_R2", "BLOCK_M",
                                          "BLOCK_K", "GROUP_M")}  # fmt: skip
    d["consts"] = {**consts, "ACT": 3, "BLOCK_H": 128}
    d["kernel"] = fn
    return d


@_spec("gemm_tma")
def _gemm_tma() -> dict[str, Any]:
    """The plain GEMM reading its operands through tensor descriptors (``gemm.TMA_LOADS``)."""
    d = _gemm(split=False, tma=True)
    d["ptrs"]["a_ptr"] = "tensordesc<fp8e4nv[128, 128]>"
    d["ptrs"]["b_ptr"] = "tensordesc<fp8e4nv[256, 128]>"
    return d


@_spec("gemm_tail")
def _gemm_tail() -> dict[str, Any]:
    """The plain GEMM with the split-K tail (``gemm.TAIL_SPLIT``) at N = 3072."""
    return _gemm(split=False, tail=True)


@_spec("gemm_next")
def _gemm_next() -> dict[str, Any]:
    """fc1 of the fused MLP: GELU, the int4 quantize of fc2's input, its low-rank share."""
    return _gemm(split=False, next_int4=True)


@_spec("gemm_split")
def _gemm_split() -> dict[str, Any]:
    """The fused single block's q/k/v/mlp GEMM writing four contiguous outputs."""
    return _gemm(split=True)


@_spec("gemm_split_act")
def _gemm_split_act() -> dict[str, Any]:
    """The same writing the MLP part as its GELU-tanh (``fp8_gemm_split(last_act=...)``)."""
    d = _gemm(split=True)
    d["consts"]["ACT"] = 4  # (GELU-tanh, the fast reciprocal)
    return d


@_spec("gemm_split_lora")
def _gemm_split_lora() -> dict[str, Any]:
    """The same GEMM with a rank-16 LoRA on each of q/k/v/mlp stacked into the fused
    layer (``svdquant.fuse``): rank 32 + 4 · 16 = 96, ``BLOCK_R`` 128."""
    d = _gemm(split=True)
    d["ints"].update(R=96, stride_lm=96, stride_un=96)
    d["consts"]["BLOCK_R"] = 128
    return d


def _no_parts() -> dict[str, int]:
    """A split GEMM's low-rank parts arguments, unused (``gemm.fp8_gemm_split``)."""
    from svdquant.kernels._triton_common import part_args

    names = ("LP", "O0", "O1", "O2", "O3", "W0", "W1", "W2", "W3")
    return dict(zip(names, part_args(None), strict=True))


def _lora_parts() -> dict[str, int]:
    """The single block's q/k/v/mlp with a rank-16 LoRA each, read as parts: the base
    32 columns and each segment's own 16 (a compact L_up of rank 48)."""
    from svdquant.kernels._triton_common import part_args

    names = ("LP", "O0", "O1", "O2", "O3", "W0", "W1", "W2", "W3")
    return dict(zip(names, part_args([32, 16, 16, 16, 16]), strict=True))


@_spec("gemm_split_lora_parts")
def _gemm_split_lora_parts() -> dict[str, Any]:
    """``gemm_split_lora`` with each segment reading only its own columns (``gemm.LORA_PARTS``):
    the compact rank 48, ``BLOCK_R`` 64."""
    d = _gemm(split=True)
    d["ints"].update(R=48, stride_lm=96, stride_un=48, **_lora_parts())
    d["consts"].update(BLOCK_R=64, PARTS=True)
    return d


def _desc(
    rows: int, cols: int, dtype: Any, gl_dtype: Any, block: list[int], layout: Any = None
) -> str:
    """The signature type of a Gluon TMA descriptor over a [rows, cols] ``dtype`` tensor
    with ``block`` boxes (``layout``, or the default shared layout for them)."""
    import torch
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    layout = layout or gl.NVMMASharedLayout.get_default_for(block, gl_dtype)
    t = torch.empty(rows, cols, dtype=dtype)
    return mangle_type(TensorDescriptor.from_tensor(t, block, layout))


def _gemm_ws_spec(
    sizes: list[int],
    parts: bool = False,
    tile=None,
    rank: int = 32,
    gated: bool = False,
    next_fmt: str | None = None,
    chunks: int = 1,
) -> dict[str, Any]:
    """The warp-specialized Gluon GEMM (``kernels/gemm_ws.py``) at M = 4608, K = 3072,
    N = sum(sizes), the output split into ``sizes`` segments (one: not split); ``tile``
    one of ``gemm_ws.CANDIDATE_TILES`` (default: ``DEFAULT_TILE``); ``gated``: a GEGLU's
    up projection of 2N rows writing h [M, N] (``fp8_gemm_ws_gated``); ``next_fmt``
    ("int4" or "fp8"): the epilogue writing the next layer's quantized input instead,
    GELU-tanh (GELU when gated) and a rank-32 next layer (``fp8_gemm_ws_next``)."""
    import torch
    from triton.experimental.gluon import language as gl

    from svdquant.kernels import gemm_ws as g
    from svdquant.kernels._triton_common import inner_bounds, three_bounds

    fp8 = torch.float8_e4m3fn
    m, n = 4608, sum(sizes)
    bm, bn, stages, warps, partitions = tile or g.DEFAULT_TILE
    outs = [_desc(m, w, torch.bfloat16, gl.bfloat16, [bm, bn // 2]) for w in sizes]
    if next_fmt:  # the next layer's input, stored by TMA through the second descriptor
        outs.append(_desc(m, n, fp8, gl.float8e4nv, [bm, bn // 2]))
    outs += [outs[-1]] * (4 - len(outs))
    bounds = three_bounds(inner_bounds(sizes), n)
    b_desc = _desc(n, 3072, fp8, gl.float8e4nv, [bn // 2 if gated else bn, g.BLOCK_K])
    return dict(
        kernel=g._fp8_gemm_ws_kernel,
        ptrs=dict(
            a_desc=_desc(m, 3072, fp8, gl.float8e4nv, [bm, g.BLOCK_K]),
            b_desc=b_desc,
            g_desc=b_desc,
            **{f"c{i}_desc": d for i, d in enumerate(outs)},
            sch_ptr="*fp32",
            scale_ptr="*fp32",
            lora_ptr="*fp32",
            lu_ptr="*bf16",
            bias_ptr="*bf16",
            inv_s2_ptr="*fp32",
            ld2_ptr="*bf16" if next_fmt else "*fp32",
            scale2_ptr="*fp32",
            lora2_ptr="*fp32",
        ),
        ints=dict(
            M=m,
            N=n,
            K=3072,
            R2=32 if next_fmt else 0,
            stride_ld2=n if next_fmt else 0,
            stride_l2m=32 if next_fmt else 0,
            stride_lm=96 if parts else rank,
            stride_un=48 if parts else rank,
            R=48 if parts else rank,
            B1=bounds[0],
            B2=bounds[1],
            B3=bounds[2],
            **(_lora_parts() if parts else _no_parts()),
            ACT_FROM=n - sizes[-1],
        ),
        consts=dict(
            HAS_LORA=True,
            HAS_BIAS=True,
            SPLIT=len(sizes) > 1,
            MASK_R=parts or (chunks > 1 and rank % 64 != 0),
            BR=64 if parts or chunks > 1 else max(16, rank),
            S=stages,
            GROUP=g.GROUP_M,
            num_warps=warps,
            PARTS=parts,
            PINGPONG=partitions == 2,
            PP_REGS=g.PP_REGS,
            GATED=gated,
            ACT=3 if gated else 1 if next_fmt else 0,  # GELU / GELU-tanh / none
            NEXT=next_fmt is not None,
            NEXT_INT4=next_fmt == "int4",
            BR2=32 if next_fmt else 16,
            **({"RCHUNKS": chunks} if chunks > 1 else {}),
        ),
        warps=warps,
    )


@_spec("quantize_ws")
def _quantize_ws() -> dict[str, Any]:
    """The Gluon quantize (``kernels/quantize_ws.py``, off by default) at M = 4608,
    K = 3072, rank 32, int4: x by TMA, the low-rank MMA asynchronous."""
    import torch
    from triton.experimental.gluon import language as gl

    from svdquant.kernels import quantize_ws as q

    m, k = 4608, 3072
    return dict(
        kernel=q._quantize_ws_kernel,
        ptrs=dict(
            x_desc=_desc(m, k, torch.bfloat16, gl.bfloat16, [q.BLOCK_M, q.BLOCK_K]),
            ld_desc=_desc(32, k, torch.bfloat16, gl.bfloat16, [32, q.BLOCK_K]),
            smooth_ptr="*fp32",
            scale_ptr="*fp32",
            xq_ptr="*fp8e4nv",
            lora_ptr="*fp32",
        ),
        ints=dict(M=m, K=k, K_OUT=k, R=32, k_per_split=256, stride_qm=k, stride_lm=32),
        consts=dict(INT4=True, HAS_LORA=True, ATOMIC=True, WARPS=q.WARPS),
        warps=q.WARPS,
    )


@_spec("gemm_ws")
def _gemm_ws() -> dict[str, Any]:
    """The warp-specialized Gluon GEMM at M = 4608, N = K = 3072."""
    return _gemm_ws_spec([3072])


@_spec("gemm_ws_rank160")
def _gemm_ws_rank160() -> dict[str, Any]:
    """Rank 160 (a rank-128 LoRA on a rank-32 model) in three chunks of 64 through rank
    64's buffers (``gemm_ws.CHUNK_RANKS``)."""
    return _gemm_ws_spec([3072], rank=160, chunks=3)


@_spec("gemm_ws_split")
def _gemm_ws_split() -> dict[str, Any]:
    """The Gluon GEMM writing the single block's q/k/v/mlp as four contiguous outputs."""
    return _gemm_ws_spec([3072, 3072, 3072, 12288])


@_spec("gemm_ws_split_act")
def _gemm_ws_split_act() -> dict[str, Any]:
    """The same writing the MLP part as its GELU-tanh (``fp8_gemm_ws_split(last_act=...)``)."""
    d = _gemm_ws_spec([3072, 3072, 3072, 12288])
    d["consts"]["ACT"] = 4  # (GELU-tanh, the fast reciprocal)
    return d


@_spec("gemm_ws_act")
def _gemm_ws_act() -> dict[str, Any]:
    """The Gluon GEMM as a GELU MLP's fc1 writing its GELU-tanh (``fp8_gemm_ws(activation=
    ...)``: a LoRA'd fc2 run apart, ``ops.MLP_NEXT_MAX_RANK``), rank 160."""
    d = _gemm_ws_spec([12288], rank=160, chunks=3)
    d["consts"]["ACT"] = 4
    return d


@_spec("gemm_ws_parts")
def _gemm_ws_parts() -> dict[str, Any]:
    """The same with a rank-16 LoRA on each part, read as parts (``gemm_ws.TAKES_PARTS``):
    the compact rank 48 on the rank-64 operands."""
    return _gemm_ws_spec([3072, 3072, 3072, 12288], parts=True)


@_spec("gemm_ws_gated")
def _gemm_ws_gated() -> dict[str, Any]:
    """The Gluon GEMM as a GEGLU's up projection (SDXL's at 1,280 wide: 2 x 5120 rows of
    K = 1280 here at K = 3072) writing h = v · gelu(g), the 128 x 128 tile ping-ponged."""
    return _gemm_ws_spec([5120], tile=(128, 128, 4, 4, 2), gated=True)


@_spec("gemm_ws_next")
def _gemm_ws_next() -> dict[str, Any]:
    """The Gluon GEMM as a GELU MLP's fc1 (FLUX's 3072 -> 12288) writing fc2's int4
    input and low-rank sums (``fp8_gemm_ws_next``)."""
    return _gemm_ws_spec([12288], next_fmt="int4")


@_spec("ws_decode")
def _ws_decode() -> dict[str, Any]:
    """``bench/probe_ws_decode.py``'s GEMM decoding the int4 weight in its own warps, at
    M = 512, N = 12288, K = 3072."""
    import torch
    from triton.experimental.gluon import language as gl

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import probe_ws_decode as p

    m, n, k = 512, 12288, 3072
    return dict(
        kernel=p._ws_decode_kernel,
        ptrs=dict(
            a_desc=_desc(m, k, torch.float8_e4m3fn, gl.float8e4nv, [p.BLOCK_M, p.BLOCK_K]),
            q_desc=_desc(n, k // 2, torch.uint8, gl.uint8, [p.BLOCK_N, p.BLOCK_K // 2]),
            ws_ptr="*fp16",
            c_desc=_desc(m, n, torch.bfloat16, gl.bfloat16, [p.BLOCK_M, p.BLOCK_N // 2]),
            inv_c_ptr="*fp32",
            sch_ptr="*fp32",
            scale_ptr="*fp32",
        ),
        ints=dict(stride_ws=k // 64, M=m, N=n, K=k),
        consts=dict(S=p.STAGES, GROUP=8, RC=p.CHUNK, num_warps=8),
        warps=8,
    )


@_spec("ws_decode_bm256")
def _ws_decode_bm256() -> dict[str, Any]:
    """The same with 256-row tiles (each MMA warpgroup 128 rows of one decoded weight
    tile) and three stages."""
    d = _ws_decode()  # puts bench/ on the path
    import probe_ws_decode as p
    import torch
    from triton.experimental.gluon import language as gl

    m, k = d["ints"]["M"], d["ints"]["K"]
    d["ptrs"]["a_desc"] = _desc(m, k, torch.float8_e4m3fn, gl.float8e4nv, [256, p.BLOCK_K])
    n = 12288
    d["ptrs"]["c_desc"] = _desc(m, n, torch.bfloat16, gl.bfloat16, [256, p.BLOCK_N // 2])
    d["consts"].update(S=3)
    return d


@_spec("group_scaled")
def _group_scaled() -> dict[str, Any]:
    """``bench/probe_group_scaled.py``'s GEMM on exact int4 codes with the group scales in
    its K loop, at M = 512, N = 12288, K = 3072."""
    import torch
    from triton.experimental.gluon import language as gl

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import probe_group_scaled as p

    m, n, k = 512, 12288, 3072
    return dict(
        kernel=p._group_scaled_kernel,
        ptrs=dict(
            a_desc=_desc(m, k, torch.float8_e4m3fn, gl.float8e4nv, [p.BLOCK_M, 64]),
            q_desc=_desc(n, k // 2, torch.uint8, gl.uint8, [p.BLOCK_N, 64]),
            ws_ptr="*fp16",
            c_desc=_desc(m, n, torch.bfloat16, gl.bfloat16, [p.BLOCK_M, p.BLOCK_N // 2]),
            ts_ptr="*fp32",
            scale_ptr="*fp32",
        ),
        ints=dict(stride_ws=k // 64, M=m, N=n, K=k),
        consts=dict(S=p.STAGES, GROUP=8, RC=p.CHUNK, num_warps=8, DECODE_REGS=p.DECODE_REGS),
        warps=8,
    )


@_spec("group_scaled_lut")
def _group_scaled_lut() -> dict[str, Any]:
    """The same with the codes turned into e4m3 bytes by byte permutation (``LUT``)."""
    d = _group_scaled()
    d["consts"].update(LUT=True)
    return d


@_spec("group_scaled_pipe")
def _group_scaled_pipe() -> dict[str, Any]:
    """The LUT decode with the second group's MMA in flight while the first's partial
    sum is scaled (``PIPE``: two partial accumulators), the decode warps at 64 registers."""
    d = _group_scaled()
    d["consts"].update(LUT=True, PIPE=True, DECODE_REGS=64)
    return d


@_spec("group_scaled_2wg")
def _group_scaled_2wg() -> dict[str, Any]:
    """The LUT decode in two warpgroups, half the rows each (``DECODE_WGS``), 64
    registers a thread."""
    d = _group_scaled()
    d["consts"].update(LUT=True, DECODE_WGS=2, DECODE_REGS=64)
    return d


@_spec("ws_decode_one_mul")
def _ws_decode_one_mul() -> dict[str, Any]:
    """The same with one multiply a code (``s_group · (1 / c)`` a group)."""
    d = _ws_decode()
    d["consts"].update(ONE_MUL=True)
    return d


def compile_sm90(spec: dict[str, Any]):
    """Compile ``spec['kernel']`` for sm_90 with the given argument types and values
    (integers that are multiples of 16 get triton's divisibility hint, as at launch)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = spec["kernel"]
    if getattr(kernel, "is_gluon", lambda: False)():  # a Gluon kernel (its own layouts)
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    sig: dict[str, str] = {}
    const: dict[str, Any] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(kernel.arg_names):
        if name in spec["ptrs"]:
            sig[name] = spec["ptrs"][name]
            if isinstance(sig[name], str) and not sig[name].startswith("tensordesc"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in spec["consts"]:
            sig[name], const[name] = "constexpr", spec["consts"][name]
        elif name in spec.get("floats", {}):  # a float argument: fp32, never specialized
            sig[name] = "fp32"
        elif name in spec["ints"]:
            v = spec["ints"][name]
            if v == 1:  # triton specializes 1 as a constant, as at launch
                sig[name], const[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif kernel.params[i].default is not inspect.Parameter.empty:  # a defaulted constexpr
            sig[name], const[name] = "constexpr", kernel.params[i].default
        else:
            raise KeyError(f"{kernel.__name__}: no value for argument {name!r}")
    src = ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
    opts = {"num_warps": spec["warps"], "num_stages": spec.get("stages", 3),
            **spec.get("options", {})}  # fmt: skip
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def loop_instructions(sass: str) -> list[int]:
    """Instructions in each loop body (a backward branch's range), in code order: per
    step and thread — with the codes per step, the cost of a main loop (the first loop
    is the main loop in our kernels; later ones are epilogues', e.g. the GEMV's
    low-rank loop)."""
    ins = [
        (int(m.group(1), 16), m.group(2))
        for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s*([^;]*);", sass)
    ]
    loops = []
    for addr, text in ins:
        target = re.search(r"BRA (0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            start = int(target.group(1), 16)
            loops.append((start, sum(1 for a, _ in ins if start <= a <= addr)))
    return [n for _, n in sorted(loops)]


def report(compiled) -> dict[str, Any]:
    """Registers, spills, memory instructions, barriers, MMAs and loop conversions."""
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "--dump-sass", cubin], capture_output=True, text=True
        ).stdout
    ttgir = compiled.asm["ttgir"]
    loops = ttgir.split("scf.for")[1:]
    reg = re.search(r"REG:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    return {
        "registers": int(reg.group(1)) if reg else None,
        "spill_bytes": int(local.group(1)) if local else None,
        "memory": dict(Counter(re.findall(r"\b(?:LDG|STG|LDS|STS|LDSM)\.?[A-Z0-9.]*", sass))),
        "barriers": sass.count("BAR.SYNC"),
        "mma": sass.count("HMMA") + sass.count("HGMMA") + sass.count("QGMMA"),
        "shuffles": sass.count("SHFL"),
        "instructions": sass.count(";"),
        "loop_instructions": loop_instructions(sass),
        "loop_layout_conversions": sum(
            b.split("scf.yield")[0].count("convert_layout") for b in loops
        ),
        "loop_smem_allocs": sum(b.split("scf.yield")[0].count("local_alloc") for b in loops),
        "sass": sass,
        "ttgir": ttgir,
        "ptx": compiled.asm.get("ptx", ""),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default=",".join(SPECS), help=f"some of {', '.join(SPECS)}")
    p.add_argument("--dump", default=None, help="write each kernel's SASS and TTGIR here")
    p.add_argument("--json", default=None, help="write the summary as JSON here")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out: dict[str, dict[str, Any]] = {}
    for name in [k.strip() for k in a.kernels.split(",") if k.strip()]:
        if name not in SPECS:
            raise SystemExit(f"unknown kernel {name!r}; choose from {', '.join(SPECS)}")
        r = report(compile_sm90(SPECS[name]()))
        if a.dump:
            Path(a.dump).mkdir(parents=True, exist_ok=True)
            Path(a.dump, f"{name}.sass").write_text(r["sass"])
            Path(a.dump, f"{name}.ttgir").write_text(r["ttgir"])
            Path(a.dump, f"{name}.ptx").write_text(r["ptx"])
        out[name] = {k: v for k, v in r.items() if k not in ("sass", "ttgir")}
        print(
            f"{name:9} regs {r['registers']:>3}  spill {r['spill_bytes']:>4} B  "
            f"barriers {r['barriers']:>3}  loop conversions {r['loop_layout_conversions']:>2}"
            f"  mma {r['mma']:>3}  loops {r['loop_instructions']}  memory {r['memory']}",
            flush=True,
        )
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
