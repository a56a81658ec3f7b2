"""Bit-order conventions of privacy amplification, the same at both ends of a link.

Keys inside the post-processing are ``uint8`` arrays of 0/1, one bit per element. Every hash
family reads and writes them through this module so that Alice and Bob can never disagree on an
order:

* a key bit vector ``x[0..n-1]`` is the integer ``X = sum x[i] 2^(n-1-i)``: ``x[0]`` is the most
  significant bit (the order of ``numpy.packbits``, which the key blocks use for their material);
* an output integer ``Y < 2^m`` is the bit vector ``y[j] = bit (m-1-j) of Y``, the same order;
* a seed of ``k`` bits travels as ``ceil(k/8)`` bytes, bits packed most significant first (again
  ``numpy.packbits``), the unused low bits of the last byte zero. A seed of another byte length,
  or with a padding bit set, is refused: both ends must read the very same bits.
"""

from __future__ import annotations

import numpy as np
from gmpy2 import mpz

from qkd_adapters.sim.postproc._types import U8Array


class PrivacyAmplificationError(RuntimeError):
    """The output length is impossible, or the seed does not fit the input."""


def seed_bytes(bits: int) -> int:
    """The byte length of a ``bits``-bit seed on the wire."""
    return (bits + 7) // 8


def bits_to_mpz(x: U8Array) -> mpz:
    """The bit vector as an integer, ``x[0]`` most significant."""
    n = int(x.shape[0])
    packed = np.packbits(x).tobytes()
    return mpz.from_bytes(packed, "big") >> ((-n) % 8)


def mpz_to_bits(y: mpz, m: int) -> U8Array:
    """The low ``m`` bits of ``y`` as a bit vector, most significant first."""
    raw = np.frombuffer(y.to_bytes(seed_bytes(m), "big"), dtype=np.uint8)
    bits: U8Array = np.unpackbits(raw)[(-m) % 8 :]
    return bits


def check_seed(seed: bytes, bits: int, family: str) -> None:
    """Refuses a seed of the wrong byte length, or with padding bits set, with a one-line reason."""
    want = seed_bytes(bits)
    if len(seed) != want:
        raise PrivacyAmplificationError(
            f"{family} seed must be {bits} bits ({want} bytes) for this block; got {len(seed)} bytes"
        )
    pad = (-bits) % 8
    if pad and seed[-1] & ((1 << pad) - 1):
        raise PrivacyAmplificationError(f"{family} seed has padding bits set after its {bits} bits")


def seed_to_bits(seed: bytes, bits: int, family: str) -> U8Array:
    """A checked seed as a bit vector."""
    check_seed(seed, bits, family)
    out: U8Array = np.unpackbits(np.frombuffer(seed, dtype=np.uint8), count=bits)
    return out
