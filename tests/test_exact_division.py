"""The division-free sequences of ``kernels/_triton_common.py`` round exactly as IEEE
division does: ``div7_rn`` for every fp32 mantissa, ``recip16_rn`` for every fp16 value
and every start the fast reciprocal may give (within 2 ulp). The kernels rely on this to
produce the same int4 codes and group scales as the reference bit for bit; the GPU runs
the sequences, the interpreter divides, so only this exhaustive check ties them together.

A power of two scales input and result alike, so one binade ([1, 2)) covers every normal
input whose result stays normal (group maxima and fp16 scales do).
"""

from fractions import Fraction

import numpy as np

# RN32(1/7), as the kernels spell it
C7 = np.float32(0.142857149243354797363281250)


def test_one_seventh_constant_is_the_nearest_float() -> None:
    assert np.float32(1.0) / np.float32(7.0) == C7


def test_div7_is_correctly_rounded_for_every_mantissa() -> None:
    """``q0 = a·C7; r = fma(-q0, 7, a); fma(r, C7, q0)`` equals ``RN(a/7)``.

    Both FMAs are emulated in float64, where their exact results fit: ``a - 7·q0`` spans
    at most 27 significant bits and ``r·C7 + q0`` at most 48 for ``a`` in [1, 2).
    """
    a = (np.arange(2**23, dtype=np.int64) | (127 << 23)).astype(np.uint32).view(np.float32)
    q0 = a * C7  # fp32 multiply, rounded once
    r = (a.astype(np.float64) - 7.0 * q0.astype(np.float64)).astype(np.float32)
    got = (r.astype(np.float64) * np.float64(C7) + q0.astype(np.float64)).astype(np.float32)
    want = a / np.float32(7.0)  # numpy's fp32 division is IEEE, correctly rounded
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} mantissas wrong, first a={a[bad[0]]!r}"
    # the correction is needed: the plain product alone is off for many inputs
    assert np.count_nonzero(q0 != want) > 0


def _round_fp32(x: Fraction) -> Fraction:
    """``x`` > 0 (a normal fp32 magnitude) rounded to the nearest fp32, ties to even."""
    e = x.numerator.bit_length() - x.denominator.bit_length()
    if Fraction(2) ** e > x:
        e -= 1
    ulp = Fraction(2) ** (e - 23)
    q, rem = divmod(x, ulp)
    if rem * 2 > ulp or (rem * 2 == ulp and q % 2):
        q += 1
    return q * ulp


def _fp32_neighbour(x: Fraction, steps: int) -> Fraction:
    """The fp32 ``steps`` ulps away from the fp32 ``x`` (> 0)."""
    bits = int(np.array([float(x)], dtype=np.float32).view(np.uint32)[0]) + steps
    return Fraction(float(np.array([bits], dtype=np.uint32).view(np.float32)[0]))


def test_recip16_is_correctly_rounded_for_every_fp16_mantissa() -> None:
    """``c0 ≈ 1/y`` (any fp32 within 2 ulp); ``e = fma(-y, c0, 1)``; ``fma(c0, e, c0)``
    equals ``RN(1/y)`` for every fp16 significand ``y`` in [1, 2)."""
    for m in range(1024):
        y = Fraction(1024 + m, 1024)
        want = _round_fp32(1 / y)
        for k in range(-2, 3):
            c0 = _fp32_neighbour(want, k)
            e = 1 - y * c0
            e = _round_fp32(abs(e)) * (1 if e > 0 else -1) if e else Fraction(0)
            got = _round_fp32(c0 * e + c0)
            assert got == want, f"y={float(y)!r} start {k:+d} ulp: {float(got)!r}"
