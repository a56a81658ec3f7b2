"""Closed-form gains, error rates and asymptotic key rates of decoy-state BB84.

Formulas follow Ma, Qi, Zhao, Lo, "Practical decoy state for quantum key distribution",
PRA 72, 012326 (2005) (MQZL below): the gain and QBER of a weak coherent source through a
lossy channel (their Eqs. 8-9), the GLLP key rate with infinitely many decoys, and the
vacuum + weak decoy bounds on the single-photon yield Y1 and error e1 (their Eqs. 34 and 37).
The PLOB bound is the repeaterless capacity -log2(1 - eta) of a pure-loss channel (Pirandola,
Laurenza, Ottaviani, Banchi, Nat. Commun. 8, 15043 (2017)).

Rates are *per pulse* unless a name says ``per_second``. ``sift`` is the fraction of pulses
whose basis choices make them key candidates: 1/2 for MQZL's symmetric BB84, and
``p_mu * p_z**2`` for this project's protocol, which distils key from signal Z-Z events only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from qkd_adapters.sim.params import LinkParameters
from qkd_adapters.sim.physics.bb84 import class_model
from qkd_adapters.sim.physics.counts import DecoyCounts, Z
from qkd_adapters.sim.physics.detector import click_patterns
from qkd_adapters.sim.physics.eve import Eavesdropper, honest_branches

E0 = 0.5  # error rate of a random (dark-count) click


def h2(x: float) -> float:
    """Binary entropy in bits; 0 at 0 and 1, clipped outside [0, 1]."""
    if x <= 0.0 or x >= 1.0:
        return 0.0
    return -x * math.log2(x) - (1.0 - x) * math.log2(1.0 - x)


def default_sift(params: LinkParameters) -> float:
    """Fraction of pulses that are signal-intensity Z-Z key candidates in this protocol."""
    return params.p_mu * params.p_z**2


def gain(params: LinkParameters, mu: float) -> float:
    """MQZL Eq. 8: Q_mu = Y0 + 1 - exp(-eta mu)."""
    return params.y0 + 1.0 - math.exp(-params.transmittance * mu)


def qber(params: LinkParameters, mu: float) -> float:
    """MQZL Eq. 9: E_mu = (e0 Y0 + e_d (1 - exp(-eta mu))) / Q_mu."""
    return (E0 * params.y0 + params.misalignment * -math.expm1(-params.transmittance * mu)) / gain(params, mu)


def exact_gain_qber(params: LinkParameters, mu: float, same_basis: bool = True) -> tuple[float, float]:
    """Gain and QBER of the simulator's per-photon detector model (equal to MQZL to O((eta mu)^3))."""
    pat = sum(
        (
            br.weight * click_patterns(br.p_any, br.p_c, br.p_w, params.dark_count_prob)
            for br in honest_branches(params, mu, same_basis)
        ),
        np.zeros(4),
    )
    q = float(1.0 - pat[0])
    return q, float(pat[2] + 0.5 * pat[3]) / q


def single_photon_yield_error(params: LinkParameters) -> tuple[float, float]:
    """Y1 = 1 - (1 - Y0)(1 - eta) and e1 = (e0 Y0 + e_d eta) / Y1 (MQZL Eqs. 5, 7 and 10)."""
    eta = params.transmittance
    y1 = 1.0 - (1.0 - params.y0) * (1.0 - eta)
    return y1, (E0 * params.y0 + params.misalignment * eta) / y1


def key_rate_infinite_decoy(
    params: LinkParameters, mu: float | None = None, sift: float | None = None
) -> float:
    """GLLP rate with perfectly estimated Y1, e1: q {-Q f h(E) + Q1 [1 - h(e1)]} (MQZL Eq. 1)."""
    mu = params.mu if mu is None else mu
    q = default_sift(params) if sift is None else sift
    y1, e1 = single_photon_yield_error(params)
    q_mu, e_mu = gain(params, mu), qber(params, mu)
    q1 = y1 * mu * math.exp(-mu)
    return q * (-q_mu * params.ec_inefficiency * h2(e_mu) + q1 * (1.0 - h2(e1)))


def weak_vacuum_bounds(
    q_mu: float, q_nu: float, e_nu: float, y0: float, mu: float, nu: float
) -> tuple[float, float]:
    """MQZL Eqs. 34 and 37: lower bound on Y1 and upper bound on e1 from a weak and a vacuum decoy."""
    y1_low = (
        mu
        / (mu * nu - nu * nu)
        * (
            q_nu * math.exp(nu)
            - q_mu * math.exp(mu) * nu * nu / (mu * mu)
            - (mu * mu - nu * nu) / (mu * mu) * y0
        )
    )
    if y1_low <= 0.0:
        return y1_low, 0.5
    e1_up = (e_nu * q_nu * math.exp(nu) - E0 * y0) / (y1_low * nu)
    return y1_low, min(max(e1_up, 0.0), 0.5)


