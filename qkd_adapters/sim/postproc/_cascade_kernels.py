"""numba kernels of Cascade: Alice's answers, Bob's pass starts and his batched bisection.

Trees, node numbering and Bob's knowledge planes are described in :mod:`._cascade_tree`; lazy
passes (top block = half a frame, tree built on demand) in :mod:`._cascade_lazy`; the two
per-round message formats, encoded and decoded here without leaving compiled code, in
:mod:`._cascade_wire`. Reusing every parity Bob knows (disclosed, inferred as parent XOR sibling,
or a corrected leaf) when a correction cascades is the sub-block reuse of Martinez-Mateo et al.
(2015), Cascade opt. (4)/(7)/(8).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qkd_adapters.sim.postproc._cascade_lazy import seed_lazy_tree
from qkd_adapters.sim.postproc._cascade_tree import (
    bob_build_tree,
    build_trees,
    known,
    mark_asked,
    node_parity,
    set_known,
)
from qkd_adapters.sim.postproc._cascade_wire import (
    bits_message,
    bits_ok,
    encode_query,
    get_bit,
    get_u32,
    put_bit,
    query_count,
)
from qkd_adapters.sim.postproc._types import I32Array, I64Array, Int, U8Array

# Status codes of alice_answer.
ANSWER_OK = 0
ANSWER_MALFORMED = 1
ANSWER_INVALID = 2


@njit(cache=True, nogil=True)
def node_size(v: Int, n: Int) -> Int:
    """Size of heap node ``v`` in a tree over ``n`` leaves (0 if ``v`` is out of range)."""
    if v < 1 or v >= 2 * n:
        return np.int64(0)
    depth = np.int64(np.log2(np.float64(v)))  # exact enough below 2^40; corrected below
    if (np.int64(1) << depth) > v:
        depth -= 1
    elif (np.int64(2) << depth) <= v:
        depth += 1
    return n >> depth


@njit(cache=True, nogil=True)
def alice_answer(
    query: U8Array,
    words: I64Array,
    wtree: U8Array,
    built: U8Array,
    started: int,
    packed: I64Array,
    perm_full: I32Array,
    perm_last: I32Array,
    nf_by_frame: I64Array,
    n: int,
) -> tuple[U8Array, Int, int]:
    """Alice: the parity message answering a query message, the number of bits it discloses, and
    a status (``ANSWER_*``). A node of a started lazy pass's tree not built yet is built first;
    a tree of a pass not started, or a node out of range, makes the query invalid."""
    count = query_count(query)
    if count < 0:
        return np.zeros(0, dtype=np.uint8), 0, ANSWER_MALFORMED
    n_frames = nf_by_frame.shape[0]
    out = bits_message(count)
    for i in range(count):
        t = get_u32(query, 4 + 4 * i)
        v = get_u32(query, 4 + 4 * (count + i))
        s = node_size(v, n)
        if t >= built.shape[0] or s == 0 or t // n_frames >= started:
            return np.zeros(0, dtype=np.uint8), 0, ANSWER_INVALID
        if built[t] == 0:
            p = t // n_frames
            f = t % n_frames
            perm = perm_last[p] if f == n_frames - 1 else perm_full[p]
            build_trees(packed[f], nf_by_frame[f], perm, words[t], wtree[t])
            built[t] = 1
        put_bit(out, i, node_parity(words[t], wtree[t], v, s, n))
    return out, count, ANSWER_OK


@njit(cache=True, nogil=True)
def top_parities(
    words: I64Array, wtree: U8Array, trees: I32Array, nfs: I64Array, tops: I64Array, n: int
) -> U8Array:
    """Alice: parities of the top-level nodes (size ``tops[i]`` in frame i) holding real bits."""
    total = 0
    for i in range(trees.shape[0]):
        total += (nfs[i] + tops[i] - 1) // tops[i]
    out = np.empty(total, dtype=np.uint8)
    k = 0
    for i in range(trees.shape[0]):
        t = trees[i]
        top = tops[i]
        first = n // top
        cnt = (nfs[i] + top - 1) // top
        for j in range(cnt):
            out[k] = np.uint8(
                node_parity(words[t], wtree[t], np.int64(first + j), np.int64(top), np.int64(n))
            )
            k += 1
    return out


@njit(cache=True, nogil=True)
def bob_start_pass(
    words: I64Array,
    wtree: U8Array,
    kfv: I64Array,
    trees: I32Array,
    nfs: I64Array,
    parities: U8Array,
    totals: U8Array,
    tops: I64Array,
    n: int,
) -> tuple[I64Array, I64Array, I64Array]:
    """Bob: record Alice's top-level parities (the last of each frame inferred from ``totals``
    when ``parities`` omits it) and return the odd-mismatch blocks to bisect."""
    act_t = np.empty(parities.shape[0] + trees.shape[0], dtype=np.int64)
    act_v = np.empty_like(act_t)
    act_s = np.empty_like(act_t)
    k = 0
    a = 0
    for i in range(trees.shape[0]):
        t = trees[i]
        top = tops[i]
        first = n // top
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
            set_known(kfv[t], v, bit)
            if bit ^ node_parity(words[t], wtree[t], v, np.int64(top), np.int64(n)):
                act_t[a] = t
                act_v[a] = v
                act_s[a] = top
                a += 1
        set_known(kfv[t], np.int64(1), acc)
    return act_t[:a], act_v[:a], act_s[:a]


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
def _correct(
    t: Int,
    v: Int,
    words: I64Array,
    wtree: U8Array,
    kfv: I64Array,
    bob_key: U8Array,
    packed: I64Array,
    corrected: I64Array,
    tree_built: U8Array,
    totals: U8Array,
    lazy_half: U8Array,
    perm_full: I32Array,
    inv_full: I32Array,
    perm_last: I32Array,
    inv_last: I32Array,
    nf_by_frame: I64Array,
    n_built: int,
    tops: I64Array,
    qt: I64Array,
    qv: I64Array,
    qs: I64Array,
    cnt: Int,
) -> tuple[I64Array, I64Array, I64Array, Int]:
    """Flip the located bit (leaf ``v`` of tree ``t``) and cascade: in every started pass, update
    the tree and queue the smallest known block holding the bit that is now odd (sub-block reuse);
    a lazy pass's tree not built yet is built now, from the corrected key."""
    n_frames = nf_by_frame.shape[0]
    n = np.int64(words.shape[1] * 64)
    w_count = words.shape[1]
    p = t // n_frames
    f = t % n_frames
    n_f = nf_by_frame[f]
    last = f == n_frames - 1
    x = np.int64(perm_last[p, v - n] if last else perm_full[p, v - n])
    gi = f * n + x
    bob_key[gi] ^= 1
    newbit = np.int64(bob_key[gi])
    xbit = np.int64(1) << (x & 63)
    packed[f, x >> 6] ^= xbit
    corrected[f, x >> 6] |= xbit
    for q in range(n_built):
        tq = q * n_frames + f
        top = tops[q, f]
        if tree_built[tq] == 0:  # lazy: the flip made one half of the frame odd
            bob_build_tree(
                packed[f], corrected[f], n_f,
                perm_last[q] if last else perm_full[q], inv_last[q] if last else inv_full[q],
                words[tq], wtree[tq], kfv[tq],
            )  # fmt: skip
            tree_built[tq] = 1
            halves = (n_f + top - 1) // top
            seed_lazy_tree(kfv[tq], totals[f], lazy_half[q, f], halves, n // top)
            for j in range(halves):
                a = n // top + j
                if node_parity(words[tq], wtree[tq], a, top, n) != known(kfv[tq], a, top, n, n_f):
                    qt, qv, qs = _push(qt, qv, qs, cnt, tq, a, top)
                    cnt += 1
            continue
        pq = np.int64(inv_last[q, x] if last else inv_full[q, x])
        words[tq, pq >> 6] ^= np.int64(1) << (pq & 63)
        # Only nodes up to the pass's top-level size are ever read: the rest may go stale.
        u = w_count + (pq >> 6)
        su = np.int64(64)
        while su <= top:
            wtree[tq, u] ^= 1
            u >>= 1
            su <<= 1
        leaf = n + pq
        set_known(kfv[tq], leaf, newbit)
        a = leaf >> 1
        sa = np.int64(2)
        while sa <= top:
            ka = known(kfv[tq], a, sa, n, n_f)
            if ka >= 0 and (ka ^ node_parity(words[tq], wtree[tq], a, sa, n)) == 1:
                qt, qv, qs = _push(qt, qv, qs, cnt, tq, a, sa)
                cnt += 1
                break
            a >>= 1
            sa <<= 1
    return qt, qv, qs, cnt


@njit(cache=True, nogil=True)
def bob_round(
    words: I64Array,
    wtree: U8Array,
    kfv: I64Array,
    bob_key: U8Array,
    packed: I64Array,
    corrected: I64Array,
    tree_built: U8Array,
    totals: U8Array,
    lazy_half: U8Array,
    perm_full: I32Array,
    inv_full: I32Array,
    perm_last: I32Array,
    inv_last: I32Array,
    nf_by_frame: I64Array,
    n_built: int,
    tops: I64Array,
    act_t: I64Array,
    act_v: I64Array,
    act_s: I64Array,
) -> tuple[I64Array, I64Array, I64Array, I64Array, I64Array, U8Array, int]:
    """Bob: advance every pending bisection as far as known parities allow.

    Corrections cascade at once into every pass already started (:func:`_correct`). Returns the
    bisections left waiting for a parity (tree, node, size), the (tree, node) pairs asked for and
    their query message (one request per node), and the number of bits corrected.
    """
    n_frames = nf_by_frame.shape[0]
    cap = max(16, 2 * act_t.shape[0])
    qt = np.empty(cap, dtype=np.int64)
    qv = np.empty(cap, dtype=np.int64)
    qs = np.empty(cap, dtype=np.int64)
    cnt = act_t.shape[0]
    # Frame by frame: a frame's trees fit in L2, the whole key's do not (stable counting sort).
    start = np.zeros(n_frames + 1, dtype=np.int64)
    for i in range(cnt):
        start[act_t[i] % n_frames + 1] += 1
    for f in range(n_frames):
        start[f + 1] += start[f]
    for i in range(cnt):
        f = act_t[i] % n_frames
        j = start[f]
        start[f] = j + 1
        qt[j] = act_t[i]
        qv[j] = act_v[i]
        qs[j] = act_s[i]
    pend_t = np.empty(cap, dtype=np.int64)
    pend_v = np.empty(cap, dtype=np.int64)
    pend_s = np.empty(cap, dtype=np.int64)
    ask_t = np.empty(cap, dtype=np.int64)
    ask_v = np.empty(cap, dtype=np.int64)
    n_pend = 0
    n_ask = 0
    flips = 0
    head = 0
    nn = np.int64(words.shape[1] * 64)
    while head < cnt:
        t = qt[head]
        v = qv[head]
        s = qs[head]
        head += 1
        n_f = nf_by_frame[t % n_frames]
        kt = kfv[t]
        while True:
            k = known(kt, v, s, nn, n_f)
            if k < 0 or (k ^ node_parity(words[t], wtree[t], v, s, nn)) == 0:
                break
            if s == 1:
                qt, qv, qs, cnt = _correct(
                    t, v, words, wtree, kfv, bob_key, packed, corrected, tree_built, totals,
                    lazy_half, perm_full, inv_full, perm_last, inv_last, nf_by_frame, n_built,
                    tops, qt, qv, qs, cnt,
                )  # fmt: skip
                flips += 1
                break
            hs = s >> 1
            left = 2 * v
            right = left + 1
            kl = known(kt, left, hs, nn, n_f)
            if kl >= 0:
                if kl ^ node_parity(words[t], wtree[t], left, hs, nn):
                    v = left
                else:
                    set_known(kt, right, k ^ kl)
                    v = right
                s = hs
                continue
            kr = known(kt, right, hs, nn, n_f)
            if kr >= 0:
                set_known(kt, left, k ^ kr)
                v = right if kr ^ node_parity(words[t], wtree[t], right, hs, nn) else left
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
            if mark_asked(kt, left):
                ask_t[n_ask] = t
                ask_v[n_ask] = left
                n_ask += 1
            break
    query = encode_query(ask_t, ask_v, n_ask)
    return (pend_t[:n_pend], pend_v[:n_pend], pend_s[:n_pend], ask_t[:n_ask], ask_v[:n_ask], query, flips)


@njit(cache=True, nogil=True)
def bob_apply_reply(kfv: I64Array, q_t: I64Array, q_v: I64Array, reply: U8Array) -> bool:
    """Bob: record the parities Alice disclosed for his last query; False if the message does
    not have exactly one bit per request."""
    if not bits_ok(reply, q_t.shape[0]):
        return False
    for i in range(q_t.shape[0]):
        set_known(kfv[q_t[i]], q_v[i], get_bit(reply, i))
    return True


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
