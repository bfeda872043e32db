"""W4A16 GEMV: 4-bit weights, 16-bit activations, for a few tokens (M = 1..16).

For the linears whose activations stay 16-bit (``act_fmt="none"``; FLUX's AdaLayerNorm
modulation linears run at M = batch size). Memory-bound: the weight bytes (0.5 per
weight plus the group scales) are read once and everything else is arranged so that as
many of them as possible are in flight:

* a small kernel first writes x̂ = x · (1/s) once (fp32, in planes of columns matching
  the nibbles of the packed codes) and the low-rank down projection
  ``x̂ · L_downᵀ`` (fp32 partial sums per K chunk, summed by the GEMV's epilogue: no
  atomics, no memset);
* the GEMV proper gives each program a block of weight rows and, where N is large enough
  to fill the GPU, all of K: wide steps (several groups, 16-byte loads) with the next
  step's bytes loaded before this step's arithmetic, and the 16-bit output written once.
  int4 weights at up to ``DP4A_MAX_M`` tokens multiply on the integer dot-product
  unit (``_w4a16_dp4a_kernel``): x̂ as 16-bit integers per group in byte planes, the
  codes as signed bytes by one or two logic ops, four products per ``dp4a``, one
  conversion to fp32 per group; on Hopper int4 weights at 2 (``GLUON_MIN_M``) to 16 tokens
  run on a tensor-core kernel in Gluon instead (``kernels/gemv_gluon.py``: the codes by
  TMA straight into the MMA's registers, x̂ one fp16 plane per group). Otherwise up to
  ``FMA_MAX_M`` tokens multiply on the
  FMA units — per group ``Σ code · x̂`` then one multiply by the group scale; more
  tokens use the tensor cores with the raw
  codes (exact in bf16) against x̂ split into two bf16 parts (hi + lo,
  fp32-like accuracy): int4 codes decoded two at a time by a few PTX instructions
  (``_w4a16_packed_kernel``, ``PACKED_MMA``), nvfp4 codes by ``_w4a16_mma_kernel``.
  Where N alone gives too few programs, K is split and the partial sums meet in an fp32
  buffer through atomics.
* on Hopper the GEMV is launched as the prep kernel's programmatic dependent
  (``PDL``): its programs start while the prep kernel runs, issue their first weight
  loads (the weights are no earlier kernel's output) and wait (``griddepcontrol.wait``)
  only before they read x̂ — the kernel boundary and the prep's time overlap the weight
  stream instead of preceding it.

``y = (x̂ · (code · s_group)ᵀ) · s_tensor + lora_act · L_upᵀ + b``.
Reference: ``reference.w4a16_linear_ref``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from svdquant import formats
from svdquant.kernels import gemv_gluon
from svdquant.kernels._triton_common import (
    cdiv,
    dot_precision,
    e2m1_value,
    int4_value,
    interpreting,
    needs_bf16_rounding,
    next_pow2,
    nibble_pair_ptx,
    num_sms,
    pdl_supported,
    round_bf16,
    split_output,
)
from svdquant.kernels.launch import launch

__all__ = ["MAX_GEMV_M", "w4a16_linear"]

#: Largest M the GEMV kernels take (the padded width of the tensor-core path's dot).
MAX_GEMV_M = 16
#: (BLOCK_N, columns per step, num_warps) of the FMA kernel at one token and at more
#: (``FMA_MAX_M``), and of the tensor-core kernel; ``bench/gemm.py --sweep gemv`` (H200,
#: 2026-11-29: "fma" (8, 256, 2) 22.0 µs and (16, 256, 4) 21.9 µs, the best of 27 at
#: M = 1; "fma_multi" (4, 1024, 1) 31.4 µs at M = 4; "mma" from the H100).
TILES = {
    "fma": (8, 256, 2),
    "fma_multi": (4, 1024, 1),
    "mma": (128, 64, 4),
    # (BLOCK_N, columns per step, num_warps) of ``_w4a16_dp4a_kernel`` at one token and
    # at more: the best of 18 at M = 1 (22.3 µs) and of 12 at M = 4 (34.8 µs), N = 18432,
    # K = 3072 (``probe_gemv_dp4a-h200-2026-11-29-sweep.json``, H200)
    "dp4a": (8, 512, 1),
    "dp4a_multi": (4, 512, 1),
    # (BLOCK_N, groups of 64 columns per step, num_warps) of ``_w4a16_packed_kernel``
    # (``PACKED_MMA``): the best of 24 (BLOCK_N 32-256 x 1, 2, 4 groups x 4, 8 warps) at
    # every M = 1..16 (``probe_gemv_mma_sweep-h200-2026-11-29.json``, H200)
    "packed": (128, 1, 4),
}
#: Split K until the grid has this many programs per SM (when N alone is too small).
PROGRAMS_PER_SM = 4
#: Tokens up to which the FMA kernel runs (more: the tensor cores). v10 (H100): at M = 4
#: the FMA kernel of the time was 1.6x slower — each thread then loaded x̂ for its own
#: row; with all rows in each thread (v20) it won on the H200: 31.4 µs vs the tensor
#: cores' best 40.7 µs at M = 4 (``gemm-h200-2026-11-29-v21.json``).
FMA_MAX_M = 4
#: 2**23's fp32 bits, the FMA kernel's int4 decode constant (a runtime argument: see
#: ``_word_code``).
MAGIC_2P23 = 0x4B000000
#: Columns per program of the x̂ / low-rank down kernel (its K split).
LORA_CHUNK = 128
#: The same for the Gluon GEMV's x̂ (``prep(..., f16=...)``; a multiple of 64).
F16_CHUNK = 128
#: int4 weights at more than ``FMA_MAX_M`` tokens on the packed-decode tensor-core kernel
#: (``_w4a16_packed_kernel``: two codes per decode instruction, ~4 instructions per code
#: in its sm_90 SASS against 8.4 for ``_w4a16_mma_kernel``; nvfp4 stays on the latter).
#: H200, 2026-11-29 (``bench/probe_gemv_mma.py``; N = 18432, K = 3072, rank 32 + bias,
#: CUDA graph): ``probe_gemv_mma_sweep-h200-2026-11-29.json`` 46.0 vs 51.2 µs at M = 5,
#: 48.4 vs 53.3 at M = 8, 54.0 vs 58.7 at M = 16 (1.09-1.11x; ``probe_gemv_mma-2026-11-29
#: .json`` 48.9 vs 53.7 and 55.1 vs 59.5 at M = 8, 16). At M ≤ 4 the FMA kernel stays
#: faster (M = 4: 40.9 vs 45.4 µs): ``FMA_MAX_M`` unchanged.
PACKED_MMA = True
#: int4 weights at up to this many tokens on the dp4a kernel (``_w4a16_dp4a_kernel``:
#: x̂ as 16-bit integers, three logic ops and four ``dp4a`` per 8 codes and token; 0:
#: off). H200, 2026-11-29 (``bench/probe_gemv_dp4a.py``, whole ``w4a16_linear``, rank 32
#: + bias, CUDA graph, against the FMA kernel of the same run): N = 18432, K = 3072:
#: M = 1 24.5 vs 24.1 µs (clean L2 21.4 vs 22.6), M = 3 34.8 vs 40.2, M = 4 36.2 vs 41.0;
#: N = 9216: M = 1 16.2 vs 20.2, M = 4 26.9 vs 30.4. From 5 tokens its [rows, tokens,
#: words] integer tensors outgrow the registers (M = 5 60.7 µs vs the packed kernel's
#: 45.8; M = 16 307 vs 53).
DP4A_MAX_M = 4
#: Up to this many tokens the dp4a kernel addresses its x̂ planes and scales per weight row
#: (the same words for every row), so that they load in the codes' register layout
#: (0: never). sm_90 SASS (triton 3.6, ``sass_report --kernels gemv_dp4a,gemv_dp4a_xrows``):
#: 213 instructions a step instead of 350 at one token — the 48 ``SHFL`` and 64 ``SEL``
#: that moved each code word's nibbles into x̂'s layout and reduced a group's words across
#: lanes are gone — and 72 registers instead of 96. H200, 2026-11-29 (``probe_layer.py
#: --what gemv``, whole ``w4a16_linear``, CUDA graph, each way twice): M = 1 1.054x at N =
#: 18432 (21.1 -> 20.0 µs) and 1.078x at 9216; M = 2-4 0.88-0.97x (the per-row x̂ words
#: for every token outgrow what the layout saves) — so one token only.
DP4A_X_ROWS_MAX_M = 1
#: The prep kernel requests its first 32 ranks of L_down — and for the dp4a kernel the
#: first token's x — together with the smoothing factors, before it waits for any of
#: them (else L_down after x̂ is stored and x after 1/s is computed: two more memory
#: round trips in the chain the GEMV waits for under PDL; ncu v31: the prep 3.8 µs).
#: H200, 2026-11-29 (``probe_layer.py --what gemv``, the whole ``w4a16_linear`` against
#: the old order): 1.03x at one token, 1.04-1.08x at 2-4 (N = 18432 / 9216), 1.01-1.02x
#: at 8 (the packed kernel). Same outputs bit for bit.
PREP_LD_FIRST = True
#: int4 weights at ``GLUON_MIN_M`` to 16 tokens on the Gluon tensor-core kernel
#: (``kernels/gemv_gluon.py``: the codes by TMA straight into the MMA's registers, x̂ one
#: fp16 plane) where the GPU has it (sm_90). H200, 2026-12-01 (``bench/probe_gemv_gluon.py``,
#: the whole ``w4a16_linear`` against this path's other kernels in one run, CUDA graph,
#: ``probe_gemv_gluon-h200-2026-12-01-v49-defaults.json``): N = 18432 1.10x at 3 tokens,
#: 1.13x at 4, 1.47-1.59x at 5-16 (28.5 µs at 4: 1.45x BF16; 29.7 at 8: 1.40x; 35.5 at 16:
#: 1.17x, where the packed kernel was 0.79x); N = 9216 0.97x / 0.99x at 3 / 4, 1.48-1.53x
#: at 5-16; 0.70x at one token and 0.81-0.93x at two (the dp4a kernel's). v50, four code
#: bytes decoded a word (``probe_gemv_gluon-h200-2026-12-01-v50-quad-decode.json``):
#: N = 18432 1.29-1.30x the dp4a kernel at 3-4 tokens (24.8 µs at 4: 1.72x BF16), 1.78x
#: the packed kernel at 5-8, 1.47x at 16; N = 9216 1.07-1.10x at 3-4; at two tokens 1.09x
#: (18432) and 0.92x (9216), at one 0.81-0.84x: the threshold stays at 3. v51, x̂ computed
#: in the Gluon kernel (``gemv_gluon.XHAT_IN_KERNEL``,
#: ``probe_gemv_gluon-h200-2026-12-01-v51-xhat-in-kernel.json``): two tokens 1.22x the dp4a
#: kernel at N = 18432, 1.13x at 9216; one token 0.89x / 0.96x: from 2 tokens.
GLUON = True
GLUON_MIN_M = 2
#: Launch the GEMV as the prep kernel's programmatic dependent where the GPU has it
#: (sm_90+; never under the interpreter, which has no inline assembly).
PDL = True


def _pdl(device: torch.device) -> bool:
    """Whether to launch the GEMV as a programmatic dependent launch on ``device``."""
    return PDL and pdl_supported(device)


@triton.jit
def _prep_kernel(
    x_ptr,
    smooth_ptr,
    ld_ptr,
    xh_ptr,
    lora_ptr,
    xs_ptr,
    M,
    K,
    KP,
    R,
    stride_xm,
    stride_ldr,
    stride_hm,
    stride_ls,
    stride_lm,
    CHUNK: tl.constexpr,
    PLANES: tl.constexpr,
    PRESCALE: tl.constexpr,
    PDL: tl.constexpr,
    PACKED: tl.constexpr = False,
    INTERPRET: tl.constexpr = False,
    I16: tl.constexpr = False,
    LD_FIRST: tl.constexpr = False,
    F16: tl.constexpr = 0,
    zero_ptr=None,
    zero_numel=0,
    ZERO: tl.constexpr = False,
    XHAT: tl.constexpr = True,
    DOT_PREC: tl.constexpr = "ieee",
):
    """x̂ = x · (1/s) for this program's CHUNK columns, written as [M, PLANES, KP/PLANES]
    (plane p holds the columns c ≡ p mod PLANES; zero past K; with ``PRESCALE``, plane p
    times ``2**-_plane_shift(p)``, for the FMA kernel's int4 decode), and this chunk's share of
    ``x̂ · L_downᵀ`` (fp32 FMAs, 32 ranks at a time, each L_down block loaded once).

    A handful of tokens: no tensor-core tile to fill (a 16-row ``tl.dot`` for one token
    took 255 registers and 10 µs, v9), many small programs, a couple of memory round
    trips. With ``PDL`` it lets the GEMV launch at once (the GEMV waits for this
    kernel's writes before it reads them). ``ZERO``: the programs also zero the
    ``zero_numel`` fp32 at ``zero_ptr`` (the GEMV's K-split sums: no fill kernel between
    this one and its programmatic dependent). ``XHAT`` false (``F16`` only): no x̂, only
    the low-rank sums (and the zeroing): the Gluon GEMV computes its own x̂
    (``gemv_gluon.XHAT_IN_KERNEL``)."""
    if PDL:
        gdc_launch_dependents()
    pid_k = tl.program_id(0)
    c = pid_k * CHUNK + tl.arange(0, CHUNK)
    cmask = c < K
    x_first = c * 0.0
    ld = x_first  # (a stand-in where L_down's first block is not loaded first)
    if LD_FIRST:  # L_down's first 32 ranks and token 0 requested with s, before any wait
        ld = _ld_block(ld_ptr, 0, c, cmask, R, stride_ldr)
        if I16:
            x_first = tl.load(x_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    inv_s = tl.math.div_rn(1.0, tl.load(smooth_ptr + c, mask=cmask, other=1.0))
    dst = xh_ptr + (c % PLANES) * (KP // PLANES) + c // PLANES
    plane_inv_s = inv_s
    if PRESCALE:  # 2**-shift built from its exponent bits: exact
        pow2 = ((127 - _plane_shift(c % PLANES)) << 23).to(tl.float32, bitcast=True)
        plane_inv_s = inv_s * pow2
    if I16:  # the dp4a kernel's x̂ (``Int16X``): byte planes and group scales
        _store_i16(x_ptr, xh_ptr, xs_ptr, c, cmask, inv_s, M, KP, stride_xm, stride_hm,
                   pid_k, x_first, CHUNK, LD_FIRST)  # fmt: skip
    elif F16:  # the Gluon kernel's x̂ (``F16X``), F16 token slots
        if XHAT:
            _store_f16(x_ptr, xh_ptr, xs_ptr, c, cmask, inv_s, M, KP, stride_xm, pid_k, CHUNK,
                       F16)  # fmt: skip
    elif PACKED:  # the packed kernel's x̂ (``PackedX``); the sums go after the planes
        _store_packed(x_ptr, xh_ptr, xs_ptr, c, cmask, inv_s, M, KP, stride_xm, pid_k, CHUNK,
                      INTERPRET)  # fmt: skip
    else:
        for m in range(M):
            xv = tl.load(x_ptr + m * stride_xm + c, mask=cmask, other=0.0)
            tl.store(dst + m * stride_hm, xv.to(tl.float32) * plane_inv_s, mask=c < KP)
    if F16:  # every token slot in one dot a rank block
        _lora_tokens(x_ptr, ld_ptr, lora_ptr, ld, c, cmask, inv_s, M, R, stride_xm, stride_ldr,
                     stride_ls, stride_lm, pid_k, LD_FIRST, DOT_PREC)  # fmt: skip
    else:
        r_start = 0
        if LD_FIRST:
            _lora_block(x_ptr, lora_ptr, ld, 0, c, cmask, inv_s, M, R, stride_xm, stride_ls,
                        stride_lm, pid_k)  # fmt: skip
            r_start = 32
        for r0 in range(r_start, R, 32):
            blk = _ld_block(ld_ptr, r0, c, cmask, R, stride_ldr)
            _lora_block(x_ptr, lora_ptr, blk, r0, c, cmask, inv_s, M, R, stride_xm, stride_ls,
                        stride_lm, pid_k)  # fmt: skip
    if ZERO:
        share = tl.cdiv(zero_numel, tl.num_programs(0))
        for z in range(pid_k * share, (pid_k + 1) * share, 1024):
            zi = z + tl.arange(0, 1024)
            tl.store(zero_ptr + zi, tl.zeros([1024], tl.float32),
                     mask=(zi < zero_numel) & (zi < (pid_k + 1) * share))  # fmt: skip


@triton.jit
def _ld_block(ld_ptr, r0, c, cmask, R, stride_ldr):
    """Ranks r0 … r0 + 31 of L_down at this program's columns, fp32 [32, CHUNK]."""
    rr = r0 + tl.arange(0, 32)
    return tl.load(
        ld_ptr + rr[:, None] * stride_ldr + c[None, :],
        mask=(rr < R)[:, None] & cmask[None, :],
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _lora_block(x_ptr, lora_ptr, ld, r0, c, cmask, inv_s, M, R, stride_xm, stride_ls,
                stride_lm, pid_k):  # fmt: skip
    """This chunk's share of ``x̂ · L_downᵀ`` for ranks r0 … r0 + 31, every token."""
    rr = r0 + tl.arange(0, 32)
    for m in range(M):
        xv = tl.load(x_ptr + m * stride_xm + c, mask=cmask, other=0.0)
        part = tl.sum(ld * (xv.to(tl.float32) * inv_s)[None, :], axis=1)
        tl.store(lora_ptr + pid_k * stride_ls + m * stride_lm + rr, part, mask=rr < R)


@triton.jit
def _lora_tokens(x_ptr, ld_ptr, lora_ptr, ld, c, cmask, inv_s, M, R, stride_xm, stride_ldr,
                 stride_ls, stride_lm, pid_k, LD_FIRST: tl.constexpr,
                 DOT_PREC: tl.constexpr):  # fmt: skip
    """This chunk's share of ``x̂ · L_downᵀ`` for every token at once (16 slots): x loaded
    once, one fp32 ``tl.dot`` (``DOT_PREC``) per 32 ranks — ``_lora_block``'s loop took a
    memory round trip a token (v51: the prep 15 µs at 16 tokens). ``ld``: the first block
    when ``LD_FIRST``."""
    n = tl.arange(0, 16)
    rr = tl.arange(0, 32)
    xt = tl.load(x_ptr + n[:, None] * stride_xm + c[None, :],
                 mask=(n < M)[:, None] & cmask[None, :], other=0.0)  # fmt: skip
    xt = xt.to(tl.float32) * inv_s[None, :]
    dst = lora_ptr + pid_k * stride_ls + n[:, None] * stride_lm + rr[None, :]
    if LD_FIRST:  # noqa: SIM108 (a static branch: only the taken side is traced)
        first = ld
    else:
        first = _ld_block(ld_ptr, 0, c, cmask, R, stride_ldr)
    part = tl.dot(xt, tl.trans(first), input_precision=DOT_PREC)
    tl.store(dst, part, mask=(n < M)[:, None] & (rr < R)[None, :])
    for r0 in range(32, R, 32):
        blk = _ld_block(ld_ptr, r0, c, cmask, R, stride_ldr)
        part = tl.dot(xt, tl.trans(blk), input_precision=DOT_PREC)
        tl.store(dst + r0, part, mask=(n < M)[:, None] & (r0 + rr < R)[None, :])


@triton.jit
def _store_i16(x_ptr, xq_ptr, xs_ptr, c, cmask, inv_s, M, KP, stride_xm, stride_qm, pid_k,
               x_first, CHUNK: tl.constexpr, X_FIRST: tl.constexpr):  # fmt: skip
    """This chunk's x̂ for the dp4a kernel: per token and group of 64 columns, x̂ as 16-bit
    integers ``q = round(x̂ / s)`` against ``s = max |x̂| / 32767`` (relative error ≤ 2⁻¹⁶
    of the group's largest value), split into a signed high byte and an unsigned low
    byte (q = 256 · hi + lo) and packed four to a word in the order of the code words'
    nibbles: planes [hi even, hi odd, lo even, lo odd][KP/8] (byte b of word i: column
    8i + 2b, or 8i + 2b + 1 for the odd planes), int32 [M, 4, KP/8]; and ``s / 16``
    (the kernel's codes are 16 · code), fp32 [M, KP/64]. A non-finite group keeps a
    non-finite scale, so NaN and Inf still reach the token's outputs. ``X_FIRST``: token 0's
    x is ``x_first`` (loaded by the caller before it waited for anything) and each next
    token's is requested a token ahead."""
    GPC: tl.constexpr = CHUNK // 64
    WPC: tl.constexpr = CHUNK // 8
    KW = KP // 8
    g = pid_k * GPC + tl.arange(0, GPC)
    wi = pid_k * WPC + tl.arange(0, WPC)
    shifts = (8 * tl.arange(0, 4))[None, :]
    x_next = x_first
    for m in range(M):
        if X_FIRST:
            xv = x_next * inv_s
            more = cmask & (c * 0 + m + 1 < M)  # a tensor mask (the interpreter's)
            x_next = tl.load(x_ptr + (m + 1) * stride_xm + c, mask=more, other=0.0).to(tl.float32)
        else:
            xv = tl.load(x_ptr + m * stride_xm + c, mask=cmask, other=0.0).to(tl.float32) * inv_s
        xg = tl.reshape(xv, [GPC, 64])
        amax = tl.max(tl.abs(xg), axis=1)
        inv = tl.where(amax > 0, 32767.0 / tl.where(amax > 0, amax, 1.0), 0.0)
        # round to nearest by 1.5 * 2**23 (|x̂ / s| ≤ 32767)
        q = ((xg * inv[:, None] + 12582912.0) - 12582912.0).to(tl.int32)
        q = tl.reshape(q, [WPC, 4, 2])
        he, ho = tl.split(q >> 8)
        le, lo = tl.split(q & 255)
        dst = xq_ptr + m * stride_qm + wi
        wmask = wi < KW
        tl.store(dst, tl.sum((he & 255) << shifts, axis=1), mask=wmask)
        tl.store(dst + KW, tl.sum((ho & 255) << shifts, axis=1), mask=wmask)
        tl.store(dst + 2 * KW, tl.sum(le << shifts, axis=1), mask=wmask)
        tl.store(dst + 3 * KW, tl.sum(lo << shifts, axis=1), mask=wmask)
        tl.store(xs_ptr + m * (KP // 64) + g, amax * (1.0 / 524272.0), mask=g < KP // 64)


@triton.jit
def _store_f16(x_ptr, xh_ptr, xo_ptr, c, cmask, inv_s, M, KP, stride_xm, pid_k,
               CHUNK: tl.constexpr, T: tl.constexpr):  # fmt: skip
    """This chunk's x̂ for the Gluon kernel (``gemv_gluon``): per group of 64 columns and
    token slot (T of them, zero past M) x̂ times a power of two ``1 / P`` that puts the
    group's largest value in [2⁹, 2¹⁰) — the odd columns' (the codes' high nibbles, which
    the kernel decodes to 16 · (72 + code)) then divided by 16 — as fp16 in the order the
    kernel's MMA reads it — [group][plane: even, odd columns][lane][T], byte
    ``b = 8c + 2q + e`` of the group's codes at lane ``4 (n mod 8) + c``, value
    ``8 (n // 8) + 2q + e`` for token n — and per group and token ``P`` and
    ``P · (1032 · Σ even + 1152 · Σ odd)`` of the group's stored values (the offset the
    decode adds), fp32 [KP/64, 2, T]. A non-finite group stays non-finite (its outputs NaN
    or Inf)."""
    GPC: tl.constexpr = CHUNK // 64
    g = pid_k * GPC + tl.arange(0, GPC)
    n = tl.arange(0, T)
    # every token slot at once (one load, no chain of per-token round trips)
    xv = tl.load(
        x_ptr + n[:, None] * stride_xm + c[None, :],
        mask=(n < M)[:, None] & cmask[None, :],
        other=0.0,
    )
    xg = tl.reshape(xv.to(tl.float32) * inv_s[None, :], [T, GPC, 64])
    e = (tl.max(tl.abs(xg), axis=2).to(tl.int32, bitcast=True) >> 23) & 255
    e = tl.minimum(tl.maximum(e, 10), 254)
    inv = ((263 - e) << 23).to(tl.float32, bitcast=True)
    pw = ((e - 9) << 23).to(tl.float32, bitcast=True)
    w = c % 64
    odd = tl.reshape(w % 2, [GPC, 64])[None, :, :]  # the high nibbles' columns: x̂ / 16
    inv = inv[:, :, None] * tl.where(odd == 1, 0.0625, 1.0)
    h16 = (xg * inv).to(tl.float16)  # nearest even, here and in the interpreter
    b = w // 2
    col = ((c // 64) * 2 + w % 2) * 32 + b // 8  # [CHUNK]: (group, plane, lane's c) ...
    dst = (col[None, :] + 4 * (n % 8)[:, None]) * T + (8 * (n // 8))[:, None] + (b % 8)[None, :]
    tl.store(xh_ptr + dst, tl.reshape(h16, [T, CHUNK]), mask=(c < KP)[None, :])
    # the decode's offsets: 1032 for a low nibble, 1152 for a high one
    o = pw * tl.sum(h16.to(tl.float32) * tl.where(odd == 1, 1152.0, 1032.0), axis=2)  # [T, GPC]
    po = xo_ptr + g[None, :] * (2 * T) + n[:, None]
    gmask = (g < KP // 64)[None, :]
    tl.store(po, pw, mask=gmask)
    tl.store(po + T, o, mask=gmask)


@triton.jit
def _store_packed(x_ptr, xh_ptr, xs_ptr, c, cmask, inv_s, M, KP, stride_xm, pid_k,
                  CHUNK: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """This chunk's x̂ for the packed kernel: bf16 hi = bf16(x̂), lo = bf16(x̂ - hi) (hi +
    lo: ~16 bits of x̂) as planes [hi even, hi odd, lo even, lo odd][KP/2][16 tokens]
    (zero past M and past K), and ``136 · Σ (hi + lo)`` per group of 64 columns and
    token, fp32 [KP/64][16]: the offset the kernel's ``136 + code`` adds."""
    GPC: tl.constexpr = CHUNK // 64
    plane = (KP // 2) * 16
    dst = xh_ptr + (c % 2) * plane + (c // 2) * 16
    g = pid_k * GPC + tl.arange(0, GPC)
    for m in range(16):
        real = c * 0 + m < M  # a tensor mask (token slots past M hold zeros)
        xv = tl.load(x_ptr + m * stride_xm + c, mask=cmask & real, other=0.0)
        xh = xv.to(tl.float32) * inv_s
        hi = _bf16(xh, INTERPRET)
        lo = _bf16(xh - hi.to(tl.float32), INTERPRET)
        tl.store(dst + m, hi, mask=c < KP)
        tl.store(dst + 2 * plane + m, lo, mask=c < KP)
        both = tl.reshape(hi.to(tl.float32) + lo.to(tl.float32), [GPC, 64])
        tl.store(xs_ptr + g * 16 + m, 136.0 * tl.sum(both, axis=1), mask=g < KP // 64)


@triton.jit
def _nibble_values(b, NVFP4: tl.constexpr):
    """The values of the low and high nibbles of the (int32) bytes ``b``, as fp32."""
    if NVFP4:
        return e2m1_value(b & 0xF), e2m1_value((b >> 4) & 0xF)
    return int4_value(b & 0xF), int4_value((b >> 4) & 0xF)


@triton.jit
def _plane_shift(p):
    """Where nibble ``p`` of a 32-bit word sits for ``_word_code``: bit ``4p`` for
    p < 5, bit ``4p - 12`` for the top three (read from the word shifted right by 12),
    so that every nibble fits in the 23-bit mantissa trick below."""
    return tl.where(p < 5, 4 * p, 4 * p - 12)


@triton.jit
def _word_code(t, P: tl.constexpr, NVFP4: tl.constexpr, magic):
    """Code ``P`` (nibble P) of the int32 words ``t``, as fp32.

    nvfp4: ``t`` are the stored words, the result the E2M1 value. int4: ``t`` are the
    words XOR 0x88888888 (every nibble: code + 8), the result the signed code times
    ``2**_plane_shift(P)`` — the nibble is masked in place (no shift), OR 2**23's
    exponent makes it the float ``2**23 + (code + 8) · 2**shift`` and one subtraction
    leaves ``code · 2**shift`` exactly: one logic op (one immediate, one register
    constant) and one add per code. The prep kernel writes x̂'s plane P times
    ``2**-shift``, so every product is the exact ``code · x̂``. ``magic`` is 2**23's bits
    (0x4B000000) passed as a kernel argument: as a literal, ptxas split the mask-and-or
    into two logic ops (one immediate each); a register operand makes it one ``LOP3``."""
    if NVFP4:
        return e2m1_value((t >> (4 * P)) & 0xF)
    SH: tl.constexpr = 4 * P if P < 5 else 4 * P - 12
    v = t if P < 5 else t >> 12
    bits = (v & (0xF << SH)) | magic
    return bits.to(tl.float32, bitcast=True) - (8388608.0 + 8.0 * (1 << SH))


@triton.jit
def _epilogue(
    acc,
    rows,
    rm,
    pid_k,
    N,
    M,
    R,
    S,
    ts_ptr,
    lora_ptr,
    lu_ptr,
    bias_ptr,
    out_ptr,
    stride_ls,
    stride_lm,
    stride_un,
    stride_om,
    ATOMIC: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    FP32_PREC: tl.constexpr,
    S_BLOCK: tl.constexpr,
):
    """``acc`` [BLOCK_N, BLOCK_M] (yᵀ, unscaled) · s_tensor + low-rank up + bias, stored.

    With a K split every term is a sum: each program adds its share into an fp32 buffer,
    the low-rank and bias terms from the first split only."""
    nmask = rows < N
    mmask = rm < M
    y = acc * tl.load(ts_ptr)
    first = (pid_k == 0).to(tl.float32)
    if HAS_LORA:
        for r0 in range(0, R, 32):
            rr = r0 + tl.arange(0, 32)
            rmask = rr < R
            lu = tl.load(
                lu_ptr + rows[:, None] * stride_un + rr[None, :],
                mask=nmask[:, None] & rmask[None, :],
                other=0.0,
            ).to(tl.float32)
            # the down projection's partial sums (one per K chunk), S_BLOCK at a time: one
            # wide load each, not a chain of S dependent ones
            la = tl.zeros([acc.shape[1], 32], dtype=tl.float32)
            for s0 in range(0, S, S_BLOCK):
                sp = s0 + tl.arange(0, S_BLOCK)
                parts = tl.load(
                    lora_ptr
                    + sp[:, None, None] * stride_ls
                    + rm[None, :, None] * stride_lm
                    + rr[None, None, :],
                    mask=(sp < S)[:, None, None] & mmask[None, :, None] & rmask[None, None, :],
                    other=0.0,
                )
                la += tl.sum(parts, axis=0)
            if acc.shape[1] >= 16:  # the tensor-core kernel's 16 tokens: an MMA
                y += tl.dot(lu, tl.trans(la), input_precision=FP32_PREC) * first
            else:
                y += tl.sum(lu[:, None, :] * la[None, :, :], axis=2) * first
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=nmask, other=0.0).to(tl.float32)[:, None] * first
    optr = out_ptr + rm[None, :] * stride_om + rows[:, None]
    omask = nmask[:, None] & mmask[None, :]
    if ATOMIC:
        tl.atomic_add(optr, y, mask=omask, sem="relaxed")
    else:
        if ROUND_BF16:
            y = round_bf16(y)
        tl.store(optr, y.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _word_tiles(q_ptr, sc_ptr, M, N, KPW, kw_per_split, stride_qn, stride_sn,
                BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BKW: tl.constexpr,
                GPS: tl.constexpr):  # fmt: skip
    """The program's rows, tokens and K range for the GEMV kernels that read the codes as
    32-bit words (the FMA and dp4a kernels): ``(rows, rm, tok, word, kw_start, kw_end,
    q_rows, s_rows)`` — the code words [BLOCK_N, 1, BKW] and group scales [BLOCK_N, 1, GPS]
    of the first step. No masks in the loop (a per-element mask would split the 16-byte
    loads): rows past N read row N - 1 and tokens past M token M - 1 (never stored),
    BLOCK_K divides KP and the split, and the prefetch past the end re-reads a step. K is
    counted in words (KPW, kw_per_split), so the compiler sees multiples of 16."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1)
    rm = tl.arange(0, BLOCK_M)
    tok = tl.minimum(rm, M - 1)[None, :, None]
    word = tl.arange(0, BKW)[None, None, :]
    kw_start = tl.program_id(1) * kw_per_split
    kw_end = tl.minimum(kw_start + kw_per_split, KPW)
    q_rows = q_ptr + rows_c[:, None, None] * stride_qn + word
    s_rows = sc_ptr + rows_c[:, None, None] * stride_sn + tl.arange(0, GPS)[None, None, :]
    return rows, rm, tok, word, kw_start, kw_end, q_rows, s_rows


@triton.jit
def _w4a16_fma_kernel(
    xh_ptr,
    q_ptr,
    sc_ptr,
    ts_ptr,
    lora_ptr,
    lu_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    KPW: tl.constexpr,
    R,
    S,
    kw_per_split,
    stride_hm,
    stride_qn,
    stride_sn,
    stride_ls,
    stride_lm,
    stride_un,
    stride_om,
    magic,
    NVFP4: tl.constexpr,
    GROUP: tl.constexpr,
    ATOMIC: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    FP32_PREC: tl.constexpr,
    S_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PDL: tl.constexpr,
):
    """A few tokens (BLOCK_M ≥ M, ``FMA_MAX_M``) on the FMA units. The codes are read as
    32-bit words (8 nibbles; nibble p of word i is column 8i + p) into a [BLOCK_N, 1,
    words per step] tensor and x̂ as 8 planes (plane p: columns 8i + p) into [1, BLOCK_M,
    words] ones, broadcast against each other: the same register layout, nothing through
    shared memory in the loop. When the step's words take every thread (BLOCK_K / 32 =
    32 · num_warps), each thread holds all BLOCK_N rows and BLOCK_M tokens of its
    columns: x̂ is loaded once per token for all rows and each code decoded once for all
    tokens (with fewer words, rows spread over threads and each loads x̂ for its own: L1
    traffic ~8x the weight bytes, the v10 counters' limit). Each step reduces only within
    a group (one shuffle) and keeps per-group sums; the groups are summed once at the
    end. ``KPW`` (KP / 8) is a constant so the 8 planes' addresses are one register plus
    immediate offsets."""
    WPG: tl.constexpr = GROUP // 8  # 32-bit words per group
    GPS: tl.constexpr = BLOCK_K // GROUP  # groups per step
    BKW: tl.constexpr = BLOCK_K // 8  # words per step
    pid_k = tl.program_id(1)
    rows, rm, tok, word, kw_start, kw_end, q_rows, s_rows = _word_tiles(
        q_ptr, sc_ptr, M, N, KPW, kw_per_split, stride_qn, stride_sn, BLOCK_N, BLOCK_M, BKW, GPS
    )
    # x̂ [1, BLOCK_M, BKW]: once per step and token, rows broadcast
    x_cols = xh_ptr + tok * stride_hm + word
    acc = tl.zeros([BLOCK_N, BLOCK_M, GPS], dtype=tl.float32)
    # Register double buffering: the next step's words are loaded before this step's
    # arithmetic, so their latency overlaps it.
    w_next = tl.load(q_rows + kw_start)
    if PDL:  # only weights (no earlier kernel's output) are read before this; x̂ after
        gdc_wait()
    for kw in range(kw_start, kw_end, BKW):
        w = w_next
        w_next = tl.load(q_rows + tl.minimum(kw + BKW, kw_end - BKW))
        sg = tl.load(s_rows + kw // WPG).to(tl.float32)  # [BLOCK_N, 1, GPS]
        t = w if NVFP4 else w ^ -0x77777778  # int4: 0x88888888, each nibble code + 8
        part = tl.zeros([BLOCK_N, BLOCK_M, BKW], dtype=tl.float32)
        for p in tl.static_range(8):
            part += _word_code(t, p, NVFP4, magic) * tl.load(x_cols + kw + p * KPW)
        acc += tl.sum(tl.reshape(part, [BLOCK_N, BLOCK_M, GPS, WPG]), axis=3) * sg
    _epilogue(
        tl.sum(acc, axis=2), rows, rm, pid_k, N, M, R, S, ts_ptr, lora_ptr, lu_ptr,
        bias_ptr, out_ptr, stride_ls, stride_lm, stride_un, stride_om,
        ATOMIC, HAS_LORA, HAS_BIAS, ROUND_BF16, FP32_PREC, S_BLOCK,
    )  # fmt: skip


@triton.jit
def _bf16(x, INTERPRET: tl.constexpr):
    """fp32 ``x`` rounded to bf16 (nearest even; the interpreter's own cast truncates)."""
    if INTERPRET:
        x = round_bf16(x)
    return x.to(tl.bfloat16)


@triton.jit
def _mma(w, x, acc, DOT_FP32: tl.constexpr):
    """``acc + w · x`` for bf16-exact fp32 ``w`` and bf16 ``x`` (fp32 under the interpreter,
    whose bf16 ``tl.dot`` is wrong; the values are the same)."""
    if DOT_FP32:
        return tl.dot(w.to(tl.float32), x.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w.to(tl.bfloat16), x, acc)


@triton.jit
def _w4a16_mma_kernel(
    xh_ptr,
    q_ptr,
    sc_ptr,
    ts_ptr,
    lora_ptr,
    lu_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    KP,
    R,
    S,
    k_per_split,
    stride_hm,
    stride_qn,
    stride_sn,
    stride_ls,
    stride_lm,
    stride_un,
    stride_om,
    NVFP4: tl.constexpr,
    GROUP: tl.constexpr,
    ATOMIC: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    FP32_PREC: tl.constexpr,
    S_BLOCK: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """M ≤ 16 tokens on the tensor cores: ``yᵀ = codes · x̂ᵀ`` (x̂ padded to 16 rows), low
    nibbles against x̂'s even columns and high nibbles against its odd ones; an int4 group
    is scaled after its MMA, an nvfp4 value before it (E2M1 × E4M3 is exact in bf16)."""
    HK: tl.constexpr = BLOCK_K // 2  # bytes per step
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1)  # unmasked loads, as in the FMA kernel
    rm = tl.arange(0, 16)
    j = tl.arange(0, HK)
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)  # yᵀ
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, KP)
    q_rows = q_ptr + rows_c[:, None] * stride_qn + j[None, :]
    if NVFP4:  # the scale of each byte's two columns
        s_cols = sc_ptr + rows_c[:, None] * stride_sn + (j // (GROUP // 2))[None, :]
    x_even = xh_ptr + tl.minimum(rm, M - 1)[None, :] * stride_hm + j[:, None]  # [HK, 16]
    if PDL:  # nothing read or written yet
        gdc_wait()
    for k0 in range(k_start, k_end, BLOCK_K):
        kmask = k0 // 2 + j < k_end // 2  # by bytes (contiguous: the loads stay wide)
        b = tl.load(q_rows + k0 // 2, mask=kmask[None, :], other=0).to(tl.int32)
        lo, hi = _nibble_values(b, NVFP4)
        if NVFP4:
            sg = tl.load(s_cols + k0 // GROUP, mask=kmask[None, :], other=0.0).to(tl.float32)
            lo *= sg
            hi *= sg
        xe = tl.load(x_even + k0 // 2, mask=kmask[:, None], other=0.0)  # x̂ᵀ: even columns
        xo = tl.load(x_even + KP // 2 + k0 // 2, mask=kmask[:, None], other=0.0)
        part = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
        for odd in tl.static_range(2):
            xv = xo if odd == 1 else xe
            w = hi if odd == 1 else lo
            x_hi = _bf16(xv, DOT_FP32)
            x_lo = _bf16(xv - x_hi.to(tl.float32), DOT_FP32)
            part = _mma(w, x_hi, part, DOT_FP32)
            part = _mma(w, x_lo, part, DOT_FP32)
        if NVFP4:
            acc += part
        else:  # one int4 group per step (BLOCK_K == GROUP)
            sg = tl.load(sc_ptr + rows_c * stride_sn + k0 // GROUP).to(tl.float32)
            acc += part * sg[:, None]
    _epilogue(
        acc, rows, rm, pid_k, N, M, R, S, ts_ptr, lora_ptr, lu_ptr, bias_ptr, out_ptr,
        stride_ls, stride_lm, stride_un, stride_om, ATOMIC, HAS_LORA, HAS_BIAS, ROUND_BF16,
        FP32_PREC, S_BLOCK,
    )  # fmt: skip


_PAIR_BF16 = tl.constexpr(nibble_pair_ptx(0x4300))


@triton.jit
def _decode_pair(b):
    """uint8 bytes -> (low nibbles, high nibbles) as bf16 ``136 + code`` (bf16 128's bits
    ORed with ``code + 8``: ``nibble_pair_ptx``), in the MMA operand's register layout."""
    return tl.inline_asm_elementwise(
        _PAIR_BF16, "=r,=r,h", [b], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=2
    )


@triton.jit
def _nibbles_136(b, ASM: tl.constexpr):
    """(low, high) nibbles of the uint8 ``b`` as bf16 ``136 + code``: by the PTX on the
    GPU; under the interpreter (no inline assembly) by integer ops — the same values,
    exact in bf16."""
    if ASM:
        return _decode_pair(b)
    v = b.to(tl.int32)
    lo = (((v & 15) ^ 8) + 128).to(tl.float32)
    hi = ((((v >> 4) & 15) ^ 8) + 128).to(tl.float32)
    return lo.to(tl.bfloat16), hi.to(tl.bfloat16)


@triton.jit
def _step_loads(ptrs, offset, stride, GS: tl.constexpr):
    """``GS`` loads, ``ptrs + offset + g · stride`` for g < GS: one step's groups' scales
    or offset sums, as a tuple (grown by concatenation: triton's jit has no starred
    expressions)."""
    out = ()
    for g in tl.static_range(GS):
        out = out + (tl.load(ptrs + offset + g * stride),)  # noqa: RUF005
    return out


@triton.jit
def _w4a16_packed_kernel(
    xh_ptr,
    xs_ptr,
    q_ptr,
    sc_ptr,
    ts_ptr,
    lora_ptr,
    lu_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    KP,
    R,
    S,
    k_per_split,
    stride_qn,
    stride_sn,
    stride_ls,
    stride_lm,
    stride_un,
    stride_om,
    ATOMIC: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    FP32_PREC: tl.constexpr,
    ASM: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr,
    GROUPS_PER_STEP: tl.constexpr = 1,
):
    """int4 weights, up to 16 tokens, on the tensor cores with a packed decode: per group
    of 64 columns, ``Σ (136 + code) · (hi + lo)`` as four MMAs (low nibbles against x̂'s
    even columns, high against the odd, each against x̂'s bf16 hi and lo parts), minus
    ``136 · Σ (hi + lo)`` (``_store_packed``), times the group scale.

    A loop step takes ``GROUPS_PER_STEP`` consecutive groups (unrolled; KP and every K
    split are whole steps), so that more of the codes' loads — which triton's pipeliner
    issues (``cp.async``) steps ahead — are in flight. The group scales and offset sums
    are loaded one step ahead (register double buffering, as in the FMA kernel). Before
    ``gdc_wait`` only weights are read (no earlier kernel writes them): the first step's
    group scales; x̂'s planes and sums, the prep kernel's, after it. (An L2 prefetch of
    the first step's codes before the wait gained nothing on the H200: 0.2-0.8 µs slower,
    removed.) The groups are added in order: the result does not depend on
    ``GROUPS_PER_STEP``."""
    HK: tl.constexpr = 32  # bytes of a row per group
    GS: tl.constexpr = GROUPS_PER_STEP
    STEP: tl.constexpr = 64 * GROUPS_PER_STEP  # columns per step
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_c = tl.minimum(rows, N - 1)  # unmasked loads, as in the other kernels
    j = tl.arange(0, HK)
    t = tl.arange(0, 16)
    plane = (KP // 2) * 16
    q_rows = q_ptr + rows_c[:, None] * stride_qn + j[None, :]
    s_rows = sc_ptr + rows_c * stride_sn
    x_cols = xh_ptr + j[:, None] * 16 + t[None, :]
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, KP)
    # the first step's group scales (an empty range reads the last step's: never used)
    k_first = tl.minimum(k_start, KP - STEP)
    s_next = _step_loads(s_rows, k_first // 64, 1, GS)
    if PDL:  # only weights (no earlier kernel's output) are read before this; x̂ after
        gdc_wait()
    o_next = _step_loads(xs_ptr + t, (k_first // 64) * 16, 16, GS)
    for k0 in range(k_start, k_end, STEP):
        s = s_next
        o = o_next
        k_pre = tl.minimum(k0 + STEP, k_end - STEP)  # the next step (the last: itself)
        s_next = _step_loads(s_rows, k_pre // 64, 1, GS)
        o_next = _step_loads(xs_ptr + t, (k_pre // 64) * 16, 16, GS)
        for g in tl.static_range(GS):
            kg = k0 + 64 * g
            lo, hi = _nibbles_136(tl.load(q_rows + kg // 2), ASM)
            xo = (kg // 2) * 16
            part = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
            part = _mma(lo, tl.load(x_cols + xo), part, DOT_FP32)
            part = _mma(hi, tl.load(x_cols + plane + xo), part, DOT_FP32)
            part = _mma(lo, tl.load(x_cols + 2 * plane + xo), part, DOT_FP32)
            part = _mma(hi, tl.load(x_cols + 3 * plane + xo), part, DOT_FP32)
            acc += (part - o[g][None, :]) * s[g].to(tl.float32)[:, None]
    _epilogue(
        acc, rows, t, pid_k, N, M, R, S, ts_ptr, lora_ptr, lu_ptr, bias_ptr, out_ptr,
        stride_ls, stride_lm, stride_un, stride_om, ATOMIC, HAS_LORA, HAS_BIAS, ROUND_BF16,
        FP32_PREC, 1,
    )  # fmt: skip


@triton.jit
def _dp4a(a, b, c, B_SIGNED: tl.constexpr, INTERPRET: tl.constexpr):
    """``c`` plus the dot product of the four signed bytes of ``a`` with the four bytes
    of ``b`` (signed or unsigned), int32: PTX ``dp4a`` (integer ops under the
    interpreter, which has no inline assembly)."""
    if INTERPRET:
        for i in tl.static_range(4):
            ai = (a << (24 - 8 * i)) >> 24
            bi = ((b << (24 - 8 * i)) >> 24) if B_SIGNED else ((b >> (8 * i)) & 255)
            c += ai * bi
        return c
    return tl.inline_asm_elementwise(
        "dp4a.s32.s32 $0, $1, $2, $3;" if B_SIGNED else "dp4a.s32.u32 $0, $1, $2, $3;",
        "=r,r,r,r",
        [a, b, c],
        dtype=tl.int32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _dp4a_x(x_cols, xs_cols, kw, KPW: tl.constexpr):
    """One step's x̂ for the dp4a kernel: its four byte planes (high even, high odd, low
    even, low odd) and its group scales."""
    return (
        tl.load(x_cols + kw),
        tl.load(x_cols + kw + KPW),
        tl.load(x_cols + kw + 2 * KPW),
        tl.load(x_cols + kw + 3 * KPW),
        tl.load(xs_cols + kw // 8),
    )


@triton.jit
def _w4a16_dp4a_kernel(
    xq_ptr,
    xs_ptr,
    q_ptr,
    sc_ptr,
    ts_ptr,
    lora_ptr,
    lu_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    KPW: tl.constexpr,
    R,
    S,
    kw_per_split,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_ls,
    stride_lm,
    stride_un,
    stride_om,
    ATOMIC: tl.constexpr,
    HAS_LORA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    FP32_PREC: tl.constexpr,
    S_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PDL: tl.constexpr,
    INTERPRET: tl.constexpr,
    X_ROWS: tl.constexpr = False,
):
    """int4 weights against x̂ as 16-bit integers (``Int16X``) on the integer dot-product
    unit: a code word's high nibbles are ``word & 0xF0F0F0F0`` and its low ones
    ``(word << 4) & 0xF0F0F0F0`` — as signed bytes exactly 16 · code, no offset, no
    conversion — and each ``dp4a`` multiplies four of them by four bytes of x̂ and adds:
    three logic ops and four ``dp4a`` per 8 codes and token (x̂'s high and low bytes),
    against ~4.6 instructions per code on the FMA kernel. Per group of 64 columns the
    exact int32 sum ``Σ 16 · code · q`` (|·| < 2²⁹) becomes fp32 once and is scaled by
    the weight's and x̂'s group scales. The register layout is the FMA kernel's: [BLOCK_N,
    1, words] codes against [1, BLOCK_M, words] x̂ planes, nothing through shared memory."""
    GPS: tl.constexpr = BLOCK_K // 64  # groups per step
    BKW: tl.constexpr = BLOCK_K // 8  # words per step
    HI: tl.constexpr = -0x0F0F0F10  # 0xF0F0F0F0
    pid_k = tl.program_id(1)
    rows, rm, tok, word, kw_start, kw_end, q_rows, s_rows = _word_tiles(
        q_ptr, sc_ptr, M, N, KPW, kw_per_split, stride_qn, stride_sn, BLOCK_N, BLOCK_M, BKW, GPS
    )
    x_cols = xq_ptr + tok * stride_xm + word  # [1, BLOCK_M, BKW]
    xs_cols = xs_ptr + tok * (KPW // 8) + tl.arange(0, GPS)[None, None, :]
    if X_ROWS:  # per row too (``DP4A_X_ROWS_MAX_M``): [BLOCK_N, BLOCK_M, ...], the codes' layout
        x_cols += 0 * rows[:, None, None]
        xs_cols += 0 * rows[:, None, None]
    zero = tl.zeros([BLOCK_N, BLOCK_M, BKW], dtype=tl.int32)
    acc = tl.zeros([BLOCK_N, BLOCK_M, GPS], dtype=tl.float32)
    w_next = tl.load(q_rows + kw_start)
    s_next = tl.load(s_rows + kw_start // 8)  # [BLOCK_N, 1, GPS]
    if PDL:  # only weights (no earlier kernel's output) are read before this; x̂ after
        gdc_wait()
    for kw in range(kw_start, kw_end, BKW):
        k_pre = tl.minimum(kw + BKW, kw_end - BKW)  # the next step (the last: itself)
        w = w_next
        w_next = tl.load(q_rows + k_pre)
        sg = s_next.to(tl.float32)
        s_next = tl.load(s_rows + k_pre // 8)
        # x̂ of this step (loaded a step ahead too: 1-3% faster at 1-2 tokens, 10-17%
        # slower at 3-4, probe_gemv_dp4a-h200-2026-11-29-prefetch-x.json)
        xeh, xoh, xel, xol, sx = _dp4a_x(x_cols, xs_cols, kw, KPW)
        hi = w & HI  # odd columns
        lo = (w << 4) & HI  # even columns
        ph = _dp4a(lo, xeh, _dp4a(hi, xoh, zero, True, INTERPRET), True, INTERPRET)
        pl = _dp4a(lo, xel, _dp4a(hi, xol, zero, False, INTERPRET), False, INTERPRET)
        part = tl.sum(tl.reshape(ph * 256 + pl, [BLOCK_N, BLOCK_M, GPS, 8]), axis=3)
        acc += part.to(tl.float32) * (sg * sx)
    _epilogue(
        tl.sum(acc, axis=2), rows, rm, pid_k, N, M, R, S, ts_ptr, lora_ptr, lu_ptr,
        bias_ptr, out_ptr, stride_ls, stride_lm, stride_un, stride_om,
        ATOMIC, HAS_LORA, HAS_BIAS, ROUND_BF16, FP32_PREC, S_BLOCK,
    )  # fmt: skip


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
) -> torch.Tensor:
    """The layer with 16-bit activations on ``x`` [M, K], M ≤ ``MAX_GEMV_M``: [M, N].

    Same arguments as ``reference.w4a16_linear_ref``; the result is in ``x.dtype``.
    """
    m = x.shape[0]
    if m > MAX_GEMV_M:
        raise ValueError(f"the W4A16 GEMV takes at most {MAX_GEMV_M} rows, got {m}")
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    if m == 0 or n == 0:
        return x.new_empty(m, n)
    path = _path(m, fmt, gemv_gluon.available(x.device))
    if path == "gluon":
        qweight, wscales, wtensor_scale, lowrank_up = _operands(
            qweight, wscales, wtensor_scale, lowrank_up, fma=False
        )
        pdl = _pdl(x.device)
        xh, lora = prep(x, smooth, lowrank_down, kp, fmt, fma=False, pdl=pdl,
                        **gemv_gluon.prep_args(m, n, kp, x.device))  # fmt: skip
        return gemv(xh, lora, qweight, wscales, wtensor_scale, lowrank_up, bias, fmt, x.dtype,
                    pdl=pdl)  # fmt: skip
    fma, packed, i16 = path == "fma", path == "packed", path == "dp4a"
    # every copy the GEMV's operands need is made before the prep kernel, so that the
    # prep kernel is the GEMV's immediate predecessor (its programmatic dependency)
    qweight, wscales, wtensor_scale, lowrank_up = _operands(
        qweight, wscales, wtensor_scale, lowrank_up, fma or i16
    )
    pdl = _pdl(x.device)
    xh, lora = prep(x, smooth, lowrank_down, kp, fmt, fma=fma, pdl=pdl, packed=packed, i16=i16)
    return gemv(xh, lora, qweight, wscales, wtensor_scale, lowrank_up, bias, fmt, x.dtype, pdl=pdl)


def _path(m: int, fmt: str, gluon: bool = False) -> str:
    """The GEMV kernel for ``m`` tokens of ``fmt`` weights: int4 on "gluon"
    (``kernels/gemv_gluon.py``) from ``GLUON_MIN_M`` tokens where ``gluon`` (the GPU has
    it) and ``GLUON``; int4 on "dp4a"
    (``_w4a16_dp4a_kernel``) up to ``DP4A_MAX_M`` tokens; otherwise "fma" up to
    ``FMA_MAX_M`` tokens; above, "packed" (``_w4a16_packed_kernel``) for int4 when
    ``PACKED_MMA``, otherwise "mma" (``_w4a16_mma_kernel``; always for nvfp4)."""
    if fmt == "int4" and gluon and GLUON and m >= GLUON_MIN_M:
        return "gluon"
    if fmt == "int4" and m <= DP4A_MAX_M:
        return "dp4a"
    if m <= FMA_MAX_M:
        return "fma"
    return "packed" if PACKED_MMA and fmt == "int4" else "mma"


def _operands(qweight, wscales, wtensor_scale, lowrank_up, fma: bool):
    """The weights as the kernels read them: contiguous, the codes as 32-bit words for
    the FMA kernel (kp / 2 bytes a row: a multiple of 8), the tensor scale fp32 [1]."""
    qweight, wscales = qweight.contiguous(), wscales.contiguous()
    if fma and qweight.dtype != torch.int32:
        if qweight.storage_offset() % 4:
            qweight = qweight.clone()
        qweight = qweight.view(torch.int32)
    return qweight, wscales, wtensor_scale.float().reshape(1), lowrank_up.contiguous()


@dataclass
class Int16X:
    """x̂ for the dp4a kernel (``prep(..., i16=True)``): int32 ``planes`` [M, 4, kp/8]
    (x̂ as 16-bit integers per group of 64 columns, high and low bytes at even and odd
    columns, four to a word) and fp32 ``scales`` [M, kp/64] (each group's step, / 16)."""

    planes: torch.Tensor
    scales: torch.Tensor


@dataclass
class F16X:
    """x̂ for the Gluon kernel (``prep(..., f16=T)``): fp16 ``planes`` [kp/64, 2, 32, T] (per
    group and token a power of two ``1 / P`` times x̂ — the odd plane's then / 16 — in the
    MMA's order: ``_store_f16``) and fp32 ``scales`` [kp/64, 2, T] (P, then the decode's
    offset); ``out``: a zeroed fp32 [M, N] buffer for the GEMV's sums (``prep(..., n=N)``)
    or None. With ``prep(..., xhat=False)`` no planes nor scales (None): the GEMV computes
    them from ``x`` and ``smooth`` (fp32, contiguous) itself."""

    planes: torch.Tensor | None
    scales: torch.Tensor | None
    out: torch.Tensor | None = None
    x: torch.Tensor | None = None
    smooth: torch.Tensor | None = None


@dataclass
class PackedX:
    """x̂ for the packed tensor-core kernel (``prep(..., packed=True)``): bf16 ``planes``
    [4, kp/2, 16] (x̂'s hi part at even and odd columns, then its lo part; 16 token slots,
    zero past M) and ``sums`` fp32 [kp/64, 16] (``136 · Σ (hi + lo)`` per group)."""

    planes: torch.Tensor
    sums: torch.Tensor


def prep(
    x: torch.Tensor,
    smooth: torch.Tensor,
    lowrank_down: torch.Tensor,
    kp: int,
    fmt: str,
    fma: bool,
    pdl: bool = False,
    packed: bool = False,
    i16: bool = False,
    f16: int = 0,
    n: int = 0,
    xhat: bool = True,
) -> tuple[torch.Tensor | PackedX | Int16X | F16X, torch.Tensor]:
    """x̂ = x · (1/s) as [M, planes, kp/planes] fp32 (plane p: the columns ≡ p mod planes;
    8 for the FMA kernel — for int4 weights each plane scaled by the power of two its
    shift-free decode needs — 2, even and odd, for the tensor-core kernel) and the
    low-rank down projection's partial sums [chunks, M, r] (one per ``LORA_CHUNK`` —
    for ``f16``, ``F16_CHUNK`` — columns). ``gemv`` takes both; ``pdl``: the next kernel is
    launched as this one's programmatic dependent (``gemv(..., pdl=True)``); ``packed``: x̂
    as ``PackedX``, for the packed tensor-core kernel (int4, kp a multiple of 64); ``i16``:
    x̂ as ``Int16X``, for the dp4a kernel (int4); ``f16``: x̂ as ``F16X`` with that many
    token slots, for the Gluon kernel (int4, kp a multiple of 64), with ``n``: and its
    zeroed [M, n] fp32 sums; ``xhat`` false (with ``f16``): no x̂, only the low-rank sums
    (and the zeroing) — the Gluon kernel's ``XHAT_IN_KERNEL``."""
    planes = 8 if fma else 2
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    smooth = smooth.float().contiguous()
    lowrank_down = lowrank_down.contiguous()
    r = lowrank_down.shape[0]
    chunk = F16_CHUNK if f16 else LORA_CHUNK
    chunks = cdiv(kp, chunk)
    lora = torch.empty(chunks, m, max(r, 1), dtype=torch.float32, device=x.device)
    if packed:
        xh = torch.empty(4, kp // 2, 16, dtype=torch.bfloat16, device=x.device)
        sums = torch.empty(kp // 64, 16, dtype=torch.float32, device=x.device)
    elif f16 and not xhat:  # (never written: the GEMV computes x̂ itself)
        xh = sums = lora
    elif f16:
        xh = torch.empty(kp // 64, 2, 32, f16, dtype=torch.float16, device=x.device)
        sums = torch.empty(kp // 64, 2, f16, dtype=torch.float32, device=x.device)
    elif i16:
        xh = torch.empty(m, 4, kp // 8, dtype=torch.int32, device=x.device)
        sums = torch.empty(m, kp // 64, dtype=torch.float32, device=x.device)
    else:
        xh = torch.empty(m, planes, kp // planes, dtype=torch.float32, device=x.device)
        sums = lora  # never written
    zero = None
    if f16 and n:
        zero = torch.empty(m, n, dtype=torch.float32, device=x.device)
    launch(_prep_kernel, (chunks,),
        x, smooth, lowrank_down, xh, lora, sums, m, k, kp, r,
        x.stride(0), lowrank_down.stride(0), xh.stride(0), lora.stride(0), lora.stride(1),
        CHUNK=chunk, PLANES=planes, PRESCALE=fma and fmt == "int4", PDL=pdl,
        PACKED=packed, INTERPRET=interpreting(), I16=i16, LD_FIRST=PREP_LD_FIRST, F16=f16,
        zero_ptr=zero, zero_numel=zero.numel() if zero is not None else 0,
        ZERO=zero is not None, XHAT=xhat or not f16, DOT_PREC=dot_precision(), num_warps=4,
    )  # fmt: skip
    if f16 and not xhat:
        return F16X(None, None, zero, x, smooth), lora[..., :r]
    if f16:
        return F16X(xh, sums, zero), lora[..., :r]
    if packed:
        return PackedX(xh, sums), lora[..., :r]
    return (Int16X(xh, sums) if i16 else xh), lora[..., :r]


def gemv(
    xh: torch.Tensor | PackedX | Int16X | F16X,
    lora: torch.Tensor,
    qweight: torch.Tensor,
    wscales: torch.Tensor,
    wtensor_scale: torch.Tensor,
    lowrank_up: torch.Tensor,
    bias: torch.Tensor | None,
    fmt: str,
    out_dtype: torch.dtype,
    pdl: bool = False,
) -> torch.Tensor:
    """The GEMV proper on ``prep``'s outputs: [M, N] in ``out_dtype``. ``pdl``: launched
    as the previous kernel's programmatic dependent — only when that kernel is the prep
    (or a fill after it) and wrote none of the weights (``w4a16_linear`` arranges both)."""
    f = formats.get_format(fmt)
    if isinstance(xh, F16X):  # (the weights already as ``_operands`` gives them)
        return gemv_gluon.gemv_gluon(xh, lora, qweight, wscales, wtensor_scale, lowrank_up,
                                     bias, out_dtype, pdl)  # fmt: skip
    if isinstance(xh, PackedX):
        return _gemv_packed(xh, lora, qweight, wscales, wtensor_scale, lowrank_up, bias,
                            out_dtype, pdl)  # fmt: skip
    if isinstance(xh, Int16X):
        return _gemv_dp4a(xh, lora, qweight, wscales, wtensor_scale, lowrank_up, bias,
                          out_dtype, pdl)  # fmt: skip
    m, kp = xh.shape[0], xh.shape[1] * xh.shape[2]
    r, chunks = lora.shape[2], lora.shape[0]
    fma = xh.shape[1] == 8
    qweight, wscales, wtensor_scale, lowrank_up = _operands(
        qweight, wscales, wtensor_scale, lowrank_up, fma
    )
    n = qweight.shape[0]
    if fma:
        block_n, block_k, warps = TILES["fma" if m == 1 else "fma_multi"]
        block_k = _word_step(kp, block_k, f.group_size)
    else:  # one int4 group a step; nvfp4 steps of ≥ 32 columns (the MMA's K ≥ 16 bytes)
        block_n, block_k, warps = TILES["mma"]
        block_k = f.group_size if f.name == "int4" else max(32, block_k)
    n_blocks = cdiv(n, block_n)
    split, kps, out = _split_k(m, n, kp, block_k, n_blocks, out_dtype, qweight.device)
    kdim, kstep = (kp // 8, kps // 8) if fma else (kp, kps)  # the FMA kernel counts words
    common = (
        xh, qweight, wscales, wtensor_scale, lora, lowrank_up,
        bias if bias is not None else out, out, m, n, kdim, r, chunks, kstep,
        xh.stride(0), qweight.stride(0), wscales.stride(0), lora.stride(0), lora.stride(1),
        lowrank_up.stride(0) if r else 0, out.stride(0),
    )  # fmt: skip
    flags = dict(
        NVFP4=f.name == "nvfp4",
        GROUP=f.group_size,
        # the tensor-core kernel's 16 tokens make the summed tensor too big (v9: 55 -> 70
        # us at M = 4)
        S_BLOCK=_s_block(m, chunks) if fma else 1,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        **_shared_flags(split, r, bias, out_dtype, pdl),
    )
    if fma:
        launch(
            _w4a16_fma_kernel, (n_blocks, split), *common, MAGIC_2P23, BLOCK_M=next_pow2(m), **flags
        )
    else:
        launch(_w4a16_mma_kernel, (n_blocks, split), *common, DOT_FP32=interpreting(), **flags)
    return out if split == 1 else out.to(out_dtype)


def _word_step(kp: int, block_k: int, group: int) -> int:
    """The columns per step of the kernels that read the codes as words (FMA, dp4a): the
    widest power of two, at least one group and at most ``block_k`` (unless that is less
    than a group), that divides KP — no partial steps."""
    block_k = max(block_k, group)
    while kp % block_k:
        block_k //= 2
    return block_k


def _s_block(m: int, chunks: int) -> int:
    """How many low-rank partial sums the word kernels' epilogue loads at once: up to 16
    at one token, fewer with more tokens (the loaded tensor is [S_BLOCK, tokens, 32])."""
    return min(16 // next_pow2(m), next_pow2(chunks))


def _shared_flags(split: int, r: int, bias, out_dtype, pdl: bool) -> dict:
    """The constexprs and launch options every GEMV kernel takes alike: atomics for a K
    split, the epilogue's low-rank branch, bias and rounding, and the PDL launch."""
    return dict(
        ATOMIC=split > 1,
        HAS_LORA=r > 0,
        HAS_BIAS=bias is not None,
        ROUND_BF16=needs_bf16_rounding(out_dtype),
        FP32_PREC=dot_precision(),
        PDL=pdl,
        **({"launch_pdl": True} if pdl else {}),
    )


def _split_k(m, n, kp, block_k, n_blocks, out_dtype, device):
    """(K splits, columns per split, output buffer): K is split only as far as needed to
    give the GPU enough programs; split partial sums meet in a zeroed fp32 buffer."""
    steps = cdiv(kp, block_k)
    split = max(1, min(steps, PROGRAMS_PER_SM * num_sms(device, cpu=4) // n_blocks))
    kps = cdiv(steps, split) * block_k
    split = cdiv(kp, kps)
    return split, kps, split_output(m, n, split, out_dtype, device)


def _gemv_packed(
    xh: PackedX, lora, qweight, wscales, wtensor_scale, lowrank_up, bias, out_dtype, pdl
) -> torch.Tensor:
    """``gemv`` on the packed tensor-core kernel (int4), tiled by ``TILES["packed"]``."""
    qweight, wscales, wtensor_scale, lowrank_up = _operands(
        qweight, wscales, wtensor_scale, lowrank_up, fma=False
    )
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    chunks, m, r = lora.shape
    block_n, gps, warps = TILES["packed"]
    gps = _groups_per_step(kp, gps)
    n_blocks = cdiv(n, block_n)
    split, kps, out = _split_k(m, n, kp, 64 * gps, n_blocks, out_dtype, qweight.device)
    launch(_w4a16_packed_kernel, (n_blocks, split),
        xh.planes, xh.sums, qweight, wscales, wtensor_scale, lora, lowrank_up,
        bias if bias is not None else out, out, m, n, kp, r, chunks, kps,
        qweight.stride(0), wscales.stride(0), lora.stride(0), lora.stride(1),
        lowrank_up.stride(0) if r else 0, out.stride(0),
        ASM=not interpreting(), DOT_FP32=interpreting(), BLOCK_N=block_n,
        GROUPS_PER_STEP=gps, num_warps=warps, **_shared_flags(split, r, bias, out_dtype, pdl),
    )  # fmt: skip
    return out if split == 1 else out.to(out_dtype)


def _gemv_dp4a(
    xh: Int16X, lora, qweight, wscales, wtensor_scale, lowrank_up, bias, out_dtype, pdl
) -> torch.Tensor:
    """``gemv`` on the dp4a kernel (int4), tiled by ``TILES["dp4a"]`` at one token and
    ``TILES["dp4a_multi"]`` at more."""
    qweight, wscales, wtensor_scale, lowrank_up = _operands(
        qweight, wscales, wtensor_scale, lowrank_up, fma=True
    )
    n, kp = qweight.shape[0], qweight.shape[1] * 8
    chunks, m, r = lora.shape
    block_n, block_k, warps = TILES["dp4a" if m == 1 else "dp4a_multi"]
    block_k = _word_step(kp, block_k, 64)
    n_blocks = cdiv(n, block_n)
    split, kps, out = _split_k(m, n, kp, block_k, n_blocks, out_dtype, qweight.device)
    launch(_w4a16_dp4a_kernel, (n_blocks, split),
        xh.planes, xh.scales, qweight, wscales, wtensor_scale, lora, lowrank_up,
        bias if bias is not None else out, out, m, n, kp // 8, r, chunks, kps // 8,
        xh.planes.stride(0), qweight.stride(0), wscales.stride(0), lora.stride(0),
        lora.stride(1), lowrank_up.stride(0) if r else 0, out.stride(0),
        S_BLOCK=_s_block(m, chunks),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=next_pow2(m),
        INTERPRET=interpreting(), X_ROWS=m <= DP4A_X_ROWS_MAX_M, num_warps=warps,
        **_shared_flags(split, r, bias, out_dtype, pdl),
    )  # fmt: skip
    return out if split == 1 else out.to(out_dtype)


def _groups_per_step(kp: int, gps: int) -> int:
    """The most groups per step, at most ``gps``, that KP is a whole number of steps of
    (every K split is then whole steps too)."""
    groups = kp // 64
    return max(g for g in range(1, max(gps, 1) + 1) if groups % g == 0)
