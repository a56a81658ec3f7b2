"""Eavesdropping signatures: intercept-resend QBER, PNS caught by decoys, beam splitting bounded."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkd_adapters.sim import analytic
from qkd_adapters.sim.finite_key import secret_key_length
from qkd_adapters.sim.params import LinkParameters, load_preset
from qkd_adapters.sim.physics.bb84 import simulate_bb84_block
from qkd_adapters.sim.physics.counts import Z
from qkd_adapters.sim.physics.eve import BeamSplitting, InterceptResend, PhotonNumberSplitting, pns_tuning


def _leak(block_qber: float, n: int, f: float) -> int:
    return math.ceil(f * n * analytic.h2(block_qber))


def test_full_intercept_resend_gives_quarter_qber(rng: np.random.Generator) -> None:
    p = load_preset("gys", clock_rate_hz=1e9, length_km=10.0, misalignment=0.0)
    block = simulate_bb84_block(p, 10**9, rng, InterceptResend(fraction=1.0))
    n = block.detected[0, Z]
    assert abs(block.qber_z - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n) + 1e-3
    # Eve knows the bits where her basis was right: half of them
    assert block.eve_knows is not None
    assert block.eve_knows.mean() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_partial_intercept_resend_scales_qber(fraction: float, rng: np.random.Generator) -> None:
    p = load_preset("gys", clock_rate_hz=1e9, length_km=10.0, misalignment=0.0)
    block = simulate_bb84_block(p, 10**9, rng, InterceptResend(fraction=fraction, resend_mean_photons=p.mu))
    # Eve resends only when she saw a photon (probability s = 1 - e^-mu); a resent pulse has the
    # signal mean, so Bob's detections come from intercepted pulses in the share f s / (1 - f + f s),
    # and a quarter of those are errors
    seen = -math.expm1(-p.mu)
    share = fraction * seen / (1 - fraction + fraction * seen)
    n = block.detected[0, Z]
    assert abs(block.qber_z - share / 4) < 5 * math.sqrt(share / 4 / n) + 1e-3


def test_intercept_resend_aborts_finite_key(gys_ghz: LinkParameters, rng: np.random.Generator) -> None:
    block = simulate_bb84_block(gys_ghz, 10**9, rng, InterceptResend(fraction=1.0))
    res = secret_key_length(block, _leak(block.qber_z, block.alice_key.size, 1.22), 1e-10, 1e-15)
    assert res.length == 0 and res.abort_reason is not None


def test_pns_keeps_signal_statistics_but_decoys_catch_it(rng: np.random.Generator) -> None:
    p = load_preset("gys", clock_rate_hz=1e9, length_km=60.0)
    block_single, forward = pns_tuning(p)
    assert block_single == 1.0 and 0.0 < forward <= 1.0  # long link: all single photons blocked
    attacked = simulate_bb84_block(p, 2 * 10**9, rng, PhotonNumberSplitting())
    c = attacked.counts
    q_mu = analytic.gain(p, p.mu)
    assert abs(c.gain(0) - q_mu) < 5 * math.sqrt(q_mu / c.sent[0].sum())
    assert abs(attacked.qber_z - analytic.qber(p, p.mu)) < 0.005
    # the weak decoy's gain collapses relative to the honest one
    assert c.gain(1) < 0.5 * analytic.gain(p, p.nu)
    y1_low, _ = analytic.weak_vacuum_bounds(c.gain(0), c.gain(1), c.qber(1, 1), c.gain(2), p.mu, p.nu)
    assert y1_low <= 0.0
    assert analytic.asymptotic_rate_from_counts(c, p.ec_inefficiency) < 0.0
    res = secret_key_length(attacked, _leak(attacked.qber_z, attacked.alice_key.size, 1.22), 1e-10, 1e-15)
    assert res.length == 0 and res.s_z1 <= 0.0
    assert attacked.eve_knows is not None and attacked.eve_knows.mean() > 0.95
    # the same link without Eve yields key
    honest = simulate_bb84_block(p, 2 * 10**9, rng)
    assert analytic.asymptotic_rate_from_counts(honest.counts, p.ec_inefficiency) > 0.0


def test_beam_splitting_invisible_but_bounded_by_privacy_amplification(
    gys_ghz: LinkParameters, rng: np.random.Generator
) -> None:
    eve = BeamSplitting()
    block = simulate_bb84_block(gys_ghz, 2 * 10**9, rng, eve)
    c = block.counts
    q_mu = analytic.gain(gys_ghz, gys_ghz.mu)
    assert abs(c.gain(0) - q_mu) < 5 * math.sqrt(q_mu / c.sent[0].sum())
    assert block.eve_knows is not None
    tap = eve.tap(gys_ghz)
    expected_known = -math.expm1(-gys_ghz.mu * tap)
    n = block.eve_knows.size
    assert block.eve_knows.mean() == pytest.approx(expected_known, abs=5 * math.sqrt(0.25 / n))
    res = secret_key_length(block, _leak(block.qber_z, n, 1.22), 1e-10, 1e-15)
    assert res.length > 0
    # Eve's bits lie in the multi-photon part, which the bound never credits as secret
    assert int(block.eve_knows.sum()) <= n - res.s_z0 - res.s_z1


def test_beam_splitting_overtap_shows_as_loss(gys_ghz: LinkParameters, rng: np.random.Generator) -> None:
    block = simulate_bb84_block(gys_ghz, 10**9, rng, BeamSplitting(tap_fraction=0.9))
    honest_gain = analytic.gain(gys_ghz, gys_ghz.mu)
    assert block.counts.gain(0) < 0.5 * honest_gain
