"""Toeplitz hashing computed exactly with the FFT: the reference privacy-amplification family.

Random binary Toeplitz matrices form a universal_2 family (Carter, Wegman 1979; Mansour,
Nisan, Tiwari, STOC '90; Krawczyk, CRYPTO '94): for x != x', T (x xor x') is uniform on
{0,1}^m: with j the first position where x and x' differ, row i of the product holds seed bit
s[i - j + n - 1] plus seed bits of lower index only, a triangular system in uniform bits. The
m x n matrix T[i, j] = s[i - j + n - 1] is fixed by an (n + m - 1)-bit seed.

y = T x (mod 2) is the middle of the linear convolution s * x, computed with real FFTs in
float64 (Hayashi, Tsurumaru, IEEE TIT 62, 2213 (2016) for FFT-based Toeplitz PA). It is exact
because every convolution value is an integer <= min(n, m) < 2^53 and the FFT's rounding error
is far below 1/2 at these lengths (Percival's bound ~ eps log2(L) ||s|| ||x||); the code checks
every value is within 0.25 of an integer and, should it not be, recomputes in column chunks
(T x = sum over chunks of T[:, chunk] x[chunk], each a smaller Toeplitz product). It is kept as a
selectable family and as the cross-check of :mod:`.pa_multiply_add_shift`, 16-40x slower.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from qkd_adapters.sim.postproc._types import U8Array
from qkd_adapters.sim.postproc.pa_bits import PrivacyAmplificationError, seed_to_bits

FAMILY = "toeplitz"
MAX_ROUNDING_ERROR = 0.25


def seed_bits(n: int, m: int) -> int:
    """The seed length: one bit per diagonal of the m x n matrix."""
    return n + m - 1


def toeplitz_hash_packed(x: U8Array, seed: bytes, m: int) -> U8Array:
    """The m-bit hash of ``x`` under a packed (n + m - 1)-bit seed (conventions of :mod:`.pa_bits`)."""
    n = int(x.shape[0])
    if n <= 0 or not 0 < m <= n:
        raise PrivacyAmplificationError("input length must be positive and output length in (0, n]")
    return toeplitz_hash(x, seed_to_bits(seed, seed_bits(n, m), FAMILY), m)


def toeplitz_hash(x: U8Array, seed: U8Array, m: int, *, chunk_bits: int | None = None) -> U8Array:
    """y = T x mod 2 with T[i, j] = seed[i - j + n - 1] (m x n); exact.

    ``chunk_bits`` forces the input to be processed in column chunks of that size (used when
    float rounding would otherwise not be safe, and by the tests to prove both paths agree).
    """
    n = int(x.shape[0])
    if m <= 0 or n <= 0:
        raise PrivacyAmplificationError("input and output lengths must be positive")
    if seed.shape[0] != n + m - 1:
        raise PrivacyAmplificationError("Toeplitz seed must have n + m - 1 bits")
    if chunk_bits is None or chunk_bits >= n:
        y = _toeplitz_fft(x, seed, m)
        if y is not None:
            return y
        chunk_bits = max(1, n // 4)
    out = np.zeros(m, dtype=np.uint8)
    for j0 in range(0, n, chunk_bits):
        j1 = min(n, j0 + chunk_bits)
        c = j1 - j0
        part = toeplitz_hash(x[j0:j1], seed[n - j1 : n - j1 + c + m - 1], m, chunk_bits=None if c > 1 else c)
        out ^= part
    return out


def _toeplitz_fft(x: U8Array, seed: U8Array, m: int) -> U8Array | None:
    """The FFT product, or None if any value is not safely an integer."""
    n = int(x.shape[0])
    length = sfft.next_fast_len(n + m - 1, real=True)
    fs = sfft.rfft(seed.astype(np.float64), n=length, workers=1)
    fx = sfft.rfft(x.astype(np.float64), n=length, workers=1)
    fs *= fx
    del fx
    conv = sfft.irfft(fs, n=length, workers=1)[n - 1 : n - 1 + m]
    rounded = np.rint(conv)
    if float(np.max(np.abs(conv - rounded), initial=0.0)) > MAX_ROUNDING_ERROR:
        return None
    bits: U8Array = (rounded.astype(np.int64) & 1).astype(np.uint8)
    return bits


def toeplitz_matrix(seed: U8Array, n: int, m: int) -> U8Array:
    """The dense m x n matrix (for tests on small sizes)."""
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    return np.asarray(seed[i - j + n - 1], dtype=np.uint8)
