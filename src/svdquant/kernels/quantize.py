"""Activation quantize kernel: ``x`` -> fp8 GEMM operand + low-rank down projection.

One pass over ``x`` [M, K] (16-bit or fp32):

* ``x̂ = x · (1 / s)`` (the smoothing vector's reciprocal, exact per column),
* ``act_fmt="int4"``: the paper's int4 codes with fp16 scales per group of 64, written as
  ``fp8(code · s_group · (1 / S))`` against the static per-layer scale S, so the GEMM needs
  no per-group rescale of its accumulator; ``act_fmt="fp8"``: ``fp8(x̂ · (1 / S))`` (W4A8),
* ``lora_act = x̂ · L_downᵀ``, computed as ``x · (L_down · diag(1/s))ᵀ``: the smoothing is
  folded into the small L_down chunk, so the loaded 16-bit ``x`` itself is the MMA's
  operand (fp32 sums of 16-bit products, the 16-bit low-rank branch).

Per element only multiplications: every division (``1/s``, ``1/s_group``, ``1/S``) is one
IEEE division per column, group or program; codes are rounded with one add and one
subtract, and fp8 values by the hardware conversion (exactly emulated under the
interpreter). No row-wide reduction: a program walks a few groups of 64 columns at a time
through its rows and its share of K (a K split when M alone gives too few programs); the
low-rank partial sums of the splits meet through fp32 atomics.

A second input (``tail``) makes the quantized input ``cat([x, act(tail)], -1)`` without
that tensor ever existing: FLUX's single blocks feed ``proj_out`` the attention output
next to the GELU of the MLP's up projection (a [M, 15360] concatenation and a GELU pass
per block, unfused).
Reference: ``reference.quantize_act_ref``, ``reference.quantize_act_cat_ref``,
``reference.quantize_act_gated_ref``.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from svdquant.kernels import kept
from svdquant.kernels._triton_common import (
    act_code,
    apply_activation,
    block_rank,
    cdiv,
    check_activation,
    div7_rn,
    folded_lowrank_dot,
    interpreting,
    needs_bf16_rounding,
    num_sms,
    pdl_supported,
    recip16_rn,
    round_bf16,
    to_e4m3,
)
from svdquant.kernels.launch import launch

__all__ = ["fold_lowrank_down", "quantize_act", "quantize_tile"]

#: (BLOCK_M, columns per step, num_warps) for few rows (M ≤ 64), up to 1024 (FLUX's text
#: stream: 512) and more; tuned on the H100 with ``bench/probe_quantize.py`` and
#: ``bench/gemm.py --sweep``, "medium" and "large" swept again on the H200 (v33,
#: ``probe_layer.py --what quantize``: (64, 128, 4) won at every M and K; a 32-row tile ran
#: 0.32-0.63x as fast, its low-rank MMA below wgmma's 64 rows).
TILES = {"small": (16, 64, 4), "medium": (64, 128, 4), "large": (64, 128, 4)}
#: The K split aims for ``PROGRAMS_PER_SM`` programs per multiprocessor. Programs of one
#: step each (one atomic add of their low-rank partial sums per step) only where programs
#: of two steps would be fewer than ``TWO_STEP_MIN_PER_SM`` per multiprocessor. H200, the
#: quantize alone in a CUDA graph at M = 512 / 1024 / 4096 / 4608 and K = 3072 / 12288 /
#: 15360 (``bench/probe_layer.py --what quantize``, v30): 10 per SM instead of v26's 7
#: took 1.06-1.12x off M = 4608 at K >= 12288 (16 x 6 and 18 x 7 splits x steps instead
#: of 12 x 8 and 12 x 10); two steps instead of one 1.03-1.09x where that left >= 480
#: programs (M = 512, K = 12288 and 15360; M = 1024, K = 12288; M = 4608, K = 3072), one
#: step 1.03-1.12x where two would leave 96 or 192 (M = 512 and 1024, K = 3072).
PROGRAMS_PER_SM = 10
#: The gated input's tile (``gated=True``) from 65 rows on: two input tiles and the
#: activation a step (255 registers at (64, 128), sm_90, triton 3.6; 174 at (64, 64)).
#: Measured (v40, ``bench/probe_gated.py``, SDXL's shapes, H200): (64, 128, 4) 75.8 /
#: 49.7 / 123.6 / 76.1 µs at M x H = 4096 x 2560, 1024 x 5120, 8192 x 2560, 2048 x 5120,
#: (64, 64, 4) 79.2 / 48.6 / 146.6 / 79.9, (32, 128, 4) and (128, 64, 8) slower; the
#: unfused GELU + product + quantize 82.8 / 47.3 / 153.2 / 84.4.
GATED_TILE = (64, 128, 4)
#: Pipeline stages of the quantize's column loop: one (no prefetch). v7 and v18 measured
#: two to four no better (v18: with 2-4 K splits, programs of many steps); v47 with
#: today's splits (programs of one or two steps), ``bench/probe_layer.py --what quantize
#: --set quantize.NUM_STAGES=2``, H200: 0.59-0.70x as fast at M = 1024 / 4096 / 4608, K =
#: 3072 / 12288 (192 registers instead of 168: two programs an SM instead of three).
NUM_STAGES = 1
TWO_STEP_MIN_PER_SM = 2
#: Run a plain 16-bit input's quantize (no tail, not gated; beside the widen too) from
#: ``WS_QUANTIZE_MIN_M`` rows on the Gluon kernel (``quantize_ws``: x and L_down's chunk by
#: TMA into shared memory, the low-rank MMA asynchronous beside the codes; 95 registers
#: instead of 168). v48, H200, against this kernel in one run (``probe_layer.py --what
#: quantize --set quantize.WS_QUANTIZE=True``): 1.02-1.23x as fast at M = 4096 / 4608,
#: K = 3072 / 12288; 0.86x at M = 1024, K = 3072 (192 programs: too few in flight). Off:
#: the layer (the quantize beside the widen) 0.96-1.03x, the PixArt-Sigma, SDXL and FLUX.1
#: steps 0.99-1.00x (``bench/NOTES.md`` v48).
WS_QUANTIZE = False
WS_QUANTIZE_MIN_M = 2048
#: A rank that is not a power of two (a LoRA stacked on the base branch: 48, 80, 96) is
#: computed as two low-rank parts, each padded to its own power of two (80 = 64 + 16,
#: 96 = 64 + 32), instead of one padded to the next (128) — less MMA, fewer registers,
#: so the rows per program stay 64 where a 128-wide part would halve them. On the H200
#: (v37 profile) a rank-16 LoRA on every linear of the fused FLUX runtime took the
#: quantize's GPU time from 7.5 to 13.0 ms a step (ranks 48, 80, 96 padded to 64, 128,
#: 128). Measured (v38, ``bench/probe_layer.py --what quantize --rank R --set
#: quantize.SPLIT_RANK=True``, M = 512 / 4096, K = 3072 / 12288): rank 96 1.46-2.46x
#: and rank 80 1.50-2.57x faster than one 128-wide part, rank 48 0.94-1.04x (its one
#: part, 64, keeps 64 rows already); the LoRA'd fused step 1.019x (``bench/e2e.py
#: --ab``), 1.060x with ``gemm.LORA_PARTS``.
SPLIT_RANK = True
#: Two parts only where they keep a program at ``SPLIT_MIN_ROWS`` rows (the low-rank MMA at
#: wgmma's 64) or their second part is ``SPLIT_MIN_SECOND`` wide. v53, H200, rank-128 LoRAs
#: on a rank-16/32/64 layer (``bench/probe_layer.py --rank R --set
#: quantize.SPLIT_RANK=False``, M = 1024 / 4096, N = 3072 / 12288, K = 3072): one 256-wide
#: part against 128 + 32 at 32 rows 1.29-1.64x faster for the layer at rank 160 (the
#: quantize alone 1.97-2.21x, M up to 4608, K up to 12288), against 128 + 16 1.23-1.50x
#: at 144 — but 128 + 64 (rank 192) 1.00-1.09x faster than one part. The split had been
#: measured at 48, 80, 96 only (v38); the v45-v53 tables' rank-160 row (250 -> 407 µs at
#: 3072²) was this.
SPLIT_MIN_ROWS = 64
SPLIT_MIN_SECOND = 64
#: A rank whose low-rank sums would leave a program fewer than its tile's rows even in two
#: parts (over 128, 192 included; 112 and 128 at 32 rows) computed in slices of
#: ``RANK_SLICE`` columns, one program each (a third grid axis), every slice at the tile's
#: 64 rows: the slices read x once each, and only the first writes the codes. Measured
#: (v54, H200, ``bench/probe_layer.py --what quantize|layer --rank R --set
#: quantize.RANK_SLICES=True``, M = 1024 / 4096 / 4608, K = 3072 / 12288, N = 3072): the
#: quantize 1.45-1.84x faster at rank 128, 2.29-3.25x at 160, 2.26-2.71x at 192 (against
#: its two parts), 2.14-2.50x at 256; the layer 1.50-1.81x at 160, 1.47-1.58x at 192,
#: 1.44-1.62x at 256 (rank 160 at M = 4096, 3072²: 252 -> 156 µs). Not at 80 / 96, whose
#: two parts keep 64 rows: two slices ran the quantize 0.72-0.96x as fast; and 32-column
#: slices lost to 64 (0.83-1.03x at ranks 128 / 256, ``…-v54-policy-*.json``).
RANK_SLICES = True
RANK_SLICE = 64
#: A rank the quantize would compute in slices, on a plain 16-bit input (no tail, no gate)
#: and not as a dependent's trigger: the kernel writes the codes alone (rank 0) and one
#: cuBLAS GEMM ``x @ (L_down · diag(1/s))ᵀ`` with fp32 sums writes all the low-rank columns
#: (the same 16-bit products as the kernel's, summed in another order); the folded L_down is
#: made once per L_down and smoothing (``folded_down``). The slices re-read x and recompute
#: x̂ for every 64 columns: v56 (H200, ``bench/probe_lora_act.py``, the base rank's quantize
#: plus the GEMM against the slices): 1.36-1.67x faster at rank 160 (1.01x at 1024 x
#: 3072), 1.90-3.18x at 544 (a rank-128 LoRA stacked on FLUX's four single-block parts),
#: M = 1024 / 4608, K = 3072 / 12288 / 15360. v57: with the fold in every call (four small
#: kernels, a zero fill and a copy) the route gave most of that back (0.58-0.95x the slices
#: at rank 160), hence the cache; with it (v57, same probe): 1.22-1.81x the slices at rank
#: 160, 1.90-2.96x at 416, 2.16-3.15x at 544; the rank-160 layer 1.01-1.14x
#: (``probe_layer.py``, M = 1024 / 4608, N = 3072 / 12288); the FLUX step with a rank-128
#: LoRA through ``cuda_graphed`` 125.9 -> 121.5 ms (1.030x, ``e2e.py --ab``). The kept
#: folds cost L_down's memory once more for the layers that take the route. bf16 and
#: fp16 inputs (fp16 since v58: an fp16 model, SDXL's common dtype, took the slices).
WIDE_BY_MM = True
#: The same route for a concatenated input ``cat([x, act(tail)])`` (FLUX's single-block
#: ``proj_out``: rank 160 at K = 15360 with a rank-128 LoRA, 438 µs sliced at 4608
#: rows, v58): the kernel writes the codes alone, torch writes ``act(tail)`` in x's dtype
#: (``reference.activation_like``, one pass), and two cuBLAS GEMMs sum x's columns and the
#: activated tail's into the same sums (``addmm``). v58 (H200, ``probe_lora_act.py --tail
#: 12288``, the tail's sums in a second buffer then added): 1.71-2.11x the slices at rank
#: 160, 2.84-3.88x at 416 (M = 1024 / 4608); the FLUX step with a rank-128 LoRA through
#: ``cuda_graphed`` 120.0 -> 111.1 ms (1.070x, ``e2e.py --ab``).
WIDE_TAIL_BY_MM = True


def fold_lowrank_down(lowrank_down: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """``L_down · diag(1/s)`` rounded to L_down's dtype: the chunk every quantize program
    otherwise computes (``folded_lowrank_dot``), once per layer — bit for bit the kernel's
    (one IEEE reciprocal per column, one product, one rounding). For
    ``quantize_act(folded=True)``."""
    inv_s = torch.reciprocal(smooth.float())
    return (lowrank_down.float() * inv_s).to(lowrank_down.dtype)


def outputs(
    m: int,
    k_out: int,
    r: int,
    split: int,
    device: torch.device,
    out: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantize's ``(xq fp8 [m, k_out], lora_act fp32 [m, r])``: ``out`` checked, or new
    (the sums zeroed where ``split`` > 1: the K splits meet through atomics)."""
    if out is not None:
        xq, lora = out
        want = ((m, k_out), torch.float8_e4m3fn, (m, r), torch.float32)
        if (xq.shape, xq.dtype, lora.shape, lora.dtype) != want:
            raise ValueError(
                f"out must be (fp8 [{m}, {k_out}], fp32 [{m}, {r}]), got ({xq.dtype} "
                f"{tuple(xq.shape)}, {lora.dtype} {tuple(lora.shape)})"
            )
        return xq, lora
    xq = torch.empty(m, k_out, dtype=torch.float8_e4m3fn, device=device)
    lora = (torch.zeros if split > 1 else torch.empty)(m, r, dtype=torch.float32, device=device)
    return xq, lora