def key_rate_weak_vacuum(
    params: LinkParameters,
    mu: float | None = None,
    nu: float | None = None,
    sift: float | None = None,
    include_vacuum_term: bool = False,
) -> float:
    """Rate with Y1, e1 bounded by a weak (nu) and a vacuum decoy, asymptotic (MQZL Sec. V-B).

    ``include_vacuum_term`` adds the vacuum contribution Y0 e^-mu (as in Lim et al. 2014).
    """
    mu = params.mu if mu is None else mu
    nu = params.nu if nu is None else nu
    q = default_sift(params) if sift is None else sift
    q_mu, e_mu = gain(params, mu), qber(params, mu)
    q_nu, e_nu = gain(params, nu), qber(params, nu)
    y1_low, e1_up = weak_vacuum_bounds(q_mu, q_nu, e_nu, params.y0, mu, nu)
    q1 = max(y1_low, 0.0) * mu * math.exp(-mu)
    vac = params.y0 * math.exp(-mu) if include_vacuum_term else 0.0
    return q * (vac - q_mu * params.ec_inefficiency * h2(e_mu) + q1 * (1.0 - h2(e1_up)))


def plob_bound(eta: float) -> float:
    """Repeaterless secret-key capacity of a pure-loss channel, bits per channel use."""
    return -math.log2(1.0 - eta) if eta < 1.0 else math.inf


def plob_bound_for(params: LinkParameters) -> float:
    """PLOB bound for the link's channel transmittance (fibre and insertion loss)."""
    return plob_bound(params.channel_transmittance)


def rate_per_second(rate_per_pulse: float, params: LinkParameters) -> float:
    """Per-pulse rate times the clock rate."""
    return rate_per_pulse * params.clock_rate_hz


def optimal_mu(
    params: LinkParameters,
    protocol: str = "infinite",
    nu: float | None = None,
    bounds: tuple[float, float] = (1e-3, 1.5),
) -> tuple[float, float]:
    """(mu, rate) maximising the asymptotic rate at the link's length."""

    def rate(mu: float) -> float:
        return _protocol_rate(params, protocol, mu, nu)

    res = minimize_scalar(lambda m: -rate(m), bounds=bounds, method="bounded", options={"xatol": 1e-5})
    return float(res.x), rate(float(res.x))


def max_distance(
    params: LinkParameters,
    protocol: str = "infinite",
    nu: float | None = None,
    optimise_mu: bool = True,
    upper_km: float = 400.0,
) -> float:
    """Largest fibre length (km) with a positive asymptotic rate (mu re-optimised at each length)."""

    def best(length: float) -> float:
        p = replace(params, length_km=length)
        if optimise_mu:
            return optimal_mu(p, protocol, nu)[1]
        return _protocol_rate(p, protocol, p.mu, nu)

    if best(0.0) <= 0.0:
        return 0.0
    hi = upper_km
    if best(hi) > 0.0:
        return hi
    lo = 0.0
    # step out until the sign changes, then refine
    step = 10.0
    length = 0.0
    while length < hi and best(length + step) > 0.0:
        length += step
    lo, hi = length, min(length + step, upper_km)
    return float(brentq(best, lo, hi, xtol=1e-4))


def _protocol_rate(params: LinkParameters, protocol: str, mu: float, nu: float | None) -> float:
    if protocol == "infinite":
        return key_rate_infinite_decoy(params, mu=mu, sift=0.5)
    if protocol == "weak_vacuum":
        nu_eff = params.nu if nu is None else nu
        if nu_eff >= mu:
            return -1.0
        return key_rate_weak_vacuum(params, mu=mu, nu=nu_eff, sift=0.5)
    raise ValueError(f"unknown protocol {protocol!r}")


def expected_counts(params: LinkParameters, n_pulses: float, eve: Eavesdropper | None = None) -> DecoyCounts:
    """Expected DecoyCounts for n_pulses (floats), from the simulator's exact class model."""
    model = class_model(params, eve)
    w = model.weights / model.weights.sum()
    sent = n_pulses * w
    det = sent * model.detect_prob
    pat = model.patterns.sum(axis=1)
    err = sent * (pat[:, 2] + 0.5 * pat[:, 3])
    return DecoyCounts.from_classes(
        params.intensities, params.intensity_probabilities, params.p_z, sent, det, err
    )


def asymptotic_rate_from_counts(
    counts: DecoyCounts, ec_inefficiency: float, y0: float | None = None
) -> float:
    """MQZL weak+vacuum rate per pulse, with gains and QBERs read off (simulated) counts.

    Key is the signal Z-Z events; e1 is bounded from the weak decoy's X-basis errors (the phase
    error of the key). ``y0`` defaults to the observed vacuum-decoy gain.
    """
    mu, nu, _ = counts.intensities
    q_mu, q_nu = counts.gain(0), counts.gain(1)
    y0_obs = counts.gain(2) if y0 is None else y0
    e_mu = counts.qber(0, Z)
    e_nu_x = counts.qber(1, 1)
    y1_low, e1_up = weak_vacuum_bounds(q_mu, q_nu, e_nu_x, y0_obs, mu, nu)
    sift = counts.probabilities[0] * counts.p_z**2
    q1 = max(y1_low, 0.0) * mu * math.exp(-mu)
    return sift * (-q_mu * ec_inefficiency * h2(e_mu) + q1 * (1.0 - h2(e1_up)))


RateFunction = Callable[[LinkParameters], float]
