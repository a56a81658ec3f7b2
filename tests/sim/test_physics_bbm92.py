"""BBM92: coincidences against closed form, CHSH S honest and under intercept-resend."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qkd_adapters.sim.params import load_preset, load_spdc
from qkd_adapters.sim.physics.bbm92 import (
    bbm92_model,
    coincidence_probability,
    expected_chsh,
    simulate_bbm92_block,
)
from qkd_adapters.sim.physics.eve import InterceptResend


def test_coincidence_rate_matches_closed_form(rng: np.random.Generator) -> None:
    # the closed form has no detector memory (dead time: tests/sim/test_physics_dead_time.py)
    p = load_preset("snspd-modern", length_km=20.0, dead_time_s=0.0)
    s = load_spdc("snspd-modern")
    block = simulate_bbm92_block(p, s, 10**8, rng)
    expected = coincidence_probability(p, s)
    observed = block.coincidences.sum() / block.sent.sum()
    assert observed == pytest.approx(expected, rel=5 / math.sqrt(block.coincidences.sum()))
    assert np.allclose(bbm92_model(p, s).coincidence_prob, expected, rtol=1e-9)


def test_ideal_pairs_reach_tsirelson_bound() -> None:
    p = load_preset("snspd-modern", length_km=0.0, dark_count_prob=0.0, misalignment=0.02)
    s = load_spdc("snspd-modern", mean_pairs=1e-4)
    assert expected_chsh(bbm92_model(p, s)) == pytest.approx(2 * math.sqrt(2) * (1 - 2 * 0.02), rel=2e-3)


def test_honest_chsh_is_2sqrt2_times_visibility(rng: np.random.Generator) -> None:
    p = load_preset("snspd-modern", length_km=20.0)
    s = load_spdc("snspd-modern")
    block = simulate_bbm92_block(p, s, 2 * 10**8, rng)
    visibility = 1 - 2 * block.qber_z
    sigma_v = 2 * math.sqrt(block.qber_z / block.coincidences[0, 0])
    assert abs(block.chsh_s - 2 * math.sqrt(2) * visibility) < 5 * math.hypot(
        block.chsh_sigma, 2.83 * sigma_v
    )
    assert block.chsh_s > 2.0 + 5 * block.chsh_sigma
    assert block.alice_key.shape == block.bob_key.shape == (int(block.coincidences[0, 0]),)
    assert int(np.count_nonzero(block.alice_key != block.bob_key)) == int(block.errors[0, 0])


def test_intercept_resend_destroys_violation(rng: np.random.Generator) -> None:
    p = load_preset("snspd-modern", length_km=20.0)
    s = load_spdc("snspd-modern")
    eve = InterceptResend(fraction=1.0)
    block = simulate_bbm92_block(p, s, 2 * 10**8, rng, eve)
    assert block.chsh_s < 2.0 - 5 * block.chsh_sigma
    assert block.chsh_s == pytest.approx(expected_chsh(bbm92_model(p, s, eve)), abs=5 * block.chsh_sigma)
    assert block.qber_z == pytest.approx(0.25, abs=0.02)
