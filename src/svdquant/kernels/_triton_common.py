"""Small ``@triton.jit`` helpers shared by the engine's kernels.

The rounding helpers do their work in fp32 with exact operations only, so a kernel gives
bit-identical results on the GPU and in the CPU interpreter (``TRITON_INTERPRET=1``), whose
own fp32 -> fp8 conversion rounds wrongly (seen in triton 3.9: 127.99 -> 64, ties away
from even). The fp8 cast that follows them converts an exactly representable value.
"""

from __future__ import annotations

import functools
import itertools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

#: The largest finite fp8 E4M3 value.
E4M3_MAX: float = 448.0


@functools.cache
def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (read once, as triton reads it
    when the kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launchers: ``triton.cdiv`` is a constexpr function whose
    host-side call costs microseconds (a layer call makes ~15 such calls)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ≥ ``n`` (0 for 0): ``triton.next_power_of_2`` on the host,
    without its constexpr-function wrapper."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def block_rank(r: int) -> int:
    """The width a kernel's low-rank operands take for rank ``r``: its power of two, at
    least 16 (one 16-bit MMA's K; 0 pads to 16, the branch masked out)."""
    return max(16, next_pow2(max(r, 1)))


def inner_bounds(sizes: list[int]) -> list[int]:
    """The columns where segments of widths ``sizes`` meet (a split output's bounds)."""
    return list(itertools.accumulate(sizes))[:-1]


def three_bounds(bounds, n: int) -> tuple[int, int, int]:
    """A split output's inner ``bounds`` (up to 3) as the GEMMs' three bound arguments,
    the unused ones at ``n``."""
    b = list(bounds or ())
    return tuple(b + [n] * (3 - len(b)))  # type: ignore[return-value]


def part_args(parts: list[int] | None) -> tuple[int, ...]:
    """A split GEMM's per-segment low-rank columns ``parts`` = ``[P, w_0, w_1, ...]`` (see
    ``gemm.fp8_gemm_split``) as the kernels' nine arguments: P, the four segments' block
    offsets past P (their widths' running sums), the four widths (zeros where unused)."""
    if parts is None:
        return (0,) * 9
    widths = list(parts[1:]) + [0] * (5 - len(parts))
    offsets = [0, *itertools.accumulate(widths[:3])]
    return (parts[0], *offsets, *widths)


@functools.cache
def device_properties(index: int):
    """``torch.cuda.get_device_properties(index)``, asked once: the launchers ask per
    call, and the query costs microseconds of host time."""
    import torch

    return torch.cuda.get_device_properties(index)


def _index(device) -> int:
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device, cpu: int = 1) -> int:
    """Multiprocessors of ``device`` (the launchers size their K splits by it); ``cpu``
    under the interpreter, where a value above 1 exercises the split in CI."""
    if device.type != "cuda":
        return cpu
    return device_properties(_index(device)).multi_processor_count


def capability_major(device) -> int:
    """The major compute capability of ``device`` (0 for a non-CUDA device)."""
    return device_properties(_index(device)).major if device.type == "cuda" else 0


def hopper_or_later(device) -> bool:
    """Whether ``device`` is a CUDA GPU of compute capability 9 or more (sm_90: tensor
    descriptors, programmatic dependent launches)."""
    return capability_major(device) >= 9


def pdl_supported(device) -> bool:
    """Whether kernels on ``device`` can be launched as programmatic dependents (sm_90+;
    never under the interpreter, which runs no inline assembly)."""
    return not interpreting() and hopper_or_later(device)


def dot_precision() -> str:
    """``input_precision`` for the fp32 ``tl.dot`` of the low-rank branch.

    ``tf32x3`` (three tf32 products, about fp32 accuracy) on the GPU; the interpreter
    computes in fp32 whatever it is told.
    """
    return "ieee" if interpreting() else "tf32x3"


