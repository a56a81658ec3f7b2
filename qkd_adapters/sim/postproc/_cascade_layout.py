"""How a key is laid out for Cascade: frames, block sizes, public permutations, lazy masks.

Both ends derive all of it from the announcement (key length, frame size, block sizes, seed), so
it is cached: a run of blocks of equal length reuses it, and the full-frame parts (permutations,
masks) are reused across lengths. Block sizes follow Martinez-Mateo, Pacher, Peev, Ciurana, Martin,
"Demystifying the information reconciliation protocol Cascade", QIC 15, 453 (2015): their
"Cascade opt. (8)" (default) with alpha = log2(1/q) - 1/2, k1 = 2^ceil(alpha),
k2 = 2^ceil((alpha + 12)/2), k3 = 4096, k_i = N/2 afterwards, 14 passes; and the original
k1 = 0.73/q (rounded to a power of two), k_i = 2 k_{i-1}, 4 passes, as ``schedule="original"``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from qkd_adapters.sim.postproc import _cascade_kernels as kern
from qkd_adapters.sim.postproc import _cascade_lazy as lazy
from qkd_adapters.sim.postproc._types import I32Array, I64Array, U8Array

Schedule = Literal["option8", "original"]
MIN_QBER = 1e-4


def block_sizes(
    qber: float, frame_bits: int, schedule: Schedule = "option8", passes: int | None = None
) -> tuple[int, ...]:
    """Top-level block size of each pass (powers of two, at most half a frame)."""
    q = min(max(qber, MIN_QBER), 0.25)
    half = max(frame_bits // 2, 1)
    sizes: list[int] = []
    if schedule == "option8":
        n_pass = 14 if passes is None else passes
        alpha = math.log2(1.0 / q) - 0.5
        for i in range(n_pass):
            if i == 0:
                k = 2 ** math.ceil(alpha)
            elif i == 1:
                k = 2 ** math.ceil((alpha + 12.0) / 2.0)
            elif i == 2:
                k = 4096
            else:
                k = half
            sizes.append(k)
    elif schedule == "original":
        n_pass = 4 if passes is None else passes
        k = 2 ** max(1, round(math.log2(0.73 / q)))
        for _ in range(n_pass):
            sizes.append(k)
            k *= 2
    else:
        raise ValueError(f"unknown Cascade schedule {schedule!r}")
    return tuple(int(min(max(k, 2), half)) for k in sizes)


@functools.lru_cache(maxsize=4)
def base_permutations(frame_bits: int, passes: int, seed: int) -> tuple[I32Array, I32Array]:
    """Public random permutations of one frame, one per pass, and their inverses (cached)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    perm = np.empty((passes, frame_bits), dtype=np.int32)
    inv = np.empty((passes, frame_bits), dtype=np.int32)
    ar = np.arange(frame_bits, dtype=np.int32)
    for p in range(passes):
        perm[p] = rng.permutation(frame_bits).astype(np.int32)
        inv[p, perm[p]] = ar
    perm.setflags(write=False)
    inv.setflags(write=False)
    return perm, inv