def rank_parts(r: int) -> tuple[int, int]:
    """The low-rank branch's padded widths (first part, second part or 0) for rank ``r``:
    one power of two, or with ``SPLIT_RANK`` the largest power of two below ``r`` and the
    rest's power of two where that is narrower than one part — and where the two parts
    measured faster: where they keep a program at 64 rows (48, 80, 96) or the second part
    is 64 wide (192 = 128 + 64), not at 144 or 160 (see ``SPLIT_MIN_ROWS``)."""
    whole = block_rank(r)
    if not SPLIT_RANK or whole == r or r <= 16:
        return whole, 0
    first = whole // 2
    second = block_rank(r - first)
    if second >= first:
        return whole, 0
    rows = rows_per_program(TILES["large"][0], first + second)
    if rows < SPLIT_MIN_ROWS and second < SPLIT_MIN_SECOND:
        return whole, 0
    return first, second


def rank_slices(r: int, m: int, block_m: int) -> int:
    """Programs along the rank (``RANK_SLICES``) for rank ``r`` at ``m`` rows and a tile of
    ``block_m``: 1, or slices of ``RANK_SLICE`` columns where ``rank_parts`` would leave a
    program fewer rows than its tile (not for the few-row tile: 64 rows or fewer)."""
    if not RANK_SLICES or m <= 64 or r <= RANK_SLICE:
        return 1
    first, second = rank_parts(r)
    return cdiv(r, RANK_SLICE) if rows_per_program(block_m, first + second) < block_m else 1