def split_output(m: int, n: int, split: int, out_dtype, device):
    """A GEMV's [m, n] output: with a K split a zeroed fp32 buffer its programs add into
    (cast to ``out_dtype`` after), else the output itself."""
    if split > 1:
        return torch.zeros(m, n, dtype=torch.float32, device=device)
    return torch.empty(m, n, dtype=out_dtype, device=device)


@triton.jit
def _cast_kernel(src_ptr, dst_ptr, numel, BLOCK: tl.constexpr, PDL: tl.constexpr,
                 ROUND_BF16: tl.constexpr):  # fmt: skip
    """``dst = src`` converted to ``dst``'s dtype; with ``PDL`` after the previous kernel
    (this one launched as its programmatic dependent)."""
    if PDL:
        gdc_wait()
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src_ptr + i, mask=i < numel)
    if ROUND_BF16:
        v = round_bf16(v)
    tl.store(dst_ptr + i, v.to(dst_ptr.dtype.element_ty), mask=i < numel)


def cast_after(src: torch.Tensor, dtype: torch.dtype, pdl: bool) -> torch.Tensor:
    """``src.to(dtype)`` for a contiguous ``src``; with ``pdl``, launched as the previous
    kernel's programmatic dependent (which must allow it: ``gdc_launch_dependents``), so
    that its launch hides behind that kernel's last programs."""
    from svdquant.kernels.launch import launch  # (it imports this module)

    dst = torch.empty(src.shape, dtype=dtype, device=src.device)
    n = src.numel()
    block = 1024
    launch(_cast_kernel, (cdiv(n, block),),
        src, dst, n, BLOCK=block, PDL=pdl, ROUND_BF16=needs_bf16_rounding(dtype), num_warps=4,
        **({"launch_pdl": True} if pdl else {}),
    )  # fmt: skip
    return dst


def nibble_pair_ptx(half: int) -> str:
    """PTX for ``inline_asm_elementwise(..., "=r,=r,h", pack=2)``: two uint8 codes bytes ->
    their low and their high nibbles as two pairs of 16-bit floats ``half + nibble``,
    exact: ``xor`` 0x88 makes each nibble ``code + 8``, ``prmt`` moves the second byte to
    bit 16, ``lop3`` keeps one nibble per 16-bit half and ORs in ``half``'s bits (a value
    whose ulp is 1: bf16 128 = 0x4300, fp16 1024 = 0x6400). Six instructions per four
    codes, in the register layout of the bytes (two K-adjacent bytes per thread)."""
    bits = f"0x{half:04X}{half:04X}"
    return f"""{{
        .reg .b32 t, a, c;
        .reg .b16 h;
        xor.b16 h, $2, 0x8888;
        cvt.u32.u16 t, h;
        prmt.b32 a, t, 0, 0x4140;
        shr.b32 c, a, 4;
        lop3.b32 $0, a, 0x000F000F, {bits}, 0xea;
        lop3.b32 $1, c, 0x000F000F, {bits}, 0xea;
        }}"""


def nibble_quad_ptx() -> str:
    """PTX for ``inline_asm_elementwise(..., "=r,=r,=r,=r,r", pack=4)``: four uint8 code bytes
    (one word) -> their low nibbles as four fp16 ``1032 + code`` and their high nibbles as
    four fp16 ``1152 + 16 · code`` (``1024 + 16 · (code + 8)``), exact: two ``prmt`` spread
    bytes 0, 1 and 2, 3 to the 16-bit halves of two words, then per word and nibble one
    ``lop3`` keeps the nibble and XORs in fp16 1024's bits with the nibble's sign bit
    (making it ``code + 8``). Six instructions per eight codes (``nibble_pair_ptx``:
    twelve, and each 16-bit input cut out of a word)."""
    return """{
        .reg .b32 a, b;
        prmt.b32 a, $4, 0, 0x4140;
        prmt.b32 b, $4, 0, 0x4342;
        lop3.b32 $0, a, 0x000F000F, 0x64086408, 0x6a;
        lop3.b32 $1, b, 0x000F000F, 0x64086408, 0x6a;
        lop3.b32 $2, a, 0x00F000F0, 0x64806480, 0x6a;
        lop3.b32 $3, b, 0x00F000F0, 0x64806480, 0x6a;
        }"""


