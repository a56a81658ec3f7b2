"""The arrivals walk for the common case: two detectors without afterpulsing (BB84 on SNSPDs).

Why a second copy of :func:`.dead_time_kernels.walk_arrivals` (issue 17): that kernel keeps the
generator state and the re-arm times in arrays, which numba cannot keep in registers (any array
may alias any other), so every step stores and reloads them on the critical path. Here the
xoshiro256+ state, both re-arm times and the quiet counts are scalars. It makes the same draws in
the same order as the general walk and returns the same block bit for bit
(tests/sim/test_physics_dead_time.py holds the two to that), so it adds no new law to validate.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import numpy.typing as npt

from qkd_adapters.sim.physics.dead_time_kernels import _TO_UNIT

U64 = tuple[np.uint64, np.uint64, np.uint64, np.uint64]


@numba.njit(cache=True)
def _next(st: U64) -> tuple[float, U64]:
    """xoshiro256+ as :func:`.dead_time_kernels.uniform`, the state passed by value (LLVM inlines it)."""
    s0, s1, s2, s3 = st
    out = s0 + s3
    t = s1 << np.uint64(17)
    s2 ^= s0
    s3 ^= s1
    s1 ^= s2
    s0 ^= s3
    s2 ^= t
    s3 = (s3 << np.uint64(45)) | (s3 >> np.uint64(19))
    return float(out >> np.uint64(11)) * _TO_UNIT, (s0, s1, s2, s3)


@numba.njit(cache=True, error_model="numpy")
def walk_pair(
    rng: npt.NDArray[np.uint64],
    n_gates: int,
    dead_gates: int,
    p_hit: npt.NDArray[np.float64],
    alias_prob: npt.NDArray[np.float64],
    alias_idx: npt.NDArray[np.int64],
    hit: npt.NDArray[np.uint8],
    geo_cdf: npt.NDArray[np.float64],
    geo_guide: npt.NDArray[np.int64],
    out_cat: npt.NDArray[np.int16],
    out_mask: npt.NDArray[np.uint8],
    quiet: npt.NDArray[np.int64],
) -> int:
    """:func:`.dead_time_kernels.walk_arrivals` for ``n_det == 2``, ``ap_prob == 0`` (same arguments)."""
    st = (rng[0], rng[1], rng[2], rng[3])
    inv_log_miss = np.zeros(4)
    for a in range(1, 4):
        if 0.0 < p_hit[a] < 1.0:
            inv_log_miss[a] = 1.0 / math.log1p(-p_hit[a])
    n_cdf = geo_cdf.shape[1]
    n_guide = geo_guide.shape[1]
    n_cols = alias_prob.shape[1]
    end = np.int64(n_gates)
    capacity = out_cat.shape[0]
    r0 = np.int64(0)
    r1 = np.int64(0)
    q0 = np.int64(0)
    n = 0
    t = np.int64(0)
    while t < end:
        h0 = r0 if r0 > t else end
        h1 = r1 if r1 > t else end
        horizon = min(h0, h1, end)
        live = int(r0 <= t) | (int(r1 <= t) << 1)
        if live == 0:  # both dead: straight to the first re-arm
            q0 += horizon - t
            t = horizon
            continue
        span = horizon - t
        g = span
        if p_hit[live] > 0.0:
            u, st = _next(st)
            if span <= n_cdf and u >= geo_cdf[live, span - 1]:
                if u >= geo_cdf[live, n_cdf - 1]:
                    _, st = _next(st)  # the draw the general walk makes past its table
            else:
                j = geo_guide[live, int(u * n_guide)]
                while j < n_cdf and geo_cdf[live, j] <= u:
                    j += 1
                if j < n_cdf:
                    g = np.int64(j)
                else:
                    v, st = _next(st)
                    g = np.int64(n_cdf) + np.int64(math.floor(math.log1p(-v) * inv_log_miss[live]))
        if g < span:
            quiet[live] += g
            t += g
            x, st = _next(st)
            x *= n_cols
            i = min(int(x), n_cols - 1)
            other = int(alias_idx[live, i])
            k = i if x - i < alias_prob[live, i] else other
            reg = int(hit[k]) & live
            if n >= capacity:
                return -1
            out_cat[n] = k
            out_mask[n] = reg
            n += 1
            r = t + 1 + dead_gates
            r0 = r if reg & 1 else r0
            r1 = r if reg & 2 else r1
            t += 1
        else:
            quiet[live] += span
            t = horizon
    quiet[0] += q0
    rng[0], rng[1], rng[2], rng[3] = st
    return n
