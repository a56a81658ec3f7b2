"""Multiply-add-shift hashing (Dietzfelbinger, STACS 1996), the default privacy-amplification family.

For an n-bit input X, an m-bit output and u = n + m - 1:

    h_{a,b}(X) = ((a X + b) mod 2^u) >> (u - m),    a, b uniform in [0, 2^u).

The family is *strongly* universal: for inputs X != X' and any outputs (q, r), exactly
2^(2u - 2m) of the 2^(2u) seeds give h(X) = q and h(X') = r (so collisions have probability
exactly 2^-m). The argument, in short (written out in docs/POSTPROCESSING.md; Thorup, "High speed
hashing for integers and strings", 2015, section 3.3 gives the same proof): write X - X' = z 2^s
with z odd and s <= n - 1. Multiplication by an odd z permutes the integers mod 2^u, so
D = a (X - X') mod 2^u has bits s..u-1 uniform and bits below s zero; u - m >= n - 1 >= s puts
the m output bits of D among the uniform ones, independent of D's lower bits. With
A = a X' + b mod 2^u, uniform through b and independent of a, h(X') is the top of A and h(X) is
top(A) + top(D) + carry mod 2^m, the carry being fixed by the low bits of A and D; top(D) is
uniform and independent of all of that, so (h(X'), h(X)) is uniform on [2^m]^2.

One hash is one GMP product of a u-bit by an n-bit integer (gmpy2), plus linear-time packing:
16-40x faster than the FFT Toeplitz product on this machine (benchmarks/README.md). The seed is
2u bits: a then b, each most significant bit first (conventions in :mod:`.pa_bits`).
"""

from __future__ import annotations

import gmpy2
from gmpy2 import mpz

from qkd_adapters.sim.postproc._types import U8Array
from qkd_adapters.sim.postproc.pa_bits import (
    PrivacyAmplificationError,
    bits_to_mpz,
    check_seed,
    mpz_to_bits,
)

FAMILY = "multiply-add-shift"


def word_bits(n: int, m: int) -> int:
    """u = n + m - 1, the smallest word length for which the family is strongly universal."""
    return n + m - 1


def seed_bits(n: int, m: int) -> int:
    """The seed length: a and b, u bits each."""
    return 2 * word_bits(n, m)


def mas_int(a: int | mpz, b: int | mpz, u: int, x: int | mpz, m: int) -> mpz:
    """h_{a,b}(x) on integers; the caller guarantees a, b < 2^u and u >= m (tests use other u)."""
    t = mpz(a) * x
    t += b
    return gmpy2.f_mod_2exp(t >> (u - m), m)


def multiply_add_shift_hash(x: U8Array, seed: bytes, m: int) -> U8Array:
    """The m-bit hash of the bit vector ``x`` under the packed 2u-bit ``seed``.

    Raises :class:`PrivacyAmplificationError` for impossible lengths or a seed that is not exactly
    2u bits (with zero padding).
    """
    n = int(x.shape[0])
    if n <= 0 or not 0 < m <= n:
        raise PrivacyAmplificationError("input length must be positive and output length in (0, n]")
    u = word_bits(n, m)
    check_seed(seed, 2 * u, FAMILY)
    pad = (-2 * u) % 8
    raw = mpz.from_bytes(seed, "big")  # a, b, then pad zero bits: one shift less than unpadding first
    a = raw >> (u + pad)
    b = gmpy2.f_mod_2exp(raw, u + pad) >> pad
    del raw
    return mpz_to_bits(mas_int(a, b, u, bits_to_mpz(x), m), m)
