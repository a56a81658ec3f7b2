"""Fibre channel and polarisation misalignment.

Loss is 10^(-alpha L / 10) for the fibre times the receiver's insertion loss; photons are lost
independently (a pure-loss channel), so a Poisson number of photons stays Poisson with its mean
scaled. Misalignment is a fixed polarisation error at Bob: every photon measured in the
matching basis lands in the wrong detector with probability ``e_d``, independently (the
per-photon version of the error model of Ma, Qi, Zhao, Lo, PRA 72, 012326 (2005)).
"""

from __future__ import annotations

import math


def fibre_transmittance(attenuation_db_per_km: float, length_km: float) -> float:
    """10^(-alpha L / 10)."""
    return math.pow(10.0, -attenuation_db_per_km * length_km / 10.0)


def db_to_transmittance(loss_db: float) -> float:
    """A loss in dB as a transmittance."""
    return math.pow(10.0, -loss_db / 10.0)


def bb84_correct_probability(misalignment: float, same_basis: bool) -> float:
    """Probability that one photon lands in the detector named by Alice's bit value."""
    return 1.0 - misalignment if same_basis else 0.5


def polarisation_agreement(misalignment: float, delta_deg: float) -> float:
    """P(same outcome) for analysers delta apart on a Phi+ pair: (1 + V cos 2 delta) / 2, V = 1 - 2 e_d."""
    visibility = 1.0 - 2.0 * misalignment
    return 0.5 * (1.0 + visibility * math.cos(math.radians(2.0 * delta_deg)))
