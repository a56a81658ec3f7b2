"""numba encoders and decoders of Cascade's two per-round messages.

Bisection takes hundreds of rounds per block (the pass-2 chains of corrections at 1-3 % QBER), so
the fixed cost of a round matters as much as the work in it: packing and unpacking these messages
with a few numpy calls each cost ~12 us per round. Here they are single loops, called from inside
the kernels that produce or consume them. The formats are unchanged:

* query (Bob -> Alice): big-endian u32 ``count``, then ``count`` u32 tree indices, then ``count``
  u32 node indices;
* parities (Alice -> Bob): big-endian u32 ``count``, then the ``count`` bits packed MSB first
  (``numpy.packbits`` order), padded with zero bits to a whole byte.

Decoders return a status instead of raising (numba), and the callers turn it into a
``ReconciliationError``: a malformed message never indexes out of bounds.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qkd_adapters.sim.postproc._types import I64Array, Int, U8Array


@njit(cache=True, nogil=True, inline="always")
def put_u32(out: U8Array, at: Int, x: Int) -> None:
    """Write ``x`` as a big-endian u32 at ``out[at:at + 4]``."""
    out[at] = np.uint8((x >> 24) & 0xFF)
    out[at + 1] = np.uint8((x >> 16) & 0xFF)
    out[at + 2] = np.uint8((x >> 8) & 0xFF)
    out[at + 3] = np.uint8(x & 0xFF)


@njit(cache=True, nogil=True, inline="always")
def get_u32(buf: U8Array, at: Int) -> Int:
    """The big-endian u32 at ``buf[at:at + 4]`` (as int64, never negative)."""
    return (
        (np.int64(buf[at]) << 24)
        | (np.int64(buf[at + 1]) << 16)
        | (np.int64(buf[at + 2]) << 8)
        | np.int64(buf[at + 3])
    )


@njit(cache=True, nogil=True)
def encode_query(q_t: I64Array, q_v: I64Array, count: Int) -> U8Array:
    """The query message for the first ``count`` (tree, node) pairs."""
    out = np.empty(4 + 8 * count, dtype=np.uint8)
    put_u32(out, 0, count)
    for i in range(count):
        put_u32(out, 4 + 4 * i, q_t[i])
        put_u32(out, 4 + 4 * (count + i), q_v[i])
    return out


@njit(cache=True, nogil=True)
def query_count(buf: U8Array) -> Int:
    """Number of pairs in a query message, or -1 if its length does not match its count."""
    if buf.shape[0] < 4:
        return np.int64(-1)
    count = get_u32(buf, 0)
    if buf.shape[0] != 4 + 8 * count:
        return np.int64(-1)
    return count


@njit(cache=True, nogil=True)
def bits_message(count: Int) -> U8Array:
    """An all-zero parity message with room for ``count`` bits (fill it with :func:`put_bit`)."""
    out = np.zeros(4 + (count + 7) // 8, dtype=np.uint8)
    put_u32(out, 0, count)
    return out


@njit(cache=True, nogil=True, inline="always")
def put_bit(out: U8Array, i: Int, bit: Int) -> None:
    """Set bit ``i`` of a parity message (MSB first within each byte)."""
    if bit:
        out[4 + (i >> 3)] |= np.uint8(0x80 >> (i & 7))


@njit(cache=True, nogil=True, inline="always")
def get_bit(buf: U8Array, i: Int) -> Int:
    """Bit ``i`` of a parity message."""
    return (np.int64(buf[4 + (i >> 3)]) >> (7 - (i & 7))) & 1


@njit(cache=True, nogil=True)
def bits_ok(buf: U8Array, expected: Int) -> bool:
    """Whether a parity message announces ``expected`` bits and has exactly their length."""
    return buf.shape[0] >= 4 and get_u32(buf, 0) == expected and buf.shape[0] == 4 + (expected + 7) // 8