@triton.jit
def rint_even(x):
    """Round fp32 ``x`` to the nearest integer, ties to even (``torch.round``).

    Exact for |x| < 2**22: ``x - floor(x)`` and the parity test are exact there.
    """
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def round_e4m3(x):
    """The fp8 E4M3 value nearest fp32 ``x`` (ties to even), saturated to ±448, as fp32.

    Equal to ``x.clamp(-448, 448).to(torch.float8_e4m3fn).float()``: the value is rounded
    to 3 mantissa bits at its own exponent (at least -6, below which E4M3 is subnormal
    with a fixed step of 2**-9).
    """
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
    r = rint_even(x * inv_ulp) * ulp
    return tl.where(x < 0.0, -tl.abs(r), r)  # keep the sign of values that round to 0


#: RN32(1/7), the fp32 nearest 1/7 (exactly this decimal).
ONE_SEVENTH = tl.constexpr(0.142857149243354797363281250)


@triton.jit
def div7_rn(a, EXACT: tl.constexpr):
    """``a / 7`` correctly rounded (as IEEE ``div.rn``), in one multiply and two FMAs.

    ``q0 = a · RN(1/7)``, then the exact remainder ``r = a - 7 · q0`` (one FMA) corrects
    it: ``q0 + r · RN(1/7)`` rounds to ``RN(a / 7)`` for every fp32 ``a`` (checked
    exhaustively over all 2²³ mantissas by ``tests/test_exact_division.py``). A
    ``div.rn`` compiles to a call into a slow path whose register saves made the fused
    epilogues spill. ``EXACT`` (the interpreter, whose FMA may round twice) divides.
    """
    if EXACT:
        return tl.math.div_rn(a, 7.0)
    q0 = a * ONE_SEVENTH
    return tl.fma(tl.fma(-q0, 7.0, a), ONE_SEVENTH, q0)


@triton.jit
def recip16_rn(y, EXACT: tl.constexpr):
    """``1 / y`` correctly rounded, for ``y`` > 0 holding an fp16 value (≤ 11 significant
    bits), with no division: the fast reciprocal (≤ 2 ulp off) and one Newton step
    through FMAs (exact for every fp16 value and every start within 2 ulp:
    ``tests/test_exact_division.py``). ``EXACT``: the interpreter divides."""
    if EXACT:
        return tl.math.div_rn(1.0, y)
    c0 = 1.0 / y
    return tl.fma(c0, tl.fma(-y, c0, 1.0), c0)