@dataclass(frozen=True)
class Layout:
    """How a key of n bits is cut into frames, and the permutations of every frame."""

    n: int
    frame_bits: int
    sizes: tuple[int, ...]
    seed: int
    perm_full: I32Array
    inv_full: I32Array
    perm_last: I32Array
    inv_last: I32Array
    nf_by_frame: I64Array
    lazy: tuple[bool, ...]
    tops: I64Array  # (passes, frames): top-level block size of each pass in each frame
    mask_full: I64Array
    mask_last: I64Array

    @property
    def passes(self) -> int:
        return len(self.sizes)

    @property
    def frames(self) -> int:
        return int(self.nf_by_frame.shape[0])

    @staticmethod
    @functools.lru_cache(maxsize=2)
    def build(n: int, frame_bits: int, sizes: tuple[int, ...], seed: int) -> Layout:
        """The layout (cached: both ends derive the same public permutations from the seed)."""
        passes = len(sizes)
        perm_full, inv_full = base_permutations(frame_bits, passes, seed)
        frames = -(-n // frame_bits)
        nf = np.full(frames, frame_bits, dtype=np.int64)
        last = n - (frames - 1) * frame_bits
        nf[-1] = last
        if last == frame_bits:
            perm_last, inv_last = perm_full, inv_full
        else:
            perm_last = np.zeros((passes, frame_bits), dtype=np.int32)
            inv_last = np.zeros((passes, frame_bits), dtype=np.int32)
            for p in range(passes):
                kern.restrict_permutation(perm_full[p], last, perm_last[p], inv_last[p])
            perm_last.setflags(write=False)
            inv_last.setflags(write=False)
        nf.setflags(write=False)
        lazy_passes = tuple(p > 0 and 2 * k == frame_bits for p, k in enumerate(sizes))
        # A short last frame holds its bits in the first permuted positions: its blocks are capped
        # at half its own power-of-two span, or passes with half-frame blocks would see one block
        # (its parity already known) and never look into it.
        half_last = max(2, (1 << max(0, (last - 1).bit_length())) // 2)
        tops = np.array([[k] * (frames - 1) + [min(k, half_last)] for k in sizes], dtype=np.int64)
        tops.setflags(write=False)
        mask_full = full_frame_masks(frame_bits, sizes, seed)
        mask_last = half_masks(perm_last, lazy_passes, tops[:, -1], int(last))
        return Layout(
            n, frame_bits, sizes, seed, perm_full, inv_full, perm_last, inv_last, nf,
            lazy_passes, tops, mask_full, mask_last,
        )  # fmt: skip

    def perm_of_frame(self, f: int) -> I32Array:
        return self.perm_last if f == self.frames - 1 else self.perm_full

    def trees_of_pass(self, p: int) -> I32Array:
        """Tree index of every frame in pass ``p`` (pass-major numbering, see ``_cascade_tree``)."""
        return np.arange(p * self.frames, (p + 1) * self.frames, dtype=np.int32)


def half_masks(perm: I32Array, lazy_passes: tuple[bool, ...], tops: I64Array, n_f: int) -> I64Array:
    """For each lazy pass, the frame positions (of ``n_f`` real ones) its permutation sends into
    the first top-level block, packed in original order (64 to a word, LSB first); zero for eager
    passes."""
    out = np.zeros((len(lazy_passes), perm.shape[1] // 64), dtype=np.int64)
    for p, is_lazy in enumerate(lazy_passes):
        if is_lazy:
            lazy.first_block_mask(perm[p], int(tops[p]), n_f, out[p])
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=4)
def full_frame_masks(frame_bits: int, sizes: tuple[int, ...], seed: int) -> I64Array:
    """The lazy passes' masks of a full frame (cached: they do not depend on the key length)."""
    perm_full, _ = base_permutations(frame_bits, len(sizes), seed)
    lazy_passes = tuple(p > 0 and 2 * k == frame_bits for p, k in enumerate(sizes))
    return half_masks(perm_full, lazy_passes, np.asarray(sizes, dtype=np.int64), frame_bits)


def pack_frames(bits: U8Array, frame_bits: int) -> I64Array:
    """Bits packed 64 to an int64 word in original order, one row per frame (zero padding)."""
    frames = -(-bits.shape[0] // frame_bits)
    padded = np.zeros(frames * frame_bits, dtype=np.uint8)
    padded[: bits.shape[0]] = bits
    words = np.packbits(padded, bitorder="little").view(np.dtype("<i8"))
    return words.astype(np.int64).reshape(frames, frame_bits // 64)


def frame_size(n: int, max_frame_bits: int) -> int:
    """Frame size: the smallest power of two >= n (at least 64), capped at ``max_frame_bits``."""
    return min(max_frame_bits, max(64, 1 << max(0, (n - 1).bit_length())))
