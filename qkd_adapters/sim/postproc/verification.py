"""Verification of the reconciled keys with a polynomial universal hash (eps_cor).

Cascade can leave errors undetected; before privacy amplification Alice sends a short hash of
her key and Bob compares it with his (Lim et al., PRA 89, 022307 (2014): an eps_cor-correct
protocol). The hash is polynomial evaluation over the Mersenne prime field p = 2^61 - 1
(Carter, Wegman, JCSS 18, 143 (1979); Wegman, Carter, JCSS 22, 265 (1981)): the key, cut into
L 32-bit words c_1..c_L and prefixed with its bit length, is hashed as
h_r = (len r^L + c_1 r^(L-1) + ... + c_L) mod p at a uniformly random point r. Two different
keys of the same length collide only if r is a root of their (nonzero) difference polynomial of
degree <= L, so Pr[collision] <= L / p. With ``m`` independent points the bound is (L / p)^m;
``m`` is the smallest with (L / p)^m <= eps_cor. The points are drawn by Alice after Bob's key
is fixed and sent in the clear (they are independent of the key); the 61-bit tags count as leak.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numba import njit

from qkd_adapters.sim.postproc._types import U8Array
from qkd_adapters.sim.postproc.channel import ClassicalChannel

MERSENNE_61 = (1 << 61) - 1
TAG_BITS = 61


class VerificationError(RuntimeError):
    """Alice's and Bob's keys differ after reconciliation: the block is aborted."""


@dataclass(frozen=True)
class VerificationResult:
    """The hash points used, the tag bits disclosed, and the collision bound achieved."""

    hashes: int
    leaked_bits: int
    collision_bound: float


def hashes_needed(n_bits: int, eps_cor: float) -> int:
    """Smallest m with (L / p)^m <= eps_cor, L = number of 32-bit words (+1 for the length)."""
    if not 0.0 < eps_cor < 1.0:
        raise ValueError("eps_cor must lie in (0, 1)")
    words = -(-n_bits // 32) + 1
    per = words / MERSENNE_61
    return max(1, math.ceil(math.log(eps_cor) / math.log(per)))


def collision_bound(n_bits: int, hashes: int) -> float:
    """(L / p)^m for a key of ``n_bits`` bits and ``hashes`` points."""
    return float(((-(-n_bits // 32) + 1) / MERSENNE_61) ** hashes)


@njit(cache=True, nogil=True, inline="always")
def _mulmod(a: np.uint64, b: np.uint64) -> np.uint64:
    """a * b mod 2^61 - 1 for a, b < 2^61, with 64-bit arithmetic only."""
    m31 = np.uint64((1 << 31) - 1)
    m30 = np.uint64((1 << 30) - 1)
    m61 = np.uint64(MERSENNE_61)
    au = a >> np.uint64(31)
    ad = a & m31
    bu = b >> np.uint64(31)
    bd = b & m31
    mid = ad * bu + au * bd
    midu = mid >> np.uint64(30)
    midd = mid & m30
    x = au * bu * np.uint64(2) + midu + (midd << np.uint64(31)) + ad * bd
    x = (x & m61) + (x >> np.uint64(61))
    x = (x & m61) + (x >> np.uint64(61))
    if x >= m61:
        x -= m61
    return x


@njit(cache=True, nogil=True)
def _poly_hash(words: npt.NDArray[np.uint32], n_bits: np.uint64, r: np.uint64) -> np.uint64:
    m61 = np.uint64(MERSENNE_61)
    h = n_bits % m61
    for i in range(words.shape[0]):
        h = _mulmod(h, r) + np.uint64(words[i])
        if h >= m61:
            h -= m61
    return h


def poly_hash(key: U8Array, r: int) -> int:
    """Hash of a 0/1 key at point ``r`` in [0, 2^61 - 1)."""
    if not 0 <= r < MERSENNE_61:
        raise ValueError("hash point out of range")
    n = int(key.shape[0])
    packed = np.packbits(np.asarray(key, dtype=np.uint8))
    pad = (-packed.shape[0]) % 4
    if pad:
        packed = np.concatenate((packed, np.zeros(pad, dtype=np.uint8)))
    words = packed.view(">u4").astype(np.uint32)
    return int(_poly_hash(words, np.uint64(n), np.uint64(r)))


def verify_keys(
    alice_key: U8Array,
    bob_key: U8Array,
    channel: ClassicalChannel,
    rng: np.random.Generator,
    eps_cor: float,
) -> VerificationResult:
    """Alice sends hash points and tags; Bob compares. Raises VerificationError on mismatch."""
    n = int(alice_key.shape[0])
    if bob_key.shape[0] != n:
        raise VerificationError("key lengths differ")
    m = hashes_needed(n, eps_cor)
    points = [int(x) for x in rng.integers(0, MERSENNE_61, size=m, dtype=np.uint64)]
    tags = [poly_hash(alice_key, r) for r in points]
    payload = struct.pack(f">I{m}Q{m}Q", m, *points, *tags)
    received = channel.send("alice", "verify/hash", payload, leaked_bits=m * TAG_BITS)
    (m_rx,) = struct.unpack(">I", received[:4])
    if len(received) != 4 + 16 * m_rx or m_rx < m:
        raise VerificationError("malformed verification message")
    vals = struct.unpack(f">{2 * m_rx}Q", received[4:])
    ok = all(poly_hash(bob_key, r) == tag for r, tag in zip(vals[:m_rx], vals[m_rx:], strict=True))
    channel.send("bob", "verify/result", b"\x01" if ok else b"\x00")
    if not ok:
        raise VerificationError("verification hash mismatch: keys differ after reconciliation")
    return VerificationResult(hashes=m, leaked_bits=m * TAG_BITS, collision_bound=collision_bound(n, m))
