"""numba primitives of Cascade's parity trees and of Bob's knowledge of Alice's parities.

Layout (see :mod:`.cascade`): the sifted key is cut into ``F`` frames of ``N`` bits (a power of
two); each (pass p, frame f) is a *tree* ``t = p * F + f`` over the frame's bits in the pass's
permuted order (pass-major, so the trees of the first passes, the ones always built, share
contiguous memory and a lazy pass's rows are never touched unless built). Node ``v`` of a tree is
a heap index in ``[1, 2N)``: node ``v`` of size ``s`` covers permuted positions
``[v*s - N, (v+1)*s - N)``. Bits are packed 64 to an int64 word (position ``i`` is bit ``i & 63``
of word ``i >> 6``); the parity of every node of 64 bits or more is kept in a *word tree* (uint8,
heap over the ``W = N/64`` words, same heap indices), and smaller nodes are read from their word
with a mask. Positions past the frame's real length are padding: zero at both ends, so their
parity is public (0) and never disclosed.

Bob's knowledge (``kfv``, one row per tree) interleaves two bit planes over the heap indices so a
node costs one cache line: word ``2 (v >> 6)`` holds the *known* flags, word ``2 (v >> 6) + 1`` the
values. A node not known but with its value bit set is one Bob has *asked* for and awaits (one
request per node and round); recording Alice's answer overwrites both bits. Bob's word tree is
kept exact only for nodes no larger than the pass's top-level block, the only ones ever read.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qkd_adapters.sim.postproc._types import I32Array, I64Array, Int, U8Array

# Index of the lowest set bit by de Bruijn multiplication (Leiserson, Prokop, Randall 1998).
_DEBRUIJN = 0x03F79D71B4CA8B09
_LOWEST = np.zeros(64, dtype=np.int64)
for _i in range(64):
    _LOWEST[(((1 << _i) * _DEBRUIJN) & 0xFFFFFFFFFFFFFFFF) >> 58] = _i
_DEBRUIJN_I64 = np.int64(_DEBRUIJN)


@njit(cache=True, nogil=True, inline="always")
def parity64(x: Int) -> Int:
    """Parity of the 64 bits of ``x``."""
    x ^= x >> 32
    x ^= x >> 16
    x ^= x >> 8
    x ^= x >> 4
    x ^= x >> 2
    x ^= x >> 1
    return x & 1


@njit(cache=True, nogil=True, inline="always")
def node_parity(words: I64Array, wtree: U8Array, v: Int, s: Int, n: Int) -> Int:
    """Parity of node ``v`` (size ``s``) of one tree over ``n`` leaves."""
    if s >= 64:
        return np.int64(wtree[v])
    start = v * s - n
    bits = (words[start >> 6] >> (start & 63)) & ((np.int64(1) << s) - 1)
    return parity64(bits)


@njit(cache=True, nogil=True, inline="always")
def known(kfv: I64Array, v: Int, s: Int, n: Int, n_f: Int) -> Int:
    """Alice's parity of node ``v`` as Bob knows it: 0/1, or -1 if unknown (padding is 0)."""
    if v * s - n >= n_f:
        return np.int64(0)
    w = (v >> 6) << 1
    b = v & 63
    if (kfv[w] >> b) & 1:
        bit: Int = (kfv[w + 1] >> b) & 1
        return bit
    return np.int64(-1)


@njit(cache=True, nogil=True, inline="always")
def set_known(kfv: I64Array, v: Int, bit: Int) -> None:
    """Record that Alice's parity of node ``v`` is ``bit`` (clears a pending request)."""
    w = (v >> 6) << 1
    m = np.int64(1) << (v & 63)
    kfv[w] |= m
    if bit:
        kfv[w + 1] |= m
    else:
        kfv[w + 1] &= ~m


@njit(cache=True, nogil=True, inline="always")
def mark_asked(kfv: I64Array, v: Int) -> bool:
    """Mark node ``v`` (not known) as requested; False if it already was this round."""
    w = ((v >> 6) << 1) + 1
    m = np.int64(1) << (v & 63)
    if kfv[w] & m:
        return False
    kfv[w] |= m
    return True


@njit(cache=True, nogil=True)
def build_trees(packed: I64Array, n_f: Int, perm: I32Array, words: I64Array, wtree: U8Array) -> None:
    """Gather bit ``perm[i]`` of the frame (``packed``: its bits in original order, 64 to a word:
    32 KiB, so the random gathers hit L1) for every position, pack, build the parities."""
    w_count = words.shape[0]
    for w in range(w_count):
        i0 = w * 64
        acc = np.int64(0)
        if i0 < n_f:
            lim = min(64, n_f - i0)
            for j in range(lim):
                x = perm[i0 + j]
                acc |= ((packed[x >> 6] >> (x & 63)) & 1) << j
        words[w] = acc
        wtree[w_count + w] = np.uint8(parity64(acc))
    for u in range(w_count - 1, 0, -1):
        wtree[u] = wtree[2 * u] ^ wtree[2 * u + 1]


@njit(cache=True, nogil=True)
def bob_build_tree(
    packed: I64Array,
    corrected: I64Array,
    n_f: Int,
    perm: I32Array,
    inv: I32Array,
    words: I64Array,
    wtree: U8Array,
    kfv: I64Array,
) -> None:
    """Bob: build a tree from his current key and mark as known the leaves of the bits he has
    corrected (he knows Alice's value there); ``packed`` and ``corrected`` hold the frame's
    current bits and corrected positions, in original order."""
    build_trees(packed, n_f, perm, words, wtree)
    n = words.shape[0] * 64
    for w in range(corrected.shape[0]):
        m = corrected[w]
        while m != 0:
            low = m & -m
            b = _LOWEST[((low * _DEBRUIJN_I64) >> 58) & 63]
            set_known(kfv, np.int64(n + inv[w * 64 + b]), (packed[w] >> b) & 1)
            m ^= low