@triton.jit
def fast_rcp(x):
    """``1 / x`` by ``rcp.approx.ftz.f32`` (fp32; one MUFU.RCP, a denormal result flushed
    to zero). Inline PTX: not in triton's interpreter (``act_code`` keeps it out)."""
    return tl.inline_asm_elementwise(
        "rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def apply_activation(y, ACT: tl.constexpr):
    """``ACT`` 0: ``y``; 1: GELU, tanh approximation; 2: SiLU; 3: GELU (erf, SDXL's
    GEGLU); 4: 1 with the fast reciprocal (``FAST_RCP``) — on fp32 ``y``.

    GELU as ``y · (1 + tanh(u)) / 2 = y - y / (exp(2u) + 1)`` with
    ``u = √(2/π) · (y + 0.044715 y³)`` and ``exp(2u) = 2^(y · (A + B y²))``: six operations,
    no division slow path (within a few fp32 ulps of torch's ``gelu(approximate="tanh")``).
    """
    if ACT == 1 or ACT == 4:
        e = tl.exp2(y * (2.302208198144325 + 0.1029432395800235 * y * y))
        if ACT == 4:  # noqa: SIM108 (a constexpr branch: one side is compiled)
            y = y - y * fast_rcp(e + 1.0)
        else:
            y = y - y / (e + 1.0)
    elif ACT == 2:
        y = y / (1.0 + tl.exp(-y))
    elif ACT == 3:
        y = y * _normal_cdf(y)
    return y


@triton.jit
def _normal_cdf(y):
    """Φ(y) = (1 + erf(y / √2)) / 2 in fp32 from erfc(|y| / √2) ≈ p(t) · exp(-y² / 2),
    t = 1 / (1 + 0.3275911 |y| / √2) (Abramowitz & Stegun 7.1.26: |error| ≤ 1.5e-7):
    fewer operations than libdevice's ``erf`` (the gated quantize's loop: 4,918 SASS
    instructions against 6,021 with it, 3,065 with GELU-tanh; sm_90, triton 3.6)."""
    z = tl.abs(y) * 0.7071067811865476
    t = 1.0 / (1.0 + 0.3275911 * z)
    p = 1.061405429 * t - 1.453152027
    p = ((p * t + 1.421413741) * t - 0.284496736) * t + 0.254829592
    p = p * t
    half_erfc = 0.5 * p * tl.exp(-z * z)
    return tl.where(y >= 0, 1.0 - half_erfc, half_erfc)


#: activation name -> the ``ACT`` code of ``apply_activation``
ACTIVATIONS = {"none": 0, "gelu_tanh": 1, "silu": 2, "gelu": 3}

#: GELU-tanh's ``1 / (exp(2u) + 1)`` as the bare fast reciprocal (``fast_rcp``, ACT code 4)
#: instead of ``/``'s full-range division, which wraps the same MUFU.RCP in a range check
#: (FSETP, two FMULs by 1/4, FSEL). The same fp32 results: in range both are
#: ``fma(y, -rcp(d), y)``; past 2^126 (d = exp(2u) + 1, so y > ~10) both give y. Three
#: fewer instructions an element on sm_90 (triton 3.6, ``bench/sass_report.py``: the fused
#: MLP's fc1 epilogue 5,096 → 4,704 SASS instructions, the gated quantize with GELU-tanh
#: 3,432 → 3,048, gemm_ws's next-layer epilogue 5,240 → 4,864). v47, H200: the same bytes
#: in all four kernels (``-k fast_rcp``); ``bench/probe_ws_next.py --fast-rcp`` at
#: M = 4096 / 4608: gemm_ws's next-layer epilogue 339.6 → 333.0 / 393.9 → 387.0 µs (FLUX's
#: fc1), 97.5 → 94.5 / 98.3 → 95.2 (PixArt-Σ's), the Triton epilogue's 0.2–1.5% faster.
FAST_RCP = True


def check_activation(name: str) -> None:
    """Refuse an activation the kernels do not compute (before anything is launched)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; supported: {sorted(ACTIVATIONS)}")


def act_code(name: str) -> int:
    """The kernels' ``ACT`` constant for activation ``name`` (a key of ``ACTIVATIONS``):
    GELU-tanh's fast-reciprocal form where ``FAST_RCP`` is on and kernels run compiled
    (read at each launch, so an A/B in one process compiles both)."""
    check_activation(name)
    code = ACTIVATIONS[name]
    return 4 if code == 1 and FAST_RCP and not interpreting() else code


@triton.jit
def to_e4m3(x, EXACT: tl.constexpr):
    """fp32 ``x`` -> fp8 E4M3 (nearest, ties to even, saturating at ±448).

    On the GPU the hardware conversion (one ``cvt`` for two values) does it; ``EXACT``
    (under the interpreter, whose own conversion rounds wrongly) rounds with
    ``round_e4m3`` first so the cast that follows is exact.
    """
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if EXACT:  # the interpreter also converts NaN wrongly: write E4M3's NaN (0x7F) itself
        q = round_e4m3(x).to(tl.float8e4nv)
        nan8 = tl.full(x.shape, 0x7F, tl.int8).to(tl.float8e4nv, bitcast=True)
        return tl.where(x == x, q, nan8)
    return x.to(tl.float8e4nv)


@triton.jit
def fp8_to_f32(x):
    """fp8 E4M3 ``x`` as fp32 with NaN (0x7F/0xFF) kept NaN: under the interpreter, whose
    own conversion turns E4M3's NaN into a finite value."""
    f = x.to(tl.float32)
    nan = (x.to(tl.int8, bitcast=True) & 0x7F) == 0x7F
    return tl.where(nan, float("nan"), f)


@triton.jit
def int4_value(nib):
    """The signed int4 code of nibble ``nib`` (int32 0..15) as fp32, in two bit operations
    and one subtraction: ``nib ^ 8`` is the code + 8, placed in the mantissa of 2**23
    (no int -> float conversion, which runs at a quarter of the FMA rate)."""
    return ((nib ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def e2m1_value(nib):
    """The value of an FP4 E2M1 code (int32 nibble 0..15: bit 3 sign, bits 0-2 index)."""
    idx = nib & 7
    e = idx >> 1
    m = (idx & 1).to(tl.float32)
    pow2 = (1 << tl.maximum(e - 1, 0)).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, pow2 * (1.0 + 0.5 * m))
    return tl.where((nib & 8) != 0, -mag, mag)


@triton.jit
def round_bf16(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), still as fp32.

    triton 3.9's interpreter converts fp32 -> bf16 by truncation; kernels call this first
    under the interpreter so that the cast that follows is exact.
    """
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


def needs_bf16_rounding(dtype) -> bool:
    """Whether a kernel writing ``dtype`` must call ``round_bf16`` (interpreter only)."""
    import torch

    return interpreting() and dtype == torch.bfloat16


@triton.jit
def dot16(a, b, acc, INTERPRET: tl.constexpr):
    """``acc + a16 · b`` with ``a`` (fp32) rounded to ``b``'s 16-bit dtype, fp32 sums.

    Under the interpreter (``INTERPRET``), whose bf16 ``tl.dot`` is wrong and whose fp32 ->
    bf16 cast truncates, the same 16-bit values are rounded here and multiplied in fp32,
    where products of 16-bit numbers are exact.
    """
    if INTERPRET:
        a16 = round_bf16(a) if b.dtype == tl.bfloat16 else a.to(b.dtype).to(tl.float32)
        out = tl.dot(a16, b.to(tl.float32), acc)
    elif b.dtype == tl.float32:  # an fp32 model's branch: tf32 alone is ~1e-3 off
        out = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        out = tl.dot(a.to(b.dtype), b, acc)
    return out


@triton.jit
def folded_lowrank_dot(x, ld_t, inv_s, acc, INTERPRET: tl.constexpr, FOLDED: tl.constexpr = False):
    """``acc + x · (diag(1/s) · L_downᵀ)``: the low-rank down projection of x̂ = x · (1/s)
    with the smoothing folded into L_down's chunk ``ld_t`` [BLOCK_K, BLOCK_R] (16-bit),
    rounded to its dtype, and ``x`` rounded to it too (exact when x is 16-bit already).
    ``FOLDED``: ``ld_t`` is that folded chunk already (``fold_lowrank_down``'s, the same
    bits) and ``inv_s`` is not read.

    Folding keeps ``x`` a plain 16-bit tensor as the MMA's left operand (the big one),
    instead of a computed x̂ that must be rounded and moved into the MMA layout.
    """
    if FOLDED:
        b16 = ld_t
    else:
        b = ld_t.to(tl.float32) * inv_s[:, None]
        if INTERPRET and ld_t.dtype == tl.bfloat16:
            b = round_bf16(b)
        b16 = b.to(ld_t.dtype)
    # (one return: triton 3.6 compiles the statements after a static branch's return too)
    if INTERPRET or x.dtype != ld_t.dtype or x.dtype == tl.float32:
        out = dot16(x.to(tl.float32), b16, acc, INTERPRET)
    else:
        out = tl.dot(x, b16, acc)
    return out
