"""numba kernels of Cascade's *lazy* passes: top parities from bit masks, trees built on demand.

From pass 4 of Martinez-Mateo et al.'s schedule on, a pass's top-level block is half a frame, so
its tree is used only if that half has an odd number of errors, which at 1-5 % QBER happens in a
few frames out of many (the first three passes leave almost no errors). Building the tree of such
a pass (gathering every bit of the frame in permuted order, packing it, summing parities) used to
cost half of reconciliation's time. Instead, the parity of the first half is the parity of
``key AND mask`` over the key packed in its *original* order, where ``mask`` marks the positions
the pass's public permutation sends into the first half: one AND per 64 bits. A tree is built only
when a parity is asked of it (Alice) or when Bob finds an odd half (at the pass's start, or when a
correction in a later pass flips a bit of the frame: every such flip makes one half odd).

The disclosed bits, their order and their number are those of the eager construction: the parity
of a block does not depend on how it is computed. Bob's freshly built tree also marks as known
every bit he has already corrected in the frame (he knows Alice's value there), so it never asks
for a parity that those bits settle.
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
def set_known(kf: I64Array, kv: I64Array, v: Int, bit: Int) -> None:
    """Record that Alice's parity of node ``v`` is ``bit`` (kf = known flag, kv = value)."""
    w = v >> 6
    m = np.int64(1) << (v & 63)
    kf[w] |= m
    if bit:
        kv[w] |= m
    else:
        kv[w] &= ~m


@njit(cache=True, nogil=True)
def build_trees(
    key: U8Array,
    frame_base: int,
    n_f: int,
    perm: I32Array,
    words: I64Array,
    wtree: U8Array,
) -> None:
    """Gather ``key[frame_base + perm[i]]`` for the frame's positions, pack, build parities."""
    w_count = words.shape[0]
    for w in range(w_count):
        i0 = w * 64
        acc = np.int64(0)
        if i0 < n_f:
            lim = min(64, n_f - i0)
            for j in range(lim):
                acc |= np.int64(key[frame_base + perm[i0 + j]]) << j
        words[w] = acc
        wtree[w_count + w] = np.uint8(parity64(acc))
    for u in range(w_count - 1, 0, -1):
        wtree[u] = wtree[2 * u] ^ wtree[2 * u + 1]


@njit(cache=True, nogil=True)
def bob_build_tree(
    key: U8Array,
    corrected: I64Array,
    frame_base: int,
    n_f: int,
    perm: I32Array,
    inv: I32Array,
    words: I64Array,
    wtree: U8Array,
    kf: I64Array,
    kv: I64Array,
) -> None:
    """Bob: build a tree from his current key and mark the leaves of the bits he has corrected
    (``corrected``: the frame's corrected positions, packed in original order)."""
    build_trees(key, frame_base, n_f, perm, words, wtree)
    n = words.shape[0] * 64
    for w in range(corrected.shape[0]):
        m = corrected[w]
        while m != 0:
            low = m & -m
            x = w * 64 + _LOWEST[((low * _DEBRUIJN_I64) >> 58) & 63]
            set_known(kf, kv, np.int64(n + inv[x]), np.int64(key[frame_base + x]))
            m ^= low


@njit(cache=True, nogil=True)
def half_parities(packed: I64Array, mask_full: I64Array, mask_last: I64Array) -> U8Array:
    """Parity of the first top-level half of every frame: ``packed`` is (frames, W) key words in
    original order, the masks mark the positions the pass sends into the first half."""
    frames = packed.shape[0]
    out = np.empty(frames, dtype=np.uint8)
    for f in range(frames):
        mask = mask_last if f == frames - 1 else mask_full
        acc = np.int64(0)
        for w in range(packed.shape[1]):
            acc ^= packed[f, w] & mask[w]
        out[f] = np.uint8(parity64(acc))
    return out


@njit(cache=True, nogil=True)
def bob_start_lazy_pass(
    packed: I64Array,
    mask_full: I64Array,
    mask_last: I64Array,
    kf: I64Array,
    kv: I64Array,
    trees: I32Array,
    nfs: I64Array,
    parities: U8Array,
    totals: U8Array,
    top: int,
    n: int,
) -> tuple[I32Array, I64Array]:
    """Bob: record Alice's first-half parities (the second half, or a frame's only block, follows
    from the frame parity) and return the (tree, node) of every half with an odd mismatch."""
    mine = half_parities(packed, mask_full, mask_last)
    first = n // top
    act_t = np.empty(2 * trees.shape[0], dtype=np.int32)
    act_v = np.empty(2 * trees.shape[0], dtype=np.int64)
    a = 0
    k = 0
    for i in range(trees.shape[0]):
        t = trees[i]
        cnt = (nfs[i] + top - 1) // top
        total = np.int64(totals[i])
        if cnt == 2:
            b0 = np.int64(parities[k])
            k += 1
            set_known(kf[t], kv[t], np.int64(first + 1), total ^ b0)
        else:
            b0 = total
        set_known(kf[t], kv[t], np.int64(first), b0)
        set_known(kf[t], kv[t], np.int64(1), total)
        if b0 ^ np.int64(mine[i]):  # the frame's mismatch is even, so both halves are odd
            for j in range(cnt):
                act_t[a] = t
                act_v[a] = first + j
                a += 1
    return act_t[:a], act_v[:a]
