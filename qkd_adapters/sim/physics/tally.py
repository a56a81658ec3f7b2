"""numba passes that turn registered gates (:mod:`.gates`) into per-class counts and sifted key bits.

One pass over the registered gates in time order, so the key keeps the order of the clicks. A
double click on one party's pair of detectors is squashed to a fair coin (Lim et al., PRA 89,
022307 (2014), protocol step 2); detector 0 of a pair means bit 0. The coins come from the
kernels' generator state, which :func:`.gates.register_clicks` seeded from the caller's Generator.
"""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt

from qkd_adapters.sim.physics.dead_time_kernels import uniform

FLAG = 0x80

# BB84 category k = ((class * 2 + eve) * 4 + pattern) * 2 + alice_bit
BB84_CLASS_SHIFT = 4
# BBM92 category k = class * 16 + pattern (bit0, bit1: Alice's detectors; bit2, bit3: Bob's)
BBM92_CLASS_SHIFT = 4


@numba.njit(cache=True, inline="always")
def _bit(rng: npt.NDArray[np.uint64], pair: int) -> int:
    """Bit read from a pair of detectors: 0b01 -> 0, 0b10 -> 1, 0b11 -> fair coin."""
    if pair == 3:
        return 1 if uniform(rng) < 0.5 else 0
    return 1 if pair == 2 else 0


@numba.njit(cache=True)
def tally_bb84(
    rng: npt.NDArray[np.uint64],
    cats: npt.NDArray[np.int16],
    masks: npt.NDArray[np.uint8],
    key_class: int,
    detected: npt.NDArray[np.int64],
    errors: npt.NDArray[np.int64],
    out_alice: npt.NDArray[np.uint8],
    out_bob: npt.NDArray[np.uint8],
    out_eve: npt.NDArray[np.uint8],
    stats: npt.NDArray[np.int64],
) -> int:
    """Counts per class and the key-class bits; stats = [afterpulse gates, double clicks, det0, det1]."""
    nk = 0
    for i in range(cats.shape[0]):
        k = int(cats[i])
        m = int(masks[i])
        reg = m & 3
        c = k >> BB84_CLASS_SHIFT
        alice = k & 1
        if m & FLAG:
            stats[0] += 1
        if reg == 3:
            stats[1] += 1
        stats[2] += reg & 1
        stats[3] += reg >> 1
        bob = _bit(rng, reg)
        detected[c] += 1
        if bob != alice:
            errors[c] += 1
        if c == key_class:
            out_alice[nk] = alice
            out_bob[nk] = bob
            out_eve[nk] = (k >> 3) & 1
            nk += 1
    return nk


@numba.njit(cache=True)
def tally_bbm92(
    rng: npt.NDArray[np.uint64],
    cats: npt.NDArray[np.int16],
    masks: npt.NDArray[np.uint8],
    key_class: int,
    coincidences: npt.NDArray[np.int64],
    errors: npt.NDArray[np.int64],
    out_alice: npt.NDArray[np.uint8],
    out_bob: npt.NDArray[np.uint8],
    stats: npt.NDArray[np.int64],
) -> int:
    """Coincidences and errors per class and the key bits; stats = [afterpulse gates, clicks of det 0..3]."""
    nk = 0
    for i in range(cats.shape[0]):
        m = int(masks[i])
        reg = m & 15
        if m & FLAG:
            stats[0] += 1
        for d in range(4):
            stats[1 + d] += (reg >> d) & 1
        a_pair = reg & 3
        b_pair = reg >> 2
        if a_pair == 0 or b_pair == 0:
            continue
        c = int(cats[i]) >> BBM92_CLASS_SHIFT
        a = _bit(rng, a_pair)
        b = _bit(rng, b_pair)
        coincidences[c] += 1
        if a != b:
            errors[c] += 1
        if c == key_class:
            out_alice[nk] = a
            out_bob[nk] = b
            nk += 1
    return nk
