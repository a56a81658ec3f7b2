"""Monte Carlo decoy-state BB84 against closed forms (Ma, Qi, Zhao, Lo 2005) and detector models."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkd_adapters.sim import analytic
from qkd_adapters.sim.params import LinkParameters, load_preset
from qkd_adapters.sim.physics.bb84 import class_model, simulate_bb84_block
from qkd_adapters.sim.physics.counts import X, Z
from qkd_adapters.sim.physics.detector import registered_rate_dead_time


def _z(observed: float, expected: float, sigma: float) -> float:
    return abs(observed - expected) / sigma


@pytest.mark.parametrize("length_km", [0.0, 25.0, 60.0, 100.0])
def test_gain_and_qber_match_closed_forms(length_km: float, rng: np.random.Generator) -> None:
    p = load_preset("gys", clock_rate_hz=1e9, length_km=length_km)
    block = simulate_bb84_block(p, 2 * 10**9, rng)
    c = block.counts
    for k, mu in enumerate(p.intensities):
        sent = float(c.sent[k].sum())
        q = analytic.gain(p, mu)
        assert _z(c.gain(k), q, math.sqrt(q * (1 - q) / sent)) < 5.0
        e = analytic.qber(p, mu)
        for basis in (Z, X):
            n = float(c.detected[k, basis])
            if n < 1000:
                continue
            assert _z(c.qber(k, basis), e, math.sqrt(e * (1 - e) / n)) < 5.0


def test_per_photon_model_agrees_with_ma_et_al() -> None:
    for length in (0.0, 50.0, 120.0):
        p = load_preset("gys", length_km=length)
        for mu in (0.1, 0.48, 0.8):
            q, e = analytic.exact_gain_qber(p, mu)
            # exact: 1 - (1 - Y0) exp(-eta mu); MQZL's Y0 + 1 - exp(-eta mu) drops a Y0 * eta mu term
            assert q == pytest.approx(1 - (1 - p.y0) * math.exp(-p.transmittance * mu), rel=1e-12)
            assert q == pytest.approx(analytic.gain(p, mu), rel=1e-5)
            assert e == pytest.approx(analytic.qber(p, mu), rel=3e-3)


def test_block_contract_and_reproducibility(gys_ghz: LinkParameters) -> None:
    a = simulate_bb84_block(gys_ghz, 10**8, np.random.default_rng(7))
    b = simulate_bb84_block(gys_ghz, 10**8, np.random.default_rng(7))
    other = simulate_bb84_block(gys_ghz, 10**8, np.random.default_rng(8))
    assert a.alice_key.dtype == np.uint8 and a.bob_key.dtype == np.uint8
    assert a.alice_key.shape == a.bob_key.shape == (int(a.detected[0, Z]),)
    assert set(np.unique(a.alice_key)) <= {0, 1}
    assert int(np.count_nonzero(a.alice_key != a.bob_key)) == int(a.errors[0, Z])
    assert np.array_equal(a.alice_key, b.alice_key) and np.array_equal(a.bob_key, b.bob_key)
    assert not np.array_equal(a.alice_key[:1000], other.alice_key[:1000])
    assert int(a.sent.sum()) == 10**8
    assert a.duration_s == pytest.approx(0.1)
    assert a.x_errors == int(a.errors[:, X].sum())
    assert "alice_key" not in repr(a) and "bob_key" not in repr(a)
    # the key bits are balanced and the errors uncorrelated with the bit value
    assert abs(a.alice_key.mean() - 0.5) < 5 * 0.5 / math.sqrt(a.alice_key.size)


def test_time_ordered_path_matches_independent_path(
    gys_ghz: LinkParameters, rng: np.random.Generator
) -> None:
    # a negligible afterpulse probability forces the time-ordered sampler without changing the law
    p = gys_ghz.with_overrides(afterpulse_prob=1e-12)
    block = simulate_bb84_block(p, 10**9, rng)
    assert block.detector_clicks is not None
    c = block.counts
    q = analytic.gain(p, p.mu)
    assert _z(c.gain(0), q, math.sqrt(q / c.sent[0].sum())) < 5.0
    e = analytic.qber(p, p.mu)
    assert _z(c.qber(0, Z), e, math.sqrt(e / c.detected[0, Z])) < 5.0
    assert block.dead_time_losses == 0


def _would_click_per_detector(p: LinkParameters) -> float:
    m = class_model(p)
    w = m.weights / m.weights.sum()
    pat = m.patterns.sum(axis=1)
    return float(np.sum(w * (pat[:, 1] + pat[:, 2] + 2 * pat[:, 3])) / 2.0)


@pytest.mark.parametrize(("dead_ns", "p_ap"), [(25.0, 0.0), (10.0, 0.1)])
def test_dead_time_and_afterpulse_rates_follow_renewal_formula(
    dead_ns: float, p_ap: float, rng: np.random.Generator
) -> None:
    p = load_preset("snspd-modern", length_km=10.0, dead_time_s=dead_ns * 1e-9, afterpulse_prob=p_ap)
    n = 2 * 10**7
    block = simulate_bb84_block(p, n, rng)
    assert block.detector_clicks is not None
    q = _would_click_per_detector(p)
    expected = registered_rate_dead_time(q, p.dead_gates, p_ap)
    assert expected < 0.8 * q  # dead time matters in this regime
    for clicks in block.detector_clicks:
        assert clicks / n == pytest.approx(expected, rel=0.01)
    assert block.dead_time_losses > 0
    if p_ap > 0:
        assert block.afterpulse_gates > 0


def test_afterpulses_raise_qber_at_long_distance(rng: np.random.Generator) -> None:
    base = load_preset("gys", clock_rate_hz=1e9, length_km=100.0, dead_time_s=10e-9)
    clean = simulate_bb84_block(base, 10**9, rng)
    noisy = simulate_bb84_block(base.with_overrides(afterpulse_prob=0.05), 10**9, rng)
    assert noisy.qber_z > clean.qber_z + 3 * math.sqrt(clean.qber_z / clean.detected[0, Z])


@pytest.mark.slow
def test_large_block_is_routine(gys_ghz: LinkParameters, rng: np.random.Generator) -> None:
    block = simulate_bb84_block(gys_ghz, 10**10, rng)
    assert block.alice_key.size > 10**7
