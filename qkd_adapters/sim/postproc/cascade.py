"""Cascade error reconciliation, batched and with exact leak counting.

Cascade (Brassard, Salvail, EUROCRYPT '93) corrects Bob's key by disclosing parities of blocks
of Alice's key and bisecting blocks whose parities differ (BINARY); a corrected bit flips the
parity of the blocks that hold it in every earlier pass, so further errors surface ("cascade").
This implementation follows the published improvements:

* block sizes of Martinez-Mateo, Pacher, Peev, Ciurana, Martin, "Demystifying the information
  reconciliation protocol Cascade", QIC 15, 453 (2015), "Cascade opt. (8)" (``_cascade_layout``);
* sub-block reuse (their opt. (4)): every parity Bob knows - disclosed, inferred from parent and
  sibling, or a corrected bit - is reused; a cascaded correction restarts BINARY from the
  smallest known block with odd mismatch, and known halves are never asked for again;
* block parity inference: after pass 1 each frame's total parity is known, so the last block
  parity of every later pass is inferred rather than sent;
* all bisections of a round are asked for in one message (Pedersen, Toyran, "High performance
  information reconciliation for QKD with CASCADE", QIC 15, 419 (2015)), so a block needs only
  about log2(k) round trips per pass, whatever its number of errors.

Permutations are public (derived from a seed Alice announces) and precomputed once per frame
size; a shorter last frame uses the order-preserving restriction of the same permutations.
Parities come from packed parity trees (``_cascade_tree``), so every disclosed parity costs
O(1) and every correction O(passes * log n). Passes whose top-level block is half a frame are
*lazy* (``_cascade_lazy``): their top parities come from bit masks and their trees are built
only where a half turns out odd, which at 1-5 % QBER is rare (docs/DECISIONS.md D-31).

Leak: every parity bit Alice sends is counted (``cascade/top-parities`` and ``cascade/reply``
messages); nothing else she sends depends on her key. Bob's messages reveal only error
positions, which are independent of the key for the symmetric channels simulated here.

This module holds both halves, :func:`reconcile` and the messages between them side by side, so
that the leak count can be checked by reading them together; the numerical work is in the
``_cascade_*`` kernels.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from qkd_adapters.sim.postproc import _cascade_kernels as kern
from qkd_adapters.sim.postproc import _cascade_lazy as lazy
from qkd_adapters.sim.postproc import _cascade_tree as tree
from qkd_adapters.sim.postproc._cascade_layout import (
    Layout,
    Schedule,
    block_sizes,
    frame_size,
    pack_frames,
)
from qkd_adapters.sim.postproc._types import U8Array
from qkd_adapters.sim.postproc.channel import ClassicalChannel

__all__ = [
    "CascadeAlice",
    "CascadeBob",
    "CascadeConfig",
    "ReconciliationError",
    "ReconciliationResult",
    "binary_entropy",
    "block_sizes",
    "frame_size",
    "reconcile",
]


class ReconciliationError(RuntimeError):
    """Reconciliation could not run (malformed message, impossible parameters)."""


@dataclass(frozen=True)
class CascadeConfig:
    """Tunable choices of the Cascade run (all public)."""

    passes: int | None = None  # None: 14 for option8, 4 for original
    max_frame_bits: int = 1 << 18
    permutation_seed: int = 0x5EED_CA5C
    schedule: Schedule = "option8"

    def __post_init__(self) -> None:
        if self.max_frame_bits < 64 or self.max_frame_bits & (self.max_frame_bits - 1):
            raise ValueError("max_frame_bits must be a power of two >= 64")
        if self.passes is not None and not 1 <= self.passes <= 64:
            raise ValueError("passes must lie in [1, 64]")


@dataclass(frozen=True)
class ReconciliationResult:
    """What reconciliation did; ``leaked_bits`` is every parity bit Alice disclosed."""

    leaked_bits: int
    errors_corrected: int
    n_bits: int
    rounds: int
    messages: int
    qber_hint: float
    block_sizes: tuple[int, ...] = field(default=())
    frame_bits: int = 0

    @property
    def qber_corrected(self) -> float:
        """Fraction of bits Bob corrected (the block's QBER if reconciliation succeeded)."""
        return self.errors_corrected / self.n_bits if self.n_bits else 0.0

    def efficiency(self, qber: float | None = None) -> float:
        """f = leak / (n h(q)); q defaults to the corrected fraction."""
        q = self.qber_corrected if qber is None else qber
        h = binary_entropy(q)
        return self.leaked_bits / (self.n_bits * h) if h > 0 and self.n_bits else math.inf


def binary_entropy(q: float) -> float:
    """h(q) = -q log2 q - (1-q) log2 (1-q)."""
    if q <= 0.0 or q >= 1.0:
        return 0.0
    return -q * math.log2(q) - (1.0 - q) * math.log2(1.0 - q)


class CascadeAlice:
    """Alice's end: announces the run, then answers parity requests from her fixed key."""

    def __init__(self, key: U8Array, qber_hint: float, config: CascadeConfig) -> None:
        key = np.ascontiguousarray(key, dtype=np.uint8)
        n = int(key.shape[0])
        if n == 0:
            raise ReconciliationError("nothing to reconcile")
        frame = frame_size(n, config.max_frame_bits)
        sizes = block_sizes(qber_hint, frame, config.schedule, config.passes)
        self.layout = Layout.build(n, frame, sizes, config.permutation_seed)
        lay = self.layout
        trees = lay.frames * lay.passes
        w = frame // 64
        self._words = np.zeros((trees, w), dtype=np.int64)
        self._wtree = np.zeros((trees, 2 * w), dtype=np.uint8)
        self._built = np.zeros(trees, dtype=np.uint8)
        self._packed = pack_frames(key, frame)  # Alice's key, 64 bits to a word
        self._started = 0

    def init_message(self) -> bytes:
        lay = self.layout
        head = struct.pack(">QIIQ", lay.n, lay.frame_bits, lay.passes, lay.seed)
        return head + np.asarray(lay.sizes, dtype=">u4").tobytes()

    def on_pass(self, payload: bytes) -> tuple[bytes, int]:
        """Disclose this pass's top-level block parities (building its trees unless it is lazy)."""
        if len(payload) != 4:
            raise ReconciliationError("malformed pass request")
        (p,) = struct.unpack(">I", payload)
        lay = self.layout
        if p != self._started or p >= lay.passes:
            raise ReconciliationError("pass index out of order")
        self._started = p + 1
        if lay.lazy[p]:  # trees built only if Bob asks; the last half follows from the frame parity
            halves = lazy.half_parities(self._packed, lay.mask_full[p], lay.mask_last[p])
            bits = halves[lay.nf_by_frame > lay.tops[p]]
            return _pack_bits(bits), int(bits.shape[0])
        trees = lay.trees_of_pass(p)
        for f in range(lay.frames):
            tree.build_trees(
                self._packed[f], int(lay.nf_by_frame[f]), lay.perm_of_frame(f)[p],
                self._words[trees[f]], self._wtree[trees[f]],
            )  # fmt: skip
        self._built[trees] = 1
        bits = kern.top_parities(
            self._words, self._wtree, trees, lay.nf_by_frame, lay.tops[p], lay.frame_bits
        )
        if p > 0:  # the last block of each frame follows from the frame parity disclosed in pass 0
            counts = -(-lay.nf_by_frame // lay.tops[p])
            keep = np.ones(bits.shape[0], dtype=bool)
            keep[np.cumsum(counts) - 1] = False
            bits = bits[keep]
        return _pack_bits(bits), int(bits.shape[0])

    def on_query(self, payload: bytes) -> tuple[bytes, int]:
        """Disclose the parities of the nodes Bob asks for (building a lazy pass's tree first)."""
        lay = self.layout
        reply, count, status = kern.alice_answer(
            np.frombuffer(payload, dtype=np.uint8), self._words, self._wtree, self._built,
            self._started, self._packed, lay.perm_full, lay.perm_last, lay.nf_by_frame, lay.frame_bits,
        )  # fmt: skip
        if status == kern.ANSWER_MALFORMED:
            raise ReconciliationError("parity request of unexpected length")
        if status != kern.ANSWER_OK:
            raise ReconciliationError("invalid parity request")
        return reply.tobytes(), int(count)


class CascadeBob:
    """Bob's end: drives the passes and the batched bisections, and corrects his key."""

    def __init__(self, key: U8Array, init_payload: bytes) -> None:
        if len(init_payload) < 24:
            raise ReconciliationError("malformed Cascade announcement")
        n, frame, passes, seed = struct.unpack(">QIIQ", init_payload[:24])
        sizes_arr = np.frombuffer(init_payload[24:], dtype=">u4")
        if n != key.shape[0] or sizes_arr.shape[0] != passes or frame < 64 or frame & (frame - 1):
            raise ReconciliationError("Cascade announcement does not match Bob's key")
        sizes = tuple(int(s) for s in sizes_arr)
        if any(s < 2 or s > frame // 2 or s & (s - 1) for s in sizes):
            raise ReconciliationError("invalid block sizes")
        self.key = np.array(key, dtype=np.uint8, copy=True)
        self.layout = Layout.build(int(n), int(frame), sizes, int(seed))
        lay = self.layout
        trees = lay.frames * lay.passes
        w = frame // 64
        self._words = np.zeros((trees, w), dtype=np.int64)
        self._wtree = np.zeros((trees, 2 * w), dtype=np.uint8)
        self._kfv = np.zeros((trees, 4 * w), dtype=np.int64)
        self._tree_built = np.zeros(trees, dtype=np.uint8)
        self._packed = pack_frames(self.key, frame)
        self._corr = np.zeros_like(self._packed)
        self._totals = np.full(lay.frames, 2, dtype=np.uint8)
        self._lazy_half = np.zeros((lay.passes, lay.frames), dtype=np.uint8)
        self._q_t = np.zeros(0, dtype=np.int64)
        self._q_v = np.zeros(0, dtype=np.int64)
        self._act_t = np.zeros(0, dtype=np.int64)
        self._act_v = np.zeros(0, dtype=np.int64)
        self._act_s = np.zeros(0, dtype=np.int64)
        self.corrected = 0
        self.built = 0

    def _build(self, t: int) -> None:
        lay = self.layout
        p, f = divmod(t, lay.frames)
        last = f == lay.frames - 1
        tree.bob_build_tree(
            self._packed[f], self._corr[f], int(lay.nf_by_frame[f]),
            (lay.perm_last if last else lay.perm_full)[p], (lay.inv_last if last else lay.inv_full)[p],
            self._words[t], self._wtree[t], self._kfv[t],
        )  # fmt: skip
        self._tree_built[t] = 1

    def start_pass(self, p: int) -> bytes:
        lay = self.layout
        if not lay.lazy[p]:
            for t in lay.trees_of_pass(p):
                self._build(int(t))
        self.built = p + 1
        return struct.pack(">I", p)

    def on_top_parities(self, p: int, payload: bytes) -> None:
        lay = self.layout
        trees = lay.trees_of_pass(p)
        tops = lay.tops[p]
        if lay.lazy[p]:
            bits = _unpack_bits(payload, int(np.count_nonzero(lay.nf_by_frame > tops)))
            self._lazy_half[p], odd = lazy.bob_start_lazy_pass(
                self._packed, lay.mask_full[p], lay.mask_last[p], lay.nf_by_frame, bits,
                self._totals, tops,
            )  # fmt: skip
            act: list[tuple[int, int, int]] = []
            for f in np.flatnonzero(odd):
                t, top = int(trees[f]), int(tops[f])
                self._build(t)
                halves = -(-int(lay.nf_by_frame[f]) // top)
                lazy.seed_lazy_tree(
                    self._kfv[t], int(self._totals[f]), int(self._lazy_half[p, f]), halves,
                    lay.frame_bits // top,
                )  # fmt: skip
                act += [(t, lay.frame_bits // top + j, top) for j in range(halves)]
            act_arr = np.asarray(act, dtype=np.int64).reshape(-1, 3)
            act_t, act_v, act_s = act_arr[:, 0], act_arr[:, 1], act_arr[:, 2]
        else:
            counts = -(-lay.nf_by_frame // tops)
            expected = int(counts.sum()) - (lay.frames if p > 0 else 0)
            bits = _unpack_bits(payload, expected)
            act_t, act_v, act_s = kern.bob_start_pass(
                self._words, self._wtree, self._kfv, trees, lay.nf_by_frame, bits,
                self._totals, tops, lay.frame_bits,
            )  # fmt: skip
            if p == 0:
                self._totals = np.bitwise_xor.reduceat(
                    bits, np.concatenate(([0], np.cumsum(counts)[:-1]))
                ).astype(np.uint8)
        self._act_t = np.concatenate((self._act_t, act_t))
        self._act_v = np.concatenate((self._act_v, act_v))
        self._act_s = np.concatenate((self._act_s, act_s))

    def next_query(self) -> bytes | None:
        """Advance all bisections; the next parity request, or None when all are done."""
        lay = self.layout
        while self._act_t.shape[0]:
            self._act_t, self._act_v, self._act_s, q_t, q_v, query, flips = kern.bob_round(
                self._words, self._wtree, self._kfv, self.key, self._packed, self._corr,
                self._tree_built, self._totals, self._lazy_half, lay.perm_full, lay.inv_full,
                lay.perm_last, lay.inv_last, lay.nf_by_frame, self.built, lay.tops,
                self._act_t, self._act_v, self._act_s,
            )  # fmt: skip
            self.corrected += int(flips)
            if q_t.shape[0]:
                self._q_t, self._q_v = q_t, q_v
                return query.tobytes()
        return None

    def on_reply(self, payload: bytes) -> None:
        if not kern.bob_apply_reply(self._kfv, self._q_t, self._q_v, np.frombuffer(payload, dtype=np.uint8)):
            raise ReconciliationError("parity message of unexpected length")


def reconcile(
    alice_key: U8Array,
    bob_key: U8Array,
    channel: ClassicalChannel,
    qber_hint: float,
    config: CascadeConfig | None = None,
) -> tuple[U8Array, ReconciliationResult]:
    """Run Cascade between the two ends over ``channel``; return Bob's corrected key.

    ``qber_hint`` chooses the block sizes: an estimate available *before* reconciliation (the
    test-basis error rate or the previous block's QBER), never the true error count.
    """
    cfg = config if config is not None else CascadeConfig()
    if alice_key.shape != bob_key.shape:
        raise ReconciliationError("keys differ in length")
    start_msgs = channel.messages
    alice = CascadeAlice(alice_key, qber_hint, cfg)
    bob = CascadeBob(bob_key, channel.send("alice", "cascade/init", alice.init_message()))
    leak = 0
    rounds = 0
    for p in range(bob.layout.passes):
        reply, bits = alice.on_pass(channel.send("bob", "cascade/pass", bob.start_pass(p)))
        leak += bits
        bob.on_top_parities(p, channel.send("alice", "cascade/top-parities", reply, leaked_bits=bits))
        while (query := bob.next_query()) is not None:
            answer, bits = alice.on_query(channel.send("bob", "cascade/query", query))
            leak += bits
            bob.on_reply(channel.send("alice", "cascade/reply", answer, leaked_bits=bits))
            rounds += 1
    channel.send("bob", "cascade/done", b"")
    result = ReconciliationResult(
        leaked_bits=leak,
        errors_corrected=bob.corrected,
        n_bits=int(alice_key.shape[0]),
        rounds=rounds,
        messages=channel.messages - start_msgs,
        qber_hint=qber_hint,
        block_sizes=bob.layout.sizes,
        frame_bits=bob.layout.frame_bits,
    )
    return bob.key, result


def _pack_bits(bits: U8Array) -> bytes:
    return struct.pack(">I", bits.shape[0]) + np.packbits(bits).tobytes()


def _unpack_bits(payload: bytes, expected: int) -> U8Array:
    if len(payload) < 4:
        raise ReconciliationError("malformed parity message")
    (count,) = struct.unpack(">I", payload[:4])
    if count != expected or len(payload) != 4 + (count + 7) // 8:
        raise ReconciliationError("parity message of unexpected length")
    return np.unpackbits(np.frombuffer(payload, dtype=np.uint8, offset=4), count=count)
