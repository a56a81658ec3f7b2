"""numba kernels behind :mod:`.gates`: two samplers of detectors with dead time and afterpulsing.

Shared conventions. Gates ``0 .. n_gates - 1``; detector d re-arms at ``rearm[d]`` (it registered
its last click at ``rearm[d] - 1 - dead_gates``) and has a pending afterpulse at ``pending[d]``
(``NEVER`` if none). A registered click on d sets ``rearm[d] = t + 1 + dead_gates``, drops d's
pending afterpulse (the new avalanche empties the traps) and, with probability ``afterpulse_prob``,
schedules one at ``rearm[d]`` plus an exponential delay of mean ``afterpulse_delay_gates`` (floor).
A pending afterpulse therefore always falls on a live detector. A registered gate is written as
(category, registered detectors | AFTERPULSE_FLAG when an afterpulse fired a detector the gate's
own light did not). Categories are drawn with Walker alias tables (rows as in ``GateLaw``).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import numpy.typing as npt

NEVER = np.int64(1) << np.int64(62)
FLAG = 0x80
_TO_UNIT = 1.0 / 9007199254740992.0  # 2^-53


@numba.njit(cache=True, inline="always")
def uniform(s: npt.NDArray[np.uint64]) -> float:
    """A double in [0, 1) from xoshiro256+ (Blackman, Vigna, ACM TOMS 47 (2021) 36), top 53 bits.

    Why not the caller's Generator inside the kernel: its ``random()`` costs ~6 ns from numba
    against ~1.5 ns here, and the kernels draw two or three per registered click. The state is
    seeded from the caller's Generator (:func:`.gates.kernel_state`), so a block stays reproducible.
    """
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    out = s0 + s3
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = (s3 << np.uint64(45)) | (s3 >> np.uint64(19))
    s[0], s[1], s[2], s[3] = s0, s1, s2, s3
    return float(out >> np.uint64(11)) * _TO_UNIT


@numba.njit(cache=True, inline="always")
def _alias(
    rng: npt.NDArray[np.uint64], prob: npt.NDArray[np.float64], idx: npt.NDArray[np.int64], row: int
) -> int:
    k = prob.shape[1]
    x = uniform(rng) * k
    i = int(x)
    if i >= k:
        i = k - 1
    return i if x - i < prob[row, i] else int(idx[row, i])


@numba.njit(cache=True, inline="always")
def _geometric(
    rng: npt.NDArray[np.uint64],
    cdf: npt.NDArray[np.float64],
    guide: npt.NDArray[np.int64],
    row: int,
    inv_log_miss: float,
) -> np.int64:
    """Failures before the first success, P(g) = p (1 - p)^g: table inversion with a guide table.

    ``cdf[row, j] = 1 - (1 - p)^(j + 1)`` for j < J, ``guide[row, b]`` the first j with
    ``cdf > b / M``; past the table, g - J is again geometric (memoryless) and drawn with a log.
    """
    u = uniform(rng)
    n_cdf = cdf.shape[1]
    j = guide[row, int(u * guide.shape[1])]
    while j < n_cdf and cdf[row, j] <= u:
        j += 1
    if j < n_cdf:
        return np.int64(j)
    return np.int64(n_cdf) + np.int64(math.floor(math.log1p(-uniform(rng)) * inv_log_miss))


@numba.njit(cache=True, inline="always")
def _register(
    rng: npt.NDArray[np.uint64],
    reg: int,
    t: np.int64,
    n_det: int,
    dead_gates: int,
    ap_prob: float,
    ap_delay: float,
    rearm: npt.NDArray[np.int64],
    pending: npt.NDArray[np.int64],
) -> None:
    for d in range(n_det):
        if (reg >> d) & 1:
            rearm[d] = t + 1 + dead_gates
            pending[d] = NEVER
            if ap_prob > 0.0 and uniform(rng) < ap_prob:
                delay = 0
                if ap_delay > 0.0:
                    delay = int(-ap_delay * math.log(1.0 - uniform(rng)))
                pending[d] = rearm[d] + delay


@numba.njit(cache=True)
def walk_arrivals(
    rng: npt.NDArray[np.uint64],
    n_gates: int,
    n_det: int,
    dead_gates: int,
    ap_prob: float,
    ap_delay: float,
    p_hit: npt.NDArray[np.float64],
    alias_prob: npt.NDArray[np.float64],
    alias_idx: npt.NDArray[np.int64],
    hit: npt.NDArray[np.uint8],
    geo_cdf: npt.NDArray[np.float64],
    geo_guide: npt.NDArray[np.int64],
    out_cat: npt.NDArray[np.int16],
    out_mask: npt.NDArray[np.uint8],
    quiet: npt.NDArray[np.int64],
    known: npt.NDArray[np.int64],
) -> int:
    """Jump from registered click to registered click; returns the number written, -1 if out of room.

    With live set A fixed until ``horizon`` (next re-arm or afterpulse), the gap to the next gate
    that fires a live detector is geometric with ``p_hit[A]``; if it reaches the horizon, the gates
    before it are only counted in ``quiet[A]`` (memorylessness makes the gates after it fresh).
    """
    n_masks = 1 << n_det
    inv_log_miss = np.zeros(n_masks)
    for a in range(1, n_masks):
        if 0.0 < p_hit[a] < 1.0:
            inv_log_miss[a] = 1.0 / math.log1p(-p_hit[a])
    rearm = np.zeros(n_det, dtype=np.int64)
    pending = np.full(n_det, NEVER, dtype=np.int64)
    capacity = out_cat.shape[0]
    n = 0
    t = np.int64(0)
    while t < n_gates:
        live = 0
        horizon = np.int64(n_gates)
        for d in range(n_det):
            if rearm[d] <= t:
                live |= 1 << d
            elif rearm[d] < horizon:
                horizon = rearm[d]
            if pending[d] < horizon:
                horizon = pending[d]
        if horizon == t:  # an afterpulse fires now (on a live detector): the gate itself is fresh
            k = _alias(rng, alias_prob, alias_idx, 0)
            ap = 0
            for d in range(n_det):
                if pending[d] == t:
                    ap |= 1 << d
                    pending[d] = NEVER
            reg = (int(hit[k]) | ap) & live
            if n >= capacity:
                return -1
            out_cat[n] = k
            out_mask[n] = reg | (FLAG if ap & live & ~int(hit[k]) else 0)
            n += 1
            _register(rng, reg, t, n_det, dead_gates, ap_prob, ap_delay, rearm, pending)
            t += 1
            continue
        if p_hit[live] > 0.0:
            g = _geometric(rng, geo_cdf, geo_guide, live, inv_log_miss[live])
            if g < horizon - t:
                quiet[live] += g
                t += g
                k = _alias(rng, alias_prob, alias_idx, live)
                reg = int(hit[k]) & live
                if n >= capacity:
                    return -1
                out_cat[n] = k
                out_mask[n] = reg
                n += 1
                _register(rng, reg, t, n_det, dead_gates, ap_prob, ap_delay, rearm, pending)
                t += 1
                continue
        quiet[live] += horizon - t
        t = horizon
    return n


@numba.njit(cache=True)
def walk_time_ordered(
    rng: npt.NDArray[np.uint64],
    n_gates: int,
    n_det: int,
    dead_gates: int,
    ap_prob: float,
    ap_delay: float,
    p_hit: npt.NDArray[np.float64],
    alias_prob: npt.NDArray[np.float64],
    alias_idx: npt.NDArray[np.int64],
    hit: npt.NDArray[np.uint8],
    geo_cdf: npt.NDArray[np.float64],
    geo_guide: npt.NDArray[np.int64],
    out_cat: npt.NDArray[np.int16],
    out_mask: npt.NDArray[np.uint8],
    quiet: npt.NDArray[np.int64],
    known: npt.NDArray[np.int64],
) -> int:
    """The reference: every would-click gate (any detector, dead or alive) in time order.

    Would-click gates form a Bernoulli process (geometric gaps with ``p_hit[all]``); each one's
    category comes from the law given a hit, an afterpulse-only gate's from the law given no hit.
    Would-clicks lost to dead time go to ``known``; all other silent gates to ``quiet[all]``.
    Gaps are drawn by plain inversion with a log (``geo_cdf``, ``geo_guide`` are unused: the
    reference shares no sampling shortcut with :func:`walk_arrivals`).
    """
    full = (1 << n_det) - 1
    p = p_hit[full]
    log_miss = math.log1p(-p) if p < 1.0 else -np.inf
    rearm = np.zeros(n_det, dtype=np.int64)
    pending = np.full(n_det, NEVER, dtype=np.int64)
    capacity = out_cat.shape[0]
    n = 0
    seen = np.int64(0)

    def next_event(after: np.int64) -> np.int64:
        if p <= 0.0:
            return NEVER
        gap = np.int64(1)
        if log_miss > -np.inf:
            gap += np.int64(math.floor(math.log1p(-uniform(rng)) / log_miss))
        return after + gap

    t_ev = next_event(np.int64(-1))
    while True:
        t = t_ev
        for d in range(n_det):
            if pending[d] < t:
                t = pending[d]
        if t >= n_gates:
            break
        seen += 1
        ap = 0
        live = 0
        for d in range(n_det):
            if pending[d] == t:
                ap |= 1 << d
                pending[d] = NEVER
            if rearm[d] <= t:
                live |= 1 << d
        if t == t_ev:
            k = _alias(rng, alias_prob, alias_idx, full)
            t_ev = next_event(t)
        else:
            k = _alias(rng, alias_prob, alias_idx, full + 1)
        reg = (int(hit[k]) | ap) & live
        if reg == 0:
            known[k] += 1
            continue
        if n >= capacity:
            return -1
        out_cat[n] = k
        out_mask[n] = reg | (FLAG if ap & live & ~int(hit[k]) else 0)
        n += 1
        _register(rng, reg, t, n_det, dead_gates, ap_prob, ap_delay, rearm, pending)
    quiet[full] = n_gates - seen
    return n
