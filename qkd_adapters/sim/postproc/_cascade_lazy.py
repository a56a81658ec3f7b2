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
every bit he has already corrected in the frame, so it never asks for a parity those bits settle.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qkd_adapters.sim.postproc._cascade_tree import parity64, set_known
from qkd_adapters.sim.postproc._types import I32Array, I64Array, Int, U8Array


@njit(cache=True, nogil=True)
def first_block_mask(perm: I32Array, top: int, n_f: int, out: I64Array) -> None:
    """Mark in ``out`` (original order, 64 positions to a word) the frame positions a pass's
    permutation sends into its first top-level block: ``perm[0:top]`` (real ones only)."""
    out[:] = 0
    for i in range(min(top, n_f)):
        x = perm[i]
        out[x >> 6] |= np.int64(1) << (x & 63)


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
    nfs: I64Array,
    parities: U8Array,
    totals: U8Array,
    tops: I64Array,
) -> tuple[U8Array, U8Array]:
    """Bob: Alice's first-half parity of every frame (disclosed, or the frame parity where the
    frame has one block) and whether Bob's differs (then both halves are odd, as the frame's
    mismatch is even after pass 1)."""
    mine = half_parities(packed, mask_full, mask_last)
    frames = nfs.shape[0]
    alice = np.empty(frames, dtype=np.uint8)
    odd = np.empty(frames, dtype=np.uint8)
    k = 0
    for f in range(frames):
        if nfs[f] > tops[f]:
            alice[f] = parities[k]
            k += 1
        else:
            alice[f] = totals[f]
        odd[f] = alice[f] ^ mine[f]
    return alice, odd


@njit(cache=True, nogil=True, inline="always")
def seed_lazy_tree(kfv: I64Array, total: Int, half: Int, cnt: Int, first: Int) -> None:
    """Record in a just-built lazy tree what Bob knew before building it: the frame parity and
    the parities of its (one or two) top-level halves."""
    set_known(kfv, np.int64(1), np.int64(total))
    set_known(kfv, np.int64(first), np.int64(half))
    if cnt == 2:
        set_known(kfv, np.int64(first + 1), np.int64(total ^ half))
