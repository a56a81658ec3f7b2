"""Privacy amplification: the choice of hash family, the seed exchange, and both ends' hashing.

By the quantum leftover hash lemma (Renner 2005; Tomamichel, Schaffner, Smith, Renner, IEEE TIT
57, 5524 (2011)) hashing the reconciled n-bit key with a function drawn from *any* two-universal
family to the m bits the finite-key bound allows (:mod:`qkd_adapters.sim.finite_key`) leaves a key
eps_sec-close to uniform and independent of Eve (D-10). Two proven families are built:

* ``multiply-add-shift`` (default, :mod:`.pa_multiply_add_shift`): strongly universal, one GMP
  product per hash, seed 2(n + m - 1) bits;
* ``toeplitz`` (reference and cross-check, :mod:`.pa_toeplitz`): universal, FFT product, seed
  n + m - 1 bits.

Alice's end draws the seed from the operating system's CSPRNG (``secrets.token_bytes``: the seed
must be uniform and independent of everything Eve holds, not secret) and sends it in the clear
over the authenticated classical channel as one ``pa/seed`` message: a header naming the family,
n and m, then the packed seed (:mod:`.pa_bits`). Bob refuses a message for another family or
other lengths, and a seed of the wrong length, so both ends hash with the very same function.
The seed is public and independent of the key, so it counts as traffic, not as leaked bits.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkd_adapters.sim.postproc import pa_multiply_add_shift, pa_toeplitz
from qkd_adapters.sim.postproc._types import U8Array
from qkd_adapters.sim.postproc.channel import ClassicalChannel
from qkd_adapters.sim.postproc.pa_bits import PrivacyAmplificationError, seed_bytes
from qkd_adapters.sim.postproc.pa_toeplitz import toeplitz_hash, toeplitz_matrix

__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "PrivacyAmplificationError",
    "amplify",
    "decode_seed_message",
    "describe",
    "draw_seed",
    "encode_seed_message",
    "hash_key",
    "seed_bits",
    "toeplitz_hash",
    "toeplitz_matrix",
]

RandBytes = Callable[[int], bytes]
SEED_KIND = "pa/seed"
_HEADER = struct.Struct(">B32sQQ")  # version, family name (NUL-padded ASCII), n, m
_VERSION = 1


@dataclass(frozen=True)
class _Family:
    seed_bits: Callable[[int, int], int]
    hash: Callable[[U8Array, bytes, int], U8Array]
    universality: str


FAMILIES: dict[str, _Family] = {
    pa_multiply_add_shift.FAMILY: _Family(
        pa_multiply_add_shift.seed_bits, pa_multiply_add_shift.multiply_add_shift_hash, "strongly universal"
    ),
    pa_toeplitz.FAMILY: _Family(pa_toeplitz.seed_bits, pa_toeplitz.toeplitz_hash_packed, "universal"),
}
DEFAULT_FAMILY = pa_multiply_add_shift.FAMILY


def _family(name: str) -> _Family:
    try:
        return FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise PrivacyAmplificationError(
            f"unknown privacy-amplification family {name!r} (known: {known})"
        ) from None


def _check_lengths(n: int, m: int) -> None:
    if n <= 0 or not 0 < m <= n:
        raise PrivacyAmplificationError(f"final length must lie in (0, n]; got m = {m} for n = {n}")


def seed_bits(family: str, n: int, m: int) -> int:
    """The seed length of ``family`` for n input and m output bits."""
    _check_lengths(n, m)
    return _family(family).seed_bits(n, m)


def draw_seed(family: str, n: int, m: int, randbytes: RandBytes = secrets.token_bytes) -> bytes:
    """A uniform packed seed: ``randbytes`` (a CSPRNG) for every bit, padding bits cleared."""
    bits = seed_bits(family, n, m)
    raw = randbytes(seed_bytes(bits))
    if len(raw) != seed_bytes(bits):
        raise PrivacyAmplificationError("the random source returned the wrong number of bytes")
    pad = (-bits) % 8
    return raw[:-1] + bytes([raw[-1] & (0xFF ^ ((1 << pad) - 1))]) if pad else raw


def hash_key(family: str, x: U8Array, seed: bytes, m: int) -> U8Array:
    """The m-bit hash of the key bit vector ``x`` under ``seed`` (checked for its exact length)."""
    _check_lengths(int(x.shape[0]), m)
    return _family(family).hash(x, seed, m)


def encode_seed_message(family: str, n: int, m: int, seed: bytes) -> bytes:
    """The ``pa/seed`` payload: header (version, family, n, m) then the packed seed."""
    _family(family)
    return _HEADER.pack(_VERSION, family.encode("ascii"), n, m) + seed


def decode_seed_message(payload: bytes, family: str, n: int, m: int) -> bytes:
    """The seed of a ``pa/seed`` payload, refused unless it is for ``family``, n and m exactly."""
    if len(payload) < _HEADER.size:
        raise PrivacyAmplificationError("privacy-amplification seed message is shorter than its header")
    version, raw_name, n_rx, m_rx = _HEADER.unpack_from(payload)
    name = raw_name.rstrip(b"\0").decode("ascii", errors="replace")
    if not name.isprintable():  # keeps the one-line error one line whatever the wire held
        name = raw_name.hex()
    if version != _VERSION:
        raise PrivacyAmplificationError(f"privacy-amplification seed message version {version} unknown")
    if name != family:
        raise PrivacyAmplificationError(f"seed is for family {name!r}, this end hashes with {family!r}")
    if (n_rx, m_rx) != (n, m):
        raise PrivacyAmplificationError(
            f"seed is for n = {n_rx}, m = {m_rx} bits; this end has n = {n}, m = {m}"
        )
    seed = payload[_HEADER.size :]
    want = seed_bytes(seed_bits(family, n, m))
    if len(seed) != want:
        raise PrivacyAmplificationError(
            f"{family} seed must be {want} bytes for n = {n}, m = {m}; got {len(seed)} bytes"
        )
    return seed


def describe(family: str, n: int, m: int) -> dict[str, Any]:
    """The provenance entry of one block's amplification (no seed, no key: metadata only)."""
    return {
        "family": family,
        "universality": _family(family).universality,
        "input_bits": n,
        "output_bits": m,
        "seed_bits": seed_bits(family, n, m),
        "seed_source": "csprng",
    }


def amplify(
    alice_key: U8Array,
    bob_key: U8Array,
    final_bits: int,
    channel: ClassicalChannel,
    *,
    family: str = DEFAULT_FAMILY,
    randbytes: RandBytes = secrets.token_bytes,
) -> tuple[U8Array, U8Array]:
    """Alice draws and sends the seed; each end hashes its own key with the seed it holds.

    Both ends live in this process, so where Bob's seed and key equal Alice's bit for bit his hash
    is hers (the same function of the same input) and is copied instead of computed again: half
    the cost. Any difference - a residual error, another seed - and his end hashes its own input.
    """
    n = int(alice_key.shape[0])
    if int(bob_key.shape[0]) != n:
        raise PrivacyAmplificationError("the two ends hold keys of different lengths")
    seed = draw_seed(family, n, final_bits, randbytes)
    received = channel.send("alice", SEED_KIND, encode_seed_message(family, n, final_bits, seed))
    bob_seed = decode_seed_message(received, family, n, final_bits)
    alice_out = hash_key(family, alice_key, seed, final_bits)
    if bob_seed == seed and np.array_equal(bob_key, alice_key):
        return alice_out, alice_out.copy()
    return alice_out, hash_key(family, bob_key, bob_seed, final_bits)
