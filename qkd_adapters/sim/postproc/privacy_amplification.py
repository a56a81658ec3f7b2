"""Privacy amplification by Toeplitz hashing, computed exactly with the FFT.

Random binary Toeplitz matrices form a universal_2 family (Carter, Wegman 1979; Mansour,
Nisan, Tiwari, STOC '90; Krawczyk, CRYPTO '94), so by the leftover hash lemma (Impagliazzo,
Levin, Luby 1989; Renner 2005, Tomamichel et al. 2011) hashing the reconciled n-bit key to the
length m allowed by the finite-key bound leaves a key eps_sec-close to uniform and independent
of Eve. The m x n matrix T[i, j] = s[i - j + n - 1] is fixed by an (n + m - 1)-bit seed that
Alice draws and sends in the clear (public, counted as traffic, not as leak).

y = T x (mod 2) is the middle of the linear convolution s * x, computed with real FFTs in
float64 (Hayashi, Tsurumaru, IEEE TIT 62, 2213 (2016) for FFT-based Toeplitz PA). It is exact
because every convolution value is an integer <= min(n, m) < 2^53 and the FFT's rounding error
is far below 1/2 at these lengths (Percival's bound ~ eps log2(L) ||s|| ||x||); the code checks
every value is within 0.25 of an integer and, should it not be, recomputes in column chunks
(T x = sum over chunks of T[:, chunk] x[chunk], each a smaller Toeplitz product).
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from qkd_adapters.sim.postproc._types import U8Array
from qkd_adapters.sim.postproc.channel import ClassicalChannel

MAX_ROUNDING_ERROR = 0.25


class PrivacyAmplificationError(RuntimeError):
    """The output length is impossible, or the seed does not fit the input."""


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


def amplify(
    alice_key: U8Array,
    bob_key: U8Array,
    final_bits: int,
    channel: ClassicalChannel,
    rng: np.random.Generator,
) -> tuple[U8Array, U8Array]:
    """Alice draws and sends the seed; both ends hash their (identical) keys to ``final_bits``."""
    n = int(alice_key.shape[0])
    if not 0 < final_bits <= n:
        raise PrivacyAmplificationError("final length must lie in (0, n]")
    seed = rng.integers(0, 2, size=n + final_bits - 1, dtype=np.uint8)
    header = final_bits.to_bytes(8, "big")
    received = channel.send("alice", "pa/seed", header + np.packbits(seed).tobytes())
    m_rx = int.from_bytes(received[:8], "big")
    bob_seed = np.unpackbits(np.frombuffer(received, dtype=np.uint8, offset=8), count=n + m_rx - 1)
    if m_rx != final_bits:
        raise PrivacyAmplificationError("seed message does not match the agreed length")
    return toeplitz_hash(alice_key, seed, final_bits), toeplitz_hash(bob_key, bob_seed, m_rx)
