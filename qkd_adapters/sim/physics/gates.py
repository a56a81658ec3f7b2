"""Detectors with memory (dead time, afterpulsing) over a block of i.i.d. gates: the shared sampler.

A protocol describes one gate by a finite set of *categories* (for BB84: class, Eve's flag, click
pattern, Alice's bit; for BBM92: setting pair and the 16-detector pattern), each with a probability
and the set of detectors its light or dark counts would fire (its *hit mask*). Gates are i.i.d., so
the only coupling between them is each detector's memory: non-paralysable dead time of
``dead_gates`` gates after a registered click, and afterpulses (see :mod:`.detector`).

Two samplers of the same law (docs/PHYSICS.md, "Detectors with memory"):

* ``"arrivals"`` (default): while the set A of live detectors is fixed, the next gate that fires a
  live detector is a geometric gap with ``P(hit & A != 0)``; gates up to the next re-arm or
  afterpulse with no such hit are skipped in one step and only counted. Work is proportional to the
  *registered* clicks, not to the photon arrivals a dead detector ignores.
* ``"time-ordered"``: the reference - visits every gate at which any detector would fire.

Both return the registered gates in time order (category and registered detectors) and enough
counts to recover the categories of all other gates by multinomial draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from qkd_adapters.sim.physics.dead_time_kernels import walk_arrivals, walk_time_ordered
from qkd_adapters.sim.physics.pair_walk import walk_pair

Sampler = Literal["arrivals", "time-ordered"]
SAMPLERS: tuple[Sampler, ...] = ("arrivals", "time-ordered")
AFTERPULSE_FLAG = 0x80  # set in a registered gate's mask when an afterpulse made a silent detector click
GEO_TABLE = 512  # geometric gaps below this come from a table (with a guide table of GEO_GUIDE cells)
GEO_GUIDE = 1024

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def _alias_table(weights: FloatArray) -> tuple[FloatArray, IntArray]:
    """Walker/Vose alias table: one uniform draws a category in O(1)."""
    k = weights.shape[0]
    prob = np.ones(k)
    alias = np.arange(k, dtype=np.int64)
    total = float(weights.sum())
    if total <= 0.0:
        return prob, alias
    scaled = weights * (k / total)
    small = [i for i in range(k) if scaled[i] < 1.0]
    large = [i for i in range(k) if scaled[i] >= 1.0]
    while small and large:
        s, g = small.pop(), large.pop()
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] -= 1.0 - scaled[s]
        (small if scaled[g] < 1.0 else large).append(g)
    return prob, alias


@dataclass(frozen=True)
class GateLaw:
    """The law of one gate over categories, with the conditional tables both samplers draw from.

    Rows of ``alias_prob`` / ``alias_idx``: 0 = unconditional; ``A`` in 1 .. 2^D - 1 = conditional
    on ``hit & A != 0`` (a live detector of A fires); 2^D = conditional on no hit at all.
    ``p_hit[A]`` = P(hit & A != 0); ``geo_cdf[A]`` / ``geo_guide[A]`` tabulate the geometric gap
    with that parameter for :func:`.dead_time_kernels.walk_arrivals`.
    """

    n_det: int
    probs: FloatArray
    hit: npt.NDArray[np.uint8]
    p_hit: FloatArray
    alias_prob: FloatArray
    alias_idx: IntArray
    geo_cdf: FloatArray
    geo_guide: IntArray

    @classmethod
    def build(cls, probs: FloatArray, hit: npt.NDArray[np.integer], n_det: int) -> GateLaw:
        """Law from category probabilities (summing to 1) and hit masks over ``n_det`` detectors."""
        p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, None)
        p = p / p.sum()
        h = np.asarray(hit, dtype=np.uint8)
        n_masks = 1 << n_det
        rows = [p] + [p * ((h & a) != 0) for a in range(1, n_masks)] + [p * (h == 0)]
        tables = [_alias_table(r) for r in rows]
        p_hit = np.minimum(np.array([0.0] + [float(rows[a].sum()) for a in range(1, n_masks)]), 1.0)
        j = np.arange(1, GEO_TABLE + 1, dtype=np.float64)
        cdf = np.stack([-np.expm1(j * math.log1p(-q)) if q < 1.0 else np.ones(GEO_TABLE) for q in p_hit])
        cells = np.arange(GEO_GUIDE, dtype=np.float64) / GEO_GUIDE
        guide = np.stack([np.searchsorted(row, cells, side="right") for row in cdf]).astype(np.int64)
        return cls(
            n_det=n_det,
            probs=p,
            hit=h,
            p_hit=p_hit,
            alias_prob=np.stack([t[0] for t in tables]),
            alias_idx=np.stack([t[1] for t in tables]),
            geo_cdf=cdf,
            geo_guide=guide,
        )

    def click_prob(self, detector: int) -> float:
        """P(the gate fires ``detector``): its would-click probability per gate."""
        return float(self.p_hit[1 << detector])


@dataclass(frozen=True)
class Registered:
    """Registered gates in time order and the bookkeeping of the unregistered ones.

    ``cats[i]`` is the category of the i-th gate at which some detector registered a click,
    ``masks[i]`` the registered detectors (bit d) plus :data:`AFTERPULSE_FLAG`. ``quiet[A]`` counts
    gates skipped while the live set was A, known only to have no hit on A; ``known[k]`` counts
    unregistered gates of known category k (would-clicks lost to dead time, time-ordered sampler).
    ``state`` is the kernels' generator state after the walk, for the tally pass to go on from.
    """

    cats: npt.NDArray[np.int16]
    masks: npt.NDArray[np.uint8]
    quiet: IntArray
    known: IntArray
    state: npt.NDArray[np.uint64]

    def unregistered_categories(self, law: GateLaw, rng: np.random.Generator) -> IntArray:
        """Categories of every gate without a registered click (multinomial from each skip regime)."""
        out = self.known.copy()
        for a, n in enumerate(self.quiet):
            if n <= 0:
                continue
            w = law.probs if a == 0 else law.probs * ((law.hit & a) == 0)
            out += rng.multinomial(int(n), w / w.sum())
        return out

    def category_totals(self, law: GateLaw, rng: np.random.Generator) -> tuple[IntArray, IntArray]:
        """(every gate, unregistered gates) per category."""
        unreg = self.unregistered_categories(law, rng)
        reg = np.bincount(self.cats, minlength=law.probs.shape[0]).astype(np.int64)
        return reg + unreg, unreg


def kernel_state(rng: np.random.Generator) -> npt.NDArray[np.uint64]:
    """A fresh xoshiro256+ state for the numba kernels, drawn from ``rng`` (never all zero)."""
    state = rng.integers(0, 2**64, size=4, dtype=np.uint64, endpoint=False)
    state[0] |= np.uint64(1)
    return state


def _capacity(law: GateLaw, n_gates: int, dead_gates: int, afterpulse_prob: float) -> int:
    """Room for the registered gates: the renewal rate per detector, with margin."""
    rate = 0.0
    for d in range(law.n_det):
        q = law.click_prob(d)
        s = afterpulse_prob + (1.0 - afterpulse_prob) * q
        rate += 1.0 / (dead_gates + 1.0 + (1.0 - s) / q) if q > 0.0 else 0.0
    expected = min(float(n_gates), rate * n_gates * (1.0 + afterpulse_prob))
    return int(min(float(n_gates), 1.05 * expected + 10.0 * math.sqrt(expected) + 4096))


def register_clicks(
    law: GateLaw,
    n_gates: int,
    dead_gates: int,
    afterpulse_prob: float,
    afterpulse_delay_gates: float,
    rng: np.random.Generator,
    sampler: Sampler = "arrivals",
    *,
    fast_pair: bool = True,
) -> Registered:
    """Run ``n_gates`` gates through detectors with dead time and afterpulsing, drawing from ``rng``.

    Two detectors without afterpulsing take :func:`.pair_walk.walk_pair` unless ``fast_pair`` is
    false (the general walk: the same block bit for bit, slower; kept selectable for the tests).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}")
    walk = walk_arrivals if sampler == "arrivals" else walk_time_ordered
    pair = sampler == "arrivals" and law.n_det == 2 and afterpulse_prob == 0.0 and fast_pair
    capacity = _capacity(law, n_gates, dead_gates, afterpulse_prob)
    n_masks = 1 << law.n_det
    seed_rng = np.random.default_rng(rng.integers(0, 2**63))  # reruns (out of room) repeat the draws
    while True:
        cats = np.empty(capacity, dtype=np.int16)
        masks = np.empty(capacity, dtype=np.uint8)
        quiet = np.zeros(n_masks, dtype=np.int64)
        known = np.zeros(law.probs.shape[0], dtype=np.int64)
        state = kernel_state(seed_rng)
        if pair:
            n = walk_pair(
                state,
                n_gates,
                dead_gates,
                law.p_hit,
                law.alias_prob,
                law.alias_idx,
                law.hit,
                law.geo_cdf,
                law.geo_guide,
                cats,
                masks,
                quiet,
            )
        else:
            n = walk(
                state,
                n_gates,
                law.n_det,
                dead_gates,
                afterpulse_prob,
                afterpulse_delay_gates,
                law.p_hit,
                law.alias_prob,
                law.alias_idx,
                law.hit,
                law.geo_cdf,
                law.geo_guide,
                cats,
                masks,
                quiet,
                known,
            )
        if n >= 0:
            return Registered(cats=cats[:n], masks=masks[:n], quiet=quiet, known=known, state=state)
        capacity = min(2 * capacity, n_gates)
