"""numba kernels of Cascade: parity trees, Bob's batched bisection, Alice's answers.

Layout (see :mod:`.cascade`): the sifted key is cut into frames of ``N`` bits (a power of two);
each (frame f, pass p) is a *tree* ``t = f * P + p`` over the frame's bits in the pass's
permuted order. Node ``v`` of a tree is a heap index in ``[1, 2N)``: node ``v`` of size ``s``
covers permuted positions ``[v*s - N, (v+1)*s - N)``. Bits are packed 64 to an int64 word
(position ``i`` is bit ``i & 63`` of word ``i >> 6``); the parity of every node of 64 bits or
more is kept in a *word tree* (uint8, heap over the ``W = N/64`` words, same heap indices), and
smaller nodes are read from their word with a mask. Positions past the frame's real length
are padding: zero at both ends, so their parity is public (0) and never disclosed.

Bob keeps, per tree, which node parities of Alice he knows (two bit planes over the heap
indices, ``kf`` = known flag, ``kv`` = value): disclosed ones, inferred ones (parent XOR
sibling), and corrected leaves. Reusing all of them when a correction cascades is the
sub-block reuse of Martinez-Mateo et al. (2015), Cascade opt. (4)/(7)/(8).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qkd_adapters.sim.postproc._cascade_lazy import bob_build_tree, parity64, set_known
from qkd_adapters.sim.postproc._types import I32Array, I64Array, Int, U8Array

_DROP = 0
_DONE = 1
_QUERY = 2


@njit(cache=True, nogil=True, inline="always")
def _node_parity(words: I64Array, wtree: U8Array, v: Int, s: Int, n: Int) -> Int:
    if s >= 64:
        return np.int64(wtree[v])
    start = v * s - n
    bits = (words[start >> 6] >> (start & 63)) & ((np.int64(1) << s) - 1)
    return parity64(bits)


@njit(cache=True, nogil=True)
def node_size(v: Int, n: Int) -> Int:
    """Size of heap node ``v`` in a tree over ``n`` leaves (0 if ``v`` is out of range)."""
    if v < 1 or v >= 2 * n:
        return np.int64(0)
    s = n
    u = v
    while u > 1:
        u >>= 1
        s >>= 1
    return s


@njit(cache=True, nogil=True)
def answer_parities(
    words: I64Array, wtree: U8Array, q_t: I32Array, q_v: I64Array, n: int, n_trees_built: I32Array
) -> U8Array:
    """Alice: parities of the queried nodes; 255 marks an invalid query (the caller aborts)."""
    out = np.empty(q_t.shape[0], dtype=np.uint8)
    n_trees = n_trees_built.shape[0]
    for i in range(q_t.shape[0]):
        t = q_t[i]
        v = q_v[i]
        s = node_size(v, n)
        if t < 0 or t >= n_trees or n_trees_built[t] == 0 or s == 0:
            out[i] = 255
            continue
        out[i] = np.uint8(_node_parity(words[t], wtree[t], v, s, n))
    return out


@njit(cache=True, nogil=True)
def top_parities(
    words: I64Array, wtree: U8Array, trees: I32Array, nfs: I64Array, top: int, n: int
) -> U8Array:
    """Alice: parities of the top-level nodes of size ``top`` holding real bits, tree by tree."""
    total = 0
    for i in range(trees.shape[0]):
        total += (nfs[i] + top - 1) // top
    out = np.empty(total, dtype=np.uint8)
    k = 0
    first = n // top
    for i in range(trees.shape[0]):
        t = trees[i]
        cnt = (nfs[i] + top - 1) // top
        for j in range(cnt):
            out[k] = np.uint8(
                _node_parity(words[t], wtree[t], np.int64(first + j), np.int64(top), np.int64(n))
            )
            k += 1
    return out


@njit(cache=True, nogil=True, inline="always")
def _known(kf: I64Array, kv: I64Array, v: Int, s: Int, n: Int, n_f: Int) -> Int:
    if v * s - n >= n_f:
        return np.int64(0)
    w = v >> 6
    b = v & 63
    if (kf[w] >> b) & 1:
        bit: Int = (kv[w] >> b) & 1
        return bit
    return np.int64(-1)


@njit(cache=True, nogil=True)
def bob_start_pass(
    words: I64Array,
    wtree: U8Array,
    kf: I64Array,
    kv: I64Array,
    trees: I32Array,
    nfs: I64Array,
    parities: U8Array,
    totals: U8Array,
    top: int,
    n: int,
) -> tuple[I32Array, I64Array, I64Array]:
    """Bob: record Alice's top-level parities (the last of each frame inferred from ``totals``
    when ``parities`` omits it) and return the odd-mismatch blocks to bisect."""
    first = n // top
    act_t = np.empty(parities.shape[0] + trees.shape[0], dtype=np.int32)
    act_v = np.empty_like(act_t, dtype=np.int64)
    k = 0
    a = 0
    for i in range(trees.shape[0]):
        t = trees[i]
        cnt = (nfs[i] + top - 1) // top
        acc = np.int64(0)
        for j in range(cnt):
            v = np.int64(first + j)
            if totals[i] <= 1 and j == cnt - 1:  # 2 = frame parity not yet known
                bit = np.int64(totals[i]) ^ acc
            else:
                bit = np.int64(parities[k])
                k += 1
            acc ^= bit
            set_known(kf[t], kv[t], v, bit)
            if bit ^ _node_parity(words[t], wtree[t], v, np.int64(top), np.int64(n)):
                act_t[a] = t
                act_v[a] = v
                a += 1
        set_known(kf[t], kv[t], np.int64(1), acc)
    return act_t[:a], act_v[:a], np.full(a, top, dtype=np.int64)


@njit(cache=True, nogil=True)
def bob_apply_replies(
    kf: I64Array, kv: I64Array, asked: I64Array, q_t: I64Array, q_v: I64Array, bits: U8Array
) -> None:
    """Bob: remember the parities Alice disclosed (and clear the requests' marks)."""
    for i in range(q_t.shape[0]):
        t = q_t[i]
        v = q_v[i]
        set_known(kf[t], kv[t], v, np.int64(bits[i]))
        asked[t, v >> 6] &= ~(np.int64(1) << (v & 63))


@njit(cache=True, nogil=True)
def _grow(a: I64Array, size: Int) -> I64Array:
    b = np.empty(size, dtype=a.dtype)
    b[: a.shape[0]] = a
    return b


@njit(cache=True, nogil=True, inline="always")
def _push(
    qt: I64Array, qv: I64Array, qs: I64Array, cnt: Int, t: Int, v: Int, s: Int
) -> tuple[I64Array, I64Array, I64Array]:
    """Append (t, v, s) at index ``cnt`` of the work queue, doubling it when full."""
    if cnt == qt.shape[0]:
        qt = _grow(qt, 2 * cnt)
        qv = _grow(qv, 2 * cnt)
        qs = _grow(qs, 2 * cnt)
    qt[cnt] = t
    qv[cnt] = v
    qs[cnt] = s
    return qt, qv, qs


@njit(cache=True, nogil=True)
def bob_round(
    words: I64Array,
    wtree: U8Array,
    kf: I64Array,
    kv: I64Array,
    asked: I64Array,
    bob_key: U8Array,
    packed: I64Array,
    corrected: I64Array,
    tree_built: U8Array,
    perm_full: I32Array,
    inv_full: I32Array,
    perm_last: I32Array,
    inv_last: I32Array,
    nf_by_frame: I64Array,
    n_passes: int,
    n: int,
    n_built: int,
    top_sizes: I64Array,
    act_t: I32Array,
    act_v: I64Array,
    act_s: I64Array,
) -> tuple[I64Array, I64Array, I64Array, I64Array, I64Array, int]:
    """Bob: advance every pending bisection as far as known parities allow.

    Corrections cascade at once into every pass already started (sub-block reuse: the deepest
    known node with odd mismatch containing the corrected bit is bisected next); a lazy pass's
    tree not built yet is built then (:mod:`._cascade_lazy`). ``packed`` and ``corrected`` (Bob's
    key and his corrected positions, packed per frame in original order) follow every flip. Returns the
    bisections left waiting for a parity, the queries (tree, node) they wait for, and the
    number of bits corrected.
    """
    w_count = n // 64
    n_frames = nf_by_frame.shape[0]
    cap = max(16, 2 * act_t.shape[0])
    qt = np.empty(cap, dtype=np.int64)
    qv = np.empty(cap, dtype=np.int64)
    qs = np.empty(cap, dtype=np.int64)
    cnt = act_t.shape[0]
    for i in range(cnt):
        qt[i] = act_t[i]
        qv[i] = act_v[i]
        qs[i] = act_s[i]
    pend_t = np.empty(cap, dtype=np.int64)
    pend_v = np.empty(cap, dtype=np.int64)
    pend_s = np.empty(cap, dtype=np.int64)
    ask_t = np.empty(cap, dtype=np.int64)
    ask_v = np.empty(cap, dtype=np.int64)
    n_pend = 0
    n_ask = 0
    flips = 0
    head = 0
    nn = np.int64(n)
    while head < cnt:
        t = qt[head]
        v = qv[head]
        s = qs[head]
        head += 1
        f = t // n_passes
        n_f = nf_by_frame[f]
        while True:
            k = _known(kf[t], kv[t], v, s, nn, n_f)
            if k < 0 or (k ^ _node_parity(words[t], wtree[t], v, s, nn)) == 0:
                break
            if s == 1:
                # Located: correct Bob's bit and cascade into every started pass.
                p = t % n_passes
                pos = v - nn
                last = f == n_frames - 1
                x = perm_last[p, pos] if last else perm_full[p, pos]
                gi = f * n + x
                bob_key[gi] ^= 1
                newbit = np.int64(bob_key[gi])
                flips += 1
                xbit = np.int64(1) << (x & 63)
                packed[f, x >> 6] ^= xbit
                corrected[f, x >> 6] |= xbit
                for q in range(n_built):
                    tq = f * n_passes + q
                    if tree_built[tq] == 0:
                        # A lazy pass: the flip made one half of the frame odd; build its tree now.
                        bob_build_tree(
                            bob_key, corrected[f], f * n, n_f,
                            perm_last[q] if last else perm_full[q],
                            inv_last[q] if last else inv_full[q],
                            words[tq], wtree[tq], kf[tq], kv[tq],
                        )  # fmt: skip
                        tree_built[tq] = 1
                        top = top_sizes[q]
                        for j in range((n_f + top - 1) // top):
                            a = nn // top + j
                            ka = _known(kf[tq], kv[tq], a, top, nn, n_f)
                            if ka >= 0 and (ka ^ _node_parity(words[tq], wtree[tq], a, top, nn)) == 1:
                                qt, qv, qs = _push(qt, qv, qs, cnt, tq, a, top)
                                cnt += 1
                        continue
                    pq = np.int64(inv_last[q, x] if last else inv_full[q, x])
                    words[tq, pq >> 6] ^= np.int64(1) << (pq & 63)
                    u = w_count + (pq >> 6)
                    while u >= 1:
                        wtree[tq, u] ^= 1
                        u >>= 1
                    leaf = nn + pq
                    set_known(kf[tq], kv[tq], leaf, newbit)
                    a = leaf >> 1
                    sa = np.int64(2)
                    while sa <= top_sizes[q]:
                        ka = _known(kf[tq], kv[tq], a, sa, nn, n_f)
                        if ka >= 0 and (ka ^ _node_parity(words[tq], wtree[tq], a, sa, nn)) == 1:
                            qt, qv, qs = _push(qt, qv, qs, cnt, tq, a, sa)
                            cnt += 1
                            break
                        a >>= 1
                        sa <<= 1
                break
            hs = s >> 1
            left = 2 * v
            right = left + 1
            kl = _known(kf[t], kv[t], left, hs, nn, n_f)
            if kl >= 0:
                if kl ^ _node_parity(words[t], wtree[t], left, hs, nn):
                    v = left
                else:
                    set_known(kf[t], kv[t], right, k ^ kl)
                    v = right
                s = hs
                continue
            kr = _known(kf[t], kv[t], right, hs, nn, n_f)
            if kr >= 0:
                set_known(kf[t], kv[t], left, k ^ kr)
                v = right if kr ^ _node_parity(words[t], wtree[t], right, hs, nn) else left
                s = hs
                continue
            if n_pend == pend_t.shape[0]:
                pend_t = _grow(pend_t, 2 * n_pend)
                pend_v = _grow(pend_v, 2 * n_pend)
                pend_s = _grow(pend_s, 2 * n_pend)
                ask_t = _grow(ask_t, 2 * n_pend)
                ask_v = _grow(ask_v, 2 * n_pend)
            pend_t[n_pend] = t
            pend_v[n_pend] = v
            pend_s[n_pend] = s
            n_pend += 1
            m = np.int64(1) << (left & 63)
            if not asked[t, left >> 6] & m:  # one request per node and round
                asked[t, left >> 6] |= m
                ask_t[n_ask] = t
                ask_v[n_ask] = left
                n_ask += 1
            break
    return pend_t[:n_pend], pend_v[:n_pend], pend_s[:n_pend], ask_t[:n_ask], ask_v[:n_ask], flips


@njit(cache=True, nogil=True)
def restrict_permutation(base: I32Array, n_keep: int, perm_out: I32Array, inv_out: I32Array) -> None:
    """The order-preserving restriction of a random permutation of [0, N) to [0, n_keep):
    again a uniformly random permutation, at the cost of one pass (no new randomness)."""
    j = 0
    for i in range(base.shape[0]):
        x = base[i]
        if x < n_keep:
            perm_out[j] = x
            inv_out[x] = j
            j += 1