def rows_per_program(block_m: int, width: int) -> int:
    """Rows a program takes at a low-rank width (summed parts): its fp32 sums
    [rows, width] held in registers stay at most ~48 a thread (4 warps); the same as
    ``4096 // width`` for a power of two."""
    cap = max(16, 6144 // max(width, 1))
    return min(block_m, 1 << (cap.bit_length() - 1))


def k_split(m_blocks: int, steps: int, sms: int) -> tuple[int, int]:
    """(programs along K, steps per program) for ``m_blocks`` row blocks of ``steps``
    column steps on ``sms`` multiprocessors: enough programs in flight to cover the
    loads' latency (``PROGRAMS_PER_SM``), but no one-step programs — each split adds its
    low-rank partial sums by atomics — where two-step ones would still be plenty
    (``TWO_STEP_MIN_PER_SM``)."""
    split = min(steps, max(1, cdiv(PROGRAMS_PER_SM * sms, m_blocks)))
    if split == steps and m_blocks * (steps // 2) >= TWO_STEP_MIN_PER_SM * sms:
        split = steps // 2
    per_split = cdiv(steps, split)
    return cdiv(steps, per_split), per_split


#: fp32's largest finite value: a group's factor ``s_group · (1/S)`` is clamped to it so that
#: ``0 · factor`` stays 0 (never ``0 · inf``).
FP32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def int4_fp8(xg, inv_act, AXIS: tl.constexpr, EXACT: tl.constexpr):
    """The paper's int4 quantization of groups laid along ``AXIS`` (the last axis, 64 wide)
    of fp32 ``xg``, as fp8 operands ``fp8(code · (s_group · inv_act))``.

    ``s_group = fp16(max|x| / 7)`` and ``code = round(x · (1 / s_group))`` in [-7, 7], the
    product rounded once (an FMA against 1.5 · 2²³), both divisions IEEE (``div7_rn``,
    ``recip16_rn``); the group's factor ``s_group · inv_act`` is one multiply per group.
    On the GPU the conversion saturates at ±448 by itself (``cvt.rn.satfinite``), so no
    clamp per element; ``EXACT`` (the interpreter) rounds in fp64 and clamps explicitly.
    """
    amax = tl.max(tl.abs(xg), axis=AXIS)
    sg = tl.minimum(div7_rn(amax, EXACT), 65504.0).to(tl.float16).to(tl.float32)
    inv_sg = tl.where(sg > 0.0, recip16_rn(tl.where(sg > 0.0, sg, 1.0), EXACT), 0.0)
    f = tl.expand_dims(tl.minimum(sg * inv_act, FP32_MAX), AXIS)
    inv_sg = tl.expand_dims(inv_sg, AXIS)
    if EXACT:  # the fp64 product is exact; adding and subtracting 1.5 · 2⁵² rounds it
        t = xg.to(tl.float64) * inv_sg.to(tl.float64)
        code = ((t + 6755399441055744.0) - 6755399441055744.0).to(tl.float32)
    else:
        code = tl.fma(xg, inv_sg, 12582912.0) - 12582912.0
    val = tl.minimum(tl.maximum(code, -7.0), 7.0) * f
    return to_e4m3(val, EXACT) if EXACT else val.to(tl.float8e4nv)


@triton.jit
def quantize_tile(
    xh,
    inv_act,
    INT4: tl.constexpr,
    EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """A [BLOCK_M, BLOCK_K] tile of x̂ (fp32, BLOCK_K a multiple of 64) as fp8 operands.

    ``INT4``: the paper's codes, ``fp8(code · (s_group · inv_act))``; else
    ``fp8(x̂ · inv_act)``. Shared with the GEMM epilogue that quantizes the next layer's
    input.
    """
    if INT4:
        if BLOCK_K == 64:
            q = int4_fp8(xh, inv_act, 1, EXACT)
        else:
            xg = tl.reshape(xh, [BLOCK_M, BLOCK_K // 64, 64])
            q = tl.reshape(int4_fp8(xg, inv_act, 2, EXACT), [BLOCK_M, BLOCK_K])
    else:
        q = to_e4m3(xh * inv_act, EXACT)
    return q


@triton.jit
def _rounded(t, ROUND_BF16: tl.constexpr):
    """fp32 ``t`` rounded to bf16 first where the interpreter's own cast would truncate."""
    if ROUND_BF16:
        t = round_bf16(t)
    return t


@triton.jit
def _tail_values(ptrs, mask, ACT: tl.constexpr, ROUND_BF16: tl.constexpr):
    """``ACT`` of the tail's values at ``ptrs`` in fp32, rounded to bf16 first where the
    interpreter's own cast would truncate: what the unfused activation writes."""
    t = apply_activation(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), ACT)
    return _rounded(t, ROUND_BF16)


@triton.jit
def _step_x(x_rows, t_rows, cols, k0, rmask, kmask, K_HEAD, TAIL_ACT: tl.constexpr,
            GATED: tl.constexpr, SEAM_ALIGNED: tl.constexpr, ROUND_BF16: tl.constexpr):  # fmt: skip
    """The input's tile at columns ``cols`` (x's dtype): x itself, ``cat([x, act(tail)])``
    or ``x · act(tail)`` (``GATED``), the activation rounded to x's dtype as if written."""
    if TAIL_ACT < 0:
        x = tl.load(x_rows + cols[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    elif GATED:  # x · act(tail), both [M, K]: each rounded to x's dtype, as written
        xmask = rmask[:, None] & kmask[None, :]
        xa = tl.load(x_rows + cols[None, :], mask=xmask, other=0.0)
        t = _tail_values(t_rows + cols[None, :], xmask, TAIL_ACT, ROUND_BF16)
        x = _rounded(xa.to(tl.float32) * t.to(xa.dtype).to(tl.float32), ROUND_BF16)
        x = x.to(xa.dtype)
    elif SEAM_ALIGNED:  # a step lies in x or in the tail: load only that one
        if k0 < K_HEAD:
            x = tl.load(x_rows + cols[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        else:
            tmask = rmask[:, None] & kmask[None, :]
            t = _tail_values(t_rows + (cols - K_HEAD)[None, :], tmask, TAIL_ACT, ROUND_BF16)
            x = t.to(x_rows.dtype.element_ty)
    else:  # columns from K_HEAD on: act(tail), rounded to x's dtype as if written
        head = cols < K_HEAD
        xa = tl.load(x_rows + cols[None, :], mask=rmask[:, None] & head[None, :], other=0.0)
        tmask = rmask[:, None] & (kmask & ~head)[None, :]
        t = _tail_values(t_rows + (cols - K_HEAD)[None, :], tmask, TAIL_ACT, ROUND_BF16)
        x = tl.where(head[None, :], xa, t.to(xa.dtype))
    return x


@triton.jit
def _store_codes(q_rows, cols, xh, inv_act, rmask, K_OUT, INT4: tl.constexpr,
                 EXACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """A step's x̂ tile quantized (``quantize_tile``) and stored at columns ``cols`` of the
    rows ``q_rows`` (those below ``K_OUT``)."""
    q = quantize_tile(xh, inv_act, INT4, EXACT, BLOCK_M, BLOCK_K)
    tl.store(q_rows + cols[None, :], q, mask=rmask[:, None] & (cols < K_OUT)[None, :])


@triton.jit
def _store_sums(lora_ptr, rows, rr, acc, rmask, R, stride_lm, ATOMIC: tl.constexpr):
    """The low-rank sums ``acc`` of columns ``rr`` into ``lora_act``: added by atomics
    where K is split, else stored."""
    lptr = lora_ptr + rows[:, None] * stride_lm + rr[None, :]
    lmask = rmask[:, None] & (rr < R)[None, :]
    if ATOMIC:
        tl.atomic_add(lptr, acc, mask=lmask, sem="relaxed")
    else:
        tl.store(lptr, acc, mask=lmask)


@triton.jit
def _quantize_act_kernel(
    x_ptr,
    tail_ptr,
    smooth_ptr,
    ld_ptr,
    scale_ptr,
    xq_ptr,
    lora_ptr,
    M,
    K,
    K_HEAD,
    K_OUT,
    R,
    k_per_split,
    stride_xm,
    stride_tm,
    stride_qm,
    stride_ldr,
    stride_lm,
    INT4: tl.constexpr,
    HAS_LORA: tl.constexpr,
    ATOMIC: tl.constexpr,
    EXACT: tl.constexpr,
    TAIL_ACT: tl.constexpr,
    SEAM_ALIGNED: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL_TRIGGER: tl.constexpr = False,
    PDL_WAIT_LAST: tl.constexpr = False,
    BLOCK_R2: tl.constexpr = 0,
    GATED: tl.constexpr = False,
    FOLDED: tl.constexpr = False,
    R_SLICED: tl.constexpr = False,
):
    # With PDL_TRIGGER the next kernel, launched as this one's programmatic dependent (the
    # widen, ``widen.widen_weight(pdl=True)``), may start as soon as every program of this
    # one has: it fills the SMs this kernel's last wave leaves idle.
    if PDL_TRIGGER:
        gdc_launch_dependents()
    # Each program walks BLOCK_K columns (whole groups) at a time through its rows' share
    # of K: the group max is a reduction within the tile, and the low-rank partial sums
    # stay in registers until the end (one atomic add per program when K is split).
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    g = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    if R_SLICED:  # this program's slice of the low-rank sums' columns (``RANK_SLICES``)
        rr += tl.program_id(2) * BLOCK_R
    inv_act = tl.math.div_rn(1.0, tl.load(scale_ptr))
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, tl.maximum(K, K_OUT))
    x_rows = x_ptr + rows[:, None] * stride_xm
    t_rows = tail_ptr + rows[:, None] * stride_tm
    q_rows = xq_ptr + rows[:, None] * stride_qm
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    if BLOCK_R2 > 0:  # L_down's rows from BLOCK_R on: a second MMA of their own width
        rr2 = BLOCK_R + tl.arange(0, BLOCK_R2)
        acc2 = tl.zeros([BLOCK_M, BLOCK_R2], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + g
        kmask = cols < K
        x = _step_x(x_rows, t_rows, cols, k0, rmask, kmask, K_HEAD, TAIL_ACT, GATED,
                    SEAM_ALIGNED, ROUND_BF16)  # fmt: skip
        # L_down's chunk is loaded before the quantize's store (a load after it waits for
        # it: an L2 round trip per step before the MMA), except with a tail, where the
        # early tile took the kernel from 168 to 255 registers (triton 3.6, sm_90)
        ld_ptrs = ld_ptr + rr[:, None] * stride_ldr + cols[None, :]  # [BLOCK_R, BLOCK_K]
        ld_mask = (rr < R)[:, None] & kmask[None, :]
        if BLOCK_R2 > 0:
            ld2_ptrs = ld_ptr + rr2[:, None] * stride_ldr + cols[None, :]
            ld2_mask = (rr2 < R)[:, None] & kmask[None, :]
        if HAS_LORA and TAIL_ACT < 0:
            ld = tl.load(ld_ptrs, mask=ld_mask, other=0.0)
            if BLOCK_R2 > 0:
                ld2 = tl.load(ld2_ptrs, mask=ld2_mask, other=0.0)
        inv_s = tl.math.div_rn(1.0, tl.load(smooth_ptr + cols, mask=kmask, other=1.0))
        xh = x.to(tl.float32) * inv_s[None, :]
        if R_SLICED:  # the codes by the first slice's programs only
            if tl.program_id(2) == 0:
                _store_codes(q_rows, cols, xh, inv_act, rmask, K_OUT, INT4, EXACT, BLOCK_M, BLOCK_K)
        else:
            _store_codes(q_rows, cols, xh, inv_act, rmask, K_OUT, INT4, EXACT, BLOCK_M, BLOCK_K)
        if HAS_LORA:
            if TAIL_ACT >= 0:
                ld = tl.load(ld_ptrs, mask=ld_mask, other=0.0)
                if BLOCK_R2 > 0:
                    ld2 = tl.load(ld2_ptrs, mask=ld2_mask, other=0.0)
            acc = folded_lowrank_dot(x, tl.trans(ld), inv_s, acc, EXACT, FOLDED)
            if BLOCK_R2 > 0:
                acc2 = folded_lowrank_dot(x, tl.trans(ld2), inv_s, acc2, EXACT, FOLDED)
    if HAS_LORA:
        _store_sums(lora_ptr, rows, rr, acc, rmask, R, stride_lm, ATOMIC)
        if BLOCK_R2 > 0:
            _store_sums(lora_ptr, rows, rr2, acc2, rmask, R, stride_lm, ATOMIC)
    if PDL_WAIT_LAST:  # noqa: SIM102 (a compile-time branch around a runtime one)
        # launched as the widen's programmatic dependent (``quantize_act(pdl=True)``): this
        # kernel reads nothing the widen writes, but the kernels after it need both done —
        # the program launched last waits for the widen, so this kernel ends after it
        # (with slices, the last program of each: the one launched last among them)
        if (pid_m == tl.num_programs(0) - 1) & (pid_k == tl.num_programs(1) - 1):
            gdc_wait()


#: torch's fp16 / bf16 GEMMs with fp32 outputs (``mm`` / ``addmm`` with ``out_dtype``,
#: CUDA only) came in torch 2.8: before it the wide ranks keep the sliced quantize.
FP32_OUT_MM = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 8)


def lowrank_mm(
    x: torch.Tensor, folded_down: torch.Tensor, out: torch.Tensor, accumulate: bool = False
) -> torch.Tensor:
    """``x @ folded_downᵀ`` into ``out`` fp32 [M, r] (added to it with ``accumulate``), with
    fp32 sums of the bf16 / fp16 products (cuBLAS's fp32-output GEMM on the GPU; elsewhere
    in fp32, the products exact there too; so also on CUDA before torch 2.8)."""
    if x.is_cuda and FP32_OUT_MM:
        if accumulate:  # (cuBLAS's beta = 1: no second buffer, no add pass)
            return torch.addmm(out, x, folded_down.t(), out_dtype=torch.float32, out=out)
        return torch.mm(x, folded_down.t(), out_dtype=torch.float32, out=out)
    if accumulate:
        return torch.addmm(out, x.float(), folded_down.float().t(), out=out)
    return torch.mm(x.float(), folded_down.float().t(), out=out)


#: Keep ``WIDE_BY_MM``'s folded L_down per layer (``folded_down``), or fold it in every
#: call. Kept, they cost that L_down's memory once more: v57 (H200, FLUX.1-dev with a
#: rank-128 LoRA on every linear, ``bench/e2e.py``) the eager step's peak 8.68 -> 8.99 GB
#: (``e2e-h200-2026-12-02-0352-v56-lora128-default.json`` against ``…-0543-v57-lora128-
#: mlp-next-max64.json``). Not kept: four small kernels per call (not measured since the
#: route writes every column by cuBLAS; v56's route, the fold with a copy and a zero fill,
#: ran 0.58-0.95x the slices at rank 160). A CUDA graph replays the fold it captured:
#: ``cuda_graphed`` captures again once L_down or the smoothing change (``kernels.kept``);
#: ``torch.compile``'s own graphs (``mode="reduce-overhead"``) do not check.
KEEP_FOLDS = True
#: ``folded_down``'s folds, by the L_down (view) they fold: (L_down's base, weakly; the
#: smoothing's, weakly; both tensors' addresses, shapes and versions; the fold).
_FOLDS: dict[tuple, tuple[weakref.ref, weakref.ref, tuple, torch.Tensor]] = {}


def _base(t: torch.Tensor) -> torch.Tensor:
    return t if t._base is None else t._base


def folded_down(lowrank_down: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """``fold_lowrank_down(lowrank_down, smooth)``, made once and kept while both tensors
    live unchanged (the same objects, addresses and versions: a LoRA loaded, fused or
    removed since folds anew; a freed L_down drops its fold). Tensors without a version
    counter (made under ``torch.inference_mode``) fold in every call, as all do without
    ``KEEP_FOLDS``."""
    if not KEEP_FOLDS:
        return fold_lowrank_down(lowrank_down, smooth)
    try:
        ld, sm = lowrank_down, smooth
        stamp = (ld.data_ptr(), ld.shape, ld.stride(), ld._version, sm.data_ptr(), sm.shape,
                 sm._version)  # fmt: skip
    except RuntimeError:  # an inference tensor: changes in place would go unseen
        return fold_lowrank_down(lowrank_down, smooth)
    base, s_base = _base(lowrank_down), _base(smooth)
    key = (id(base), stamp[0], stamp[1])
    hit = _FOLDS.get(key)
    if hit is not None and hit[0]() is base and hit[1]() is s_base and hit[2] == stamp:
        kept.used(base, s_base)  # (a CUDA graph replaying it is captured again on a change)
        return hit[3]
    fold = fold_lowrank_down(lowrank_down, smooth)
    _FOLDS[key] = (weakref.ref(base, lambda _, key=key: _FOLDS.pop(key, None)),
                   weakref.ref(s_base), stamp, fold)  # fmt: skip
    return fold


def _wide_by_mm(x, smooth, lowrank_down, act_scale, k_out, act_fmt, pdl, out, folded,
                tail=None, tail_act="none"):  # fmt: skip
    """``quantize_act`` of a wide rank (``WIDE_BY_MM``, ``WIDE_TAIL_BY_MM``): the codes by
    the kernel (rank 0), every low-rank column by ``lowrank_mm`` into ``lora_act`` (after
    the kernel: a ``pdl`` launch stays right after the widen); with a ``tail``, x's
    columns first, then the activated tail's added."""
    from svdquant.kernels.reference import activation_like

    m, r = x.shape[0], lowrank_down.shape[0]
    xq, lora = outputs(m, k_out, r, 1, x.device, out)  # (cuBLAS writes every column)
    quantize_act(x, smooth, lowrank_down[:0], act_scale, k_out, act_fmt, tail, tail_act,
                 pdl=pdl, out=(xq, lora[:, :0]))  # fmt: skip
    fold = lowrank_down if folded else folded_down(lowrank_down, smooth)
    if tail is None:
        lowrank_mm(x, fold, lora)
        return xq, lora
    k_head = x.shape[1]
    lowrank_mm(x, fold[:, :k_head], lora)
    lowrank_mm(activation_like(tail, tail_act), fold[:, k_head:], lora, accumulate=True)
    return xq, lora


def _plan(x: torch.Tensor, lowrank_down: torch.Tensor, k: int, k_out: int, tailed: bool,
          gated: bool, trigger: bool) -> tuple[int, ...] | None:  # fmt: skip
    """How ``quantize_act`` runs the kernel on ``x`` [M, ...] (``k`` input columns, a tail
    or not): ``(BLOCK_M, BLOCK_K, warps, BLOCK_R, BLOCK_R2, slices, row blocks, programs
    along K, columns each)`` — or None where a wide rank's sums come by cuBLAS instead
    (``WIDE_BY_MM``, ``WIDE_TAIL_BY_MM``)."""
    m, r = x.shape[0], lowrank_down.shape[0]
    block_m, block_k, warps = TILES["small" if m <= 64 else "medium" if m <= 1024 else "large"]
    if gated and m > 64:
        block_m, block_k, warps = GATED_TILE
    block_r, block_r2 = rank_parts(r)
    slices = rank_slices(r, m, block_m)
    routed = WIDE_TAIL_BY_MM and not gated if tailed else WIDE_BY_MM
    sixteen = x.dtype == lowrank_down.dtype and x.dtype in (torch.bfloat16, torch.float16)
    by_mm = routed and sixteen and FP32_OUT_MM and not trigger and lowrank_down.shape[1] == k
    if slices > 1 and by_mm:
        return None
    if slices > 1:
        block_r, block_r2 = RANK_SLICE, 0
    block_m = rows_per_program(block_m, block_r + block_r2)  # the sums fit in registers
    steps = cdiv(max(k, k_out), block_k)
    m_blocks = cdiv(m, block_m)
    split, per_split = k_split(m_blocks * slices, steps, num_sms(x.device))
    return block_m, block_k, warps, block_r, block_r2, slices, m_blocks, split, per_split * block_k


def sums_accumulate(x: torch.Tensor, lowrank_down: torch.Tensor, k_out: int) -> bool:
    """Whether ``quantize_act(x, ..., lowrank_down, k_out)`` (a plain input) may add its
    low-rank sums into ``lora_act`` (programs along K, through atomics), so that buffers
    passed as ``out`` must come zeroed. False where every column is written once: no
    rank, or a wide rank's cuBLAS sums, or (planned only for ranks over ``RANK_SLICE``,
    where the route can apply: the plan costs ~5 µs of host time) one program along K."""
    m, r, k = x.shape[0], lowrank_down.shape[0], x.shape[1]
    if m == 0 or r == 0:
        return False
    if r <= RANK_SLICE or (WS_QUANTIZE and m >= WS_QUANTIZE_MIN_M):
        return True  # (no route; the Gluon quantize has its own split)
    plan = _plan(x, lowrank_down, k, k_out, False, False, False)
    return plan is not None and plan[7] > 1


def quantize_act(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    act_scale: torch.Tensor,
    k_out: int,
    act_fmt: str,
    tail: torch.Tensor | None = None,
    tail_act: str = "none",
    trigger: bool = False,
    pdl: bool = False,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    gated: bool = False,
    folded: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations ``x`` [M, K] for the fp8 GEMM; see ``quantize_act_ref``.

    Returns ``(xq, lora_act)``: fp8 E4M3 [M, k_out] (``k_out`` ≥ K, the weight's padded K;
    extra columns are zero) and fp32 [M, r]. With ``tail`` [M, K2] (x's dtype) the input is
    ``cat([x, tail_act(tail)], -1)`` — the activation rounded to x's dtype, as if written
    — read from the two tensors (``quantize_act_cat_ref``): a layer whose input is a
    concatenation (FLUX's single-block ``proj_out``) needs no concatenated copy and no
    separate activation pass. ``gated``: the input is ``x · tail_act(tail)`` instead,
    ``tail`` [M, K] like ``x`` (``quantize_act_gated_ref``: a gated linear unit such as
    SDXL's GEGLU, whose halves are read where the up projection wrote them: no activation,
    product or copy pass). ``trigger``: let a programmatic dependent launched next
    (``widen_weight(pdl=True)``) start early, where the GPU has it. ``pdl``: launched as
    the previous kernel's programmatic dependent — only right after
    ``widen_weight(trigger=True)``, into buffers ``out = (xq, lora_act)`` allocated (the
    latter zeroed) before that launch, so that no kernel comes between. ``folded``:
    ``lowrank_down`` is ``fold_lowrank_down(lowrank_down, smooth)`` already — the same
    results, without the fold's multiply and rounding of L_down's chunk in every program.
    """
    if act_fmt not in ("int4", "fp8"):
        raise ValueError(f"the fp8 engine quantizes activations to int4 or fp8, got {act_fmt!r}")
    check_activation(tail_act)
    if x.stride(-1) != 1:
        x = x.contiguous()
    k_head = x.shape[1]
    if gated and (tail is None or tail.shape != x.shape):
        raise ValueError(
            f"a gated input needs a tail of x's shape {tuple(x.shape)}, got "
            f"{None if tail is None else tuple(tail.shape)}"
        )
    if tail is not None:
        if tail.dim() != 2 or tail.shape[0] != x.shape[0] or tail.dtype != x.dtype:
            raise ValueError(
                f"tail must be [M, K2] in x's dtype: x {tuple(x.shape)} {x.dtype}, "
                f"tail {tuple(tail.shape)} {tail.dtype}"
            )
        if tail.stride(-1) != 1:
            tail = tail.contiguous()
    m, k = x.shape[0], k_head + (tail.shape[1] if tail is not None and not gated else 0)
    if smooth.shape[0] != k:
        raise ValueError(f"smooth has {smooth.shape[0]} entries for an input of {k} columns")
    r = lowrank_down.shape[0]
    lowrank_down = lowrank_down.contiguous()
    smooth = smooth.float().contiguous()
    if m == 0:
        xq = torch.empty(0, k_out, dtype=torch.float8_e4m3fn, device=x.device)
        return xq, torch.empty(0, r, dtype=torch.float32, device=x.device)
    if WS_QUANTIZE and m >= WS_QUANTIZE_MIN_M and tail is None and not (gated or folded):
        from svdquant.kernels import quantize_ws

        if quantize_ws.supports(x, lowrank_down, k_out):
            return quantize_ws.quantize_act_ws(
                x, smooth, lowrank_down, act_scale, k_out, act_fmt, trigger, pdl, out
            )
    plan = _plan(x, lowrank_down, k, k_out, tail is not None, gated, trigger)
    if plan is None:
        return _wide_by_mm(x, smooth, lowrank_down, act_scale, k_out, act_fmt, pdl, out, folded,
                           tail, tail_act)  # fmt: skip
    block_m, block_k, warps, block_r, block_r2, slices, m_blocks, split, k_per_split = plan
    xq, lora = outputs(m, k_out, r, split, x.device, out)
    pdl = pdl and pdl_supported(x.device)
    launch(
        _quantize_act_kernel,
        (m_blocks, split, slices),
        x,
        x if tail is None else tail,
        smooth,
        lowrank_down,
        act_scale.float().reshape(1),
        xq,
        lora,
        m,
        k,
        k_head,
        k_out,
        r,
        k_per_split,
        x.stride(0),
        x.stride(0) if tail is None else tail.stride(0),
        xq.stride(0),
        lowrank_down.stride(0) if r else 0,
        lora.stride(0) if r else 0,
        INT4=act_fmt == "int4",
        HAS_LORA=r > 0,
        ATOMIC=split > 1,
        EXACT=interpreting(),
        TAIL_ACT=-1 if tail is None else act_code(tail_act),
        # the seam at a step boundary (FLUX: 3072): each step reads one tensor (with both
        # loads and a select per element the kernel took 239 registers, 2 programs per SM)
        SEAM_ALIGNED=k_head % block_k == 0 and k_per_split % block_k == 0,
        ROUND_BF16=needs_bf16_rounding(x.dtype),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=NUM_STAGES,
        PDL_TRIGGER=trigger and pdl_supported(x.device),
        PDL_WAIT_LAST=pdl,
        BLOCK_R2=block_r2,
        GATED=gated,  # (a gated input has its tail: checked above)
        FOLDED=folded,
        R_SLICED=slices > 1,
        **({"launch_pdl": True} if pdl else {}),
    )
    return xq, lora
