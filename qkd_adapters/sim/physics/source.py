"""Photon sources: phase-randomised weak coherent pulses and multimode SPDC pairs.

A phase-randomised coherent state of mean ``mu`` is a Poisson mixture of Fock states (Lo, Ma,
Chen, PRL 94, 230504 (2005)); decoy states are the same source at other intensities. The SPDC
source is modelled in the multimode limit, where the pair number is Poisson and every pair is an
independent Bell pair (for a single-mode source it would be thermal; see docs/PHYSICS.md).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def poisson_pmf(mean: float, n_max: int | None = None) -> FloatArray:
    """P(n) for n = 0..n_max of a Poisson law (n_max chosen so the tail is below 1e-18)."""
    if mean < 0.0:
        raise ValueError("mean photon number must be >= 0")
    if n_max is None:
        n_max = max(8, int(mean + 12.0 * math.sqrt(mean) + 30.0))
    n = np.arange(n_max + 1, dtype=np.float64)
    if mean == 0.0:
        out = np.zeros(n_max + 1)
        out[0] = 1.0
        return out
    log_p = -mean + n * math.log(mean) - np.array([math.lgamma(k + 1.0) for k in range(n_max + 1)])
    return np.asarray(np.exp(log_p), dtype=np.float64)


def multi_photon_probability(mean: float) -> float:
    """P(n >= 2) of a Poisson source, computed without cancellation."""
    return float(-math.expm1(-mean) - mean * math.exp(-mean))


def tau_n(intensities: tuple[float, ...], probabilities: tuple[float, ...], n: int) -> float:
    """Probability that Alice emits an n-photon state, sum_k p_k e^-k k^n / n! (Lim et al.)."""
    return float(
        sum(
            p * math.exp(-k) * k**n / math.factorial(n)
            for k, p in zip(intensities, probabilities, strict=True)
        )
    )
