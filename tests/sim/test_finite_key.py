"""Finite-key length (Lim, Curty, Walenta, Xu, Zbinden, PRA 89, 022307 (2014))."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from qkd_adapters.sim import analytic
from qkd_adapters.sim.finite_key import gamma_sampling, hoeffding_delta, secret_key_length
from qkd_adapters.sim.params import LinkParameters
from qkd_adapters.sim.physics.bb84 import simulate_bb84_block


def _length(p: LinkParameters, n_pulses: float, key_from: str = "signal") -> tuple[int, float]:
    c = analytic.expected_counts(p, n_pulses)
    n_key = c.detected[0, 0] if key_from == "signal" else c.n_z
    e = c.qber(0, 0)
    leak = int(p.ec_inefficiency * n_key * analytic.h2(e))
    res = secret_key_length(c, leak, p.eps_sec, p.eps_cor, key_from=key_from)  # type: ignore[arg-type]
    return res.length, res.length / n_pulses


def test_long_blocks_approach_asymptotic_rate(gys_ghz: LinkParameters) -> None:
    asym = analytic.key_rate_weak_vacuum(gys_ghz, include_vacuum_term=True)
    rates = [_length(gys_ghz, n)[1] for n in (1e8, 1e9, 1e10, 1e12, 1e16)]
    assert rates[0] == 0  # 0.1 s at 1 GHz is too short for 25 km GYS
    assert all(a <= b for a, b in itertools.pairwise(rates))
    assert all(r < asym for r in rates)
    assert rates[-1] == pytest.approx(asym, rel=0.01)
    assert rates[1] < 0.5 * asym


def test_all_intensity_variant_also_converges(gys_ghz: LinkParameters) -> None:
    signal = _length(gys_ghz, 1e16, "signal")[1]
    every = _length(gys_ghz, 1e16, "all")[1]
    assert every > signal  # decoy Z events add key


def test_bounds_bracket_the_true_single_photon_counts(
    gys_ghz: LinkParameters, rng: np.random.Generator
) -> None:
    n = 4 * 10**9
    block = simulate_bb84_block(gys_ghz, n, rng)
    leak = int(1.22 * block.alice_key.size * analytic.h2(block.qber_z))
    res = secret_key_length(block, leak, 1e-10, 1e-15)
    assert res.length > 0 and res.abort_reason is None
    y1, e1 = analytic.single_photon_yield_error(gys_ghz)
    mu = gys_ghz.mu
    true_s1 = n * gys_ghz.p_z**2 * gys_ghz.p_mu * mu * math.exp(-mu) * y1
    true_s0 = n * gys_ghz.p_z**2 * gys_ghz.p_mu * math.exp(-mu) * gys_ghz.y0
    assert 0.7 * true_s1 < res.s_z1 < true_s1
    assert res.s_z0 < true_s0
    assert e1 < res.phi_z < 0.2
    assert res.length < block.alice_key.size
    assert res.length < analytic.key_rate_weak_vacuum(gys_ghz, include_vacuum_term=True) * n


def test_leakage_reduces_length_one_for_one(gys_ghz: LinkParameters) -> None:
    c = analytic.expected_counts(gys_ghz, 1e10)
    a = secret_key_length(c, 100_000, 1e-10, 1e-15)
    b = secret_key_length(c, 150_000, 1e-10, 1e-15)
    assert a.length - b.length in (49_999, 50_000, 50_001)


def test_tighter_epsilon_costs_key(gys_ghz: LinkParameters) -> None:
    c = analytic.expected_counts(gys_ghz, 1e10)
    loose = secret_key_length(c, 10**6, 1e-6, 1e-15).length
    tight = secret_key_length(c, 10**6, 1e-14, 1e-15).length
    assert tight < loose


def test_helpers() -> None:
    assert hoeffding_delta(200.0, math.exp(-1.0)) == pytest.approx(10.0)
    assert gamma_sampling(1e-10, 0.02, 1e6, 1e6) > gamma_sampling(1e-10, 0.02, 1e8, 1e8) > 0


def test_invalid_inputs(gys_ghz: LinkParameters) -> None:
    c = analytic.expected_counts(gys_ghz, 1e9)
    with pytest.raises(ValueError):
        secret_key_length(c, -1, 1e-10, 1e-15)
    with pytest.raises(ValueError):
        secret_key_length(c, 0, 0.0, 1e-15)
    with pytest.raises(ValueError):
        secret_key_length(c, 0, 1e-10, 1e-15, key_from="bogus")  # type: ignore[arg-type]


def test_empty_block_aborts(gys_ghz: LinkParameters, rng: np.random.Generator) -> None:
    block = simulate_bb84_block(gys_ghz.with_overrides(length_km=300.0), 10**6, rng)
    res = secret_key_length(block, 0, 1e-10, 1e-15)
    assert res.length == 0 and res.abort_reason is not None
