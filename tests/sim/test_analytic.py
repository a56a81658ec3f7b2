"""Closed-form key rates: Ma, Qi, Zhao, Lo (PRA 72, 012326, 2005) for GYS, and the PLOB bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkd_adapters.sim import analytic
from qkd_adapters.sim.params import load_preset
from qkd_adapters.sim.physics.bb84 import simulate_bb84_block


def test_gys_at_zero_length_single_photon_quantities() -> None:
    p = load_preset("gys", length_km=0.0)
    # Q_mu, E_mu at mu = 0.48 and eta = eta_Bob = 0.045 from MQZL Eqs. 8-9
    assert analytic.gain(p, 0.48) == pytest.approx(1.7e-6 + 1 - math.exp(-0.045 * 0.48), rel=1e-6)
    assert analytic.gain(p, 0.48) == pytest.approx(2.1370e-2, rel=1e-4)
    assert analytic.qber(p, 0.48) == pytest.approx(3.3037e-2, rel=1e-4)
    y1, e1 = analytic.single_photon_yield_error(p)
    assert y1 * 0.48 * math.exp(-0.48) == pytest.approx(1.3367e-2, rel=1e-4)
    assert e1 == pytest.approx(3.3018e-2, rel=1e-4)
    assert analytic.key_rate_infinite_decoy(p, mu=0.48, sift=0.5) == pytest.approx(2.555e-3, rel=1e-3)


def test_gys_optimal_mu_near_half() -> None:
    mu, rate = analytic.optimal_mu(load_preset("gys", length_km=0.0))
    assert 0.45 < mu < 0.52 and rate > 0


def test_gys_maximum_distances_reproduce_ma_et_al() -> None:
    p = load_preset("gys")
    inf_fixed = analytic.max_distance(p.with_overrides(mu=0.48), "infinite", optimise_mu=False)
    inf_opt = analytic.max_distance(p, "infinite")
    wv = analytic.max_distance(p, "weak_vacuum", nu=0.1)
    wv_small = analytic.max_distance(p, "weak_vacuum", nu=0.01)
    # MQZL 2005: ~142 km with infinitely many decoys, ~140 km with vacuum + weak decoy
    assert inf_fixed == pytest.approx(142.0, abs=0.5)
    assert inf_opt == pytest.approx(142.2, abs=0.5)
    assert wv == pytest.approx(139.8, abs=0.5)
    # weak+vacuum approaches the infinite-decoy limit as nu -> 0 and never beats it
    assert wv < wv_small < inf_opt
    assert inf_opt - wv_small < 0.5


def test_rates_never_exceed_plob() -> None:
    for name in ("gys", "snspd-modern"):
        for length in np.linspace(0.0, 300.0, 31):
            p = load_preset(name, length_km=float(length))
            bound = analytic.plob_bound_for(p)
            for mu in (0.1, 0.5, 1.0):
                assert analytic.key_rate_infinite_decoy(p, mu=mu, sift=1.0) < bound
                assert analytic.key_rate_weak_vacuum(p, mu=mu, nu=mu / 4, sift=1.0) < bound


def test_plob_values() -> None:
    assert analytic.plob_bound(0.5) == pytest.approx(1.0)
    assert analytic.plob_bound(1e-3) == pytest.approx(1e-3 / math.log(2), rel=1e-3)
    assert analytic.rate_per_second(1e-4, load_preset("gys", clock_rate_hz=1e9)) == pytest.approx(1e5)


def test_weak_vacuum_rate_below_infinite_decoy() -> None:
    for length in (0.0, 50.0, 100.0, 130.0):
        p = load_preset("gys", length_km=length)
        assert analytic.key_rate_weak_vacuum(p) <= analytic.key_rate_infinite_decoy(p)


def test_asymptotic_rate_from_simulated_counts(rng: np.random.Generator) -> None:
    p = load_preset("gys", clock_rate_hz=1e9, length_km=25.0)
    block = simulate_bb84_block(p, 4 * 10**9, rng)
    mc = analytic.asymptotic_rate_from_counts(block.counts, p.ec_inefficiency)
    assert mc == pytest.approx(analytic.key_rate_weak_vacuum(p), rel=0.05)


def test_expected_counts_consistent_with_gains() -> None:
    p = load_preset("gys", length_km=40.0)
    c = analytic.expected_counts(p, 1e10)
    for k, mu in enumerate(p.intensities):
        assert c.gain(k) == pytest.approx(analytic.gain(p, mu), rel=1e-5)
    assert c.sent.sum() == pytest.approx(1e10)
