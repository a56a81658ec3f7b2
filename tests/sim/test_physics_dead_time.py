"""Detectors with memory: the arrivals sampler against the time-ordered reference and closed forms.

Statistical tests, their tolerances stated:

* sampler agreement: for each statistic, 24 independent blocks per sampler and Welch's
  z = (mean_a - mean_b) / sqrt(var_a/24 + var_b/24), required |z| < 4.5 (two-sided p ~ 1e-5 per
  statistic for equal laws; the seeds are fixed, so the outcome is reproducible). A deliberately
  different law (one more dead gate) must give |z| > 10, so the test can see a real difference.
* closed forms: one detector with Bernoulli(q) would-clicks per gate and non-paralysable dead time
  of G gates registers q / (1 + q G) clicks per gate - with R = q f and tau = G / f exactly the
  textbook R / (1 + R tau) (Knoll, Radiation Detection and Measurement, 4th ed. 2010, ch. 4). The
  count over n gates is a renewal count, sd = sqrt(n var(X) / E[X]^3) for the inter-click
  interval X; required within 5 sd, from light loads to full saturation (q = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from qkd_adapters.sim.params import LinkParameters, SPDCParameters, load_preset, load_spdc
from qkd_adapters.sim.physics.bb84 import BB84Block, bb84_gate_law, class_model, simulate_bb84_block
from qkd_adapters.sim.physics.bbm92 import BBM92Block, bbm92_gate_law, bbm92_model, simulate_bbm92_block
from qkd_adapters.sim.physics.counts import X, Z
from qkd_adapters.sim.physics.detector import registered_rate_dead_time
from qkd_adapters.sim.physics.gates import SAMPLERS, GateLaw, Sampler, register_clicks

REPLICATES = 24
Z_TOLERANCE = 4.5


def _bb84_stats(b: BB84Block) -> dict[str, float]:
    assert b.detector_clicks is not None
    return {
        "clicks det 0": b.detector_clicks[0],
        "clicks det 1": b.detector_clicks[1],
        "lost to dead time": b.dead_time_losses,
        "afterpulse gates": b.afterpulse_gates,
        "double clicks": b.double_clicks,
        "sifted key": b.alice_key.size,
        "key errors": int(b.errors[0, Z]),
        "qber": b.qber_z,
        "signal X detections": int(b.detected[0, X]),
        "decoy Z detections": int(b.detected[1, Z]),
        "decoy X errors": int(b.errors[1, X]),
        "signal pulses": int(b.sent[0].sum()),
    }


def _bbm92_stats(b: BBM92Block) -> dict[str, float]:
    assert b.detector_clicks is not None
    out: dict[str, float] = {f"clicks det {d}": c for d, c in enumerate(b.detector_clicks)}
    out |= {
        "lost to dead time": b.dead_time_losses,
        "afterpulse gates": b.afterpulse_gates,
        "key coincidences": int(b.coincidences[0, 0]),
        "key errors": int(b.errors[0, 0]),
        "all coincidences": int(b.coincidences.sum()),
        "CHSH S": b.chsh_s,
    }
    return out


def _replicate(run: Callable[[np.random.Generator], dict[str, float]], seed: int) -> dict[str, np.ndarray]:
    rows = [run(np.random.default_rng([seed, i])) for i in range(REPLICATES)]
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}


def _welch_z(a: np.ndarray, b: np.ndarray) -> float:
    se = math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    diff = float(a.mean() - b.mean())
    return 0.0 if se == 0.0 and diff == 0.0 else abs(diff) / se if se > 0 else math.inf


def _assert_same_law(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    bad = {k: round(_welch_z(a[k], b[k]), 2) for k in a if _welch_z(a[k], b[k]) >= Z_TOLERANCE}
    assert not bad, f"samplers disagree beyond {Z_TOLERANCE} sigma: {bad}"


BB84_CASES = {
    "dead time only": {"dead_time_s": 25e-9},
    "afterpulses, zero delay": {"dead_time_s": 10e-9, "afterpulse_prob": 0.1},
    "afterpulses, 20 ns delay": {"dead_time_s": 25e-9, "afterpulse_prob": 0.08, "afterpulse_delay_s": 20e-9},
}


@pytest.mark.parametrize("case", list(BB84_CASES))
def test_bb84_arrivals_sampler_matches_time_ordered_reference(case: str) -> None:
    p = load_preset("snspd-modern", length_km=10.0, **BB84_CASES[case])
    n = 2 * 10**6

    def run(sampler: Sampler) -> Callable[[np.random.Generator], dict[str, float]]:
        return lambda rng: _bb84_stats(simulate_bb84_block(p, n, rng, sampler=sampler))

    fast, ref = _replicate(run("arrivals"), 1), _replicate(run("time-ordered"), 2)
    _assert_same_law(fast, ref)
    assert fast["lost to dead time"].mean() > 0.2 * fast["sifted key"].mean()  # memory matters here
    if "afterpulse_prob" in BB84_CASES[case]:
        assert fast["afterpulse gates"].mean() > 1000


def test_agreement_test_sees_one_dead_gate_of_difference() -> None:
    p = load_preset("snspd-modern", length_km=10.0)
    longer = p.with_overrides(dead_time_s=26e-9)
    a = _replicate(lambda rng: _bb84_stats(simulate_bb84_block(p, 2 * 10**6, rng)), 3)
    b = _replicate(
        lambda rng: _bb84_stats(simulate_bb84_block(longer, 2 * 10**6, rng, sampler="time-ordered")), 4
    )
    assert _welch_z(a["clicks det 0"], b["clicks det 0"]) > 10.0


def _bbm92_params() -> tuple[LinkParameters, SPDCParameters]:
    p = load_preset("snspd-modern", length_km=10.0, afterpulse_prob=0.05, afterpulse_delay_s=10e-9)
    return p, load_spdc("snspd-modern", mean_pairs=0.2)


def test_bbm92_arrivals_sampler_matches_time_ordered_reference() -> None:
    p, s = _bbm92_params()
    n = 4 * 10**6

    def run(sampler: Sampler) -> Callable[[np.random.Generator], dict[str, float]]:
        return lambda rng: _bbm92_stats(simulate_bbm92_block(p, s, n, rng, sampler=sampler))

    fast, ref = _replicate(run("arrivals"), 5), _replicate(run("time-ordered"), 6)
    _assert_same_law(fast, ref)
    assert fast["lost to dead time"].mean() > 0.1 * fast["all coincidences"].mean()
    assert fast["afterpulse gates"].mean() > 1000


def test_bbm92_dead_time_costs_coincidences_but_keeps_the_violation(rng: np.random.Generator) -> None:
    p, s = _bbm92_params()
    free = p.with_overrides(dead_time_s=0.0, afterpulse_prob=0.0)
    dead = simulate_bbm92_block(p.with_overrides(afterpulse_prob=0.0), s, 2 * 10**7, rng)
    clean = simulate_bbm92_block(free, s, 2 * 10**7, rng)
    assert dead.coincidences.sum() < 0.9 * clean.coincidences.sum()
    assert dead.chsh_s > 2.0 + 5 * dead.chsh_sigma
    assert abs(dead.qber_z - clean.qber_z) < 5 * math.sqrt(clean.qber_z / dead.coincidences[0, 0])
    # each detector follows the non-paralysable closed form for its own would-click probability
    law = bbm92_gate_law(bbm92_model(p, s))
    assert dead.detector_clicks is not None
    for d, clicks in enumerate(dead.detector_clicks):
        q = law.click_prob(d)
        rate = q / (1.0 + q * p.dead_gates)
        assert clicks == pytest.approx(rate * 2e7, rel=5 * _renewal_rel_sd(q, p.dead_gates, 0.0, 2 * 10**7))


def _renewal_rel_sd(q: float, dead_gates: int, p_ap: float, n: int) -> float:
    """Relative sd of a renewal count over n gates: X = G + 1 + Z, Z = 0 w.p. s, else Geometric(q) >= 1."""
    s = p_ap + (1.0 - p_ap) * q
    mean = dead_gates + 1.0 + (1.0 - s) / q
    var = (1.0 - s) * (2.0 - q) / q**2 - ((1.0 - s) / q) ** 2
    return math.sqrt(n * var / mean**3) * mean / n if var > 0 else 1.0 / n


def _one_detector(q: float) -> GateLaw:
    return GateLaw.build(np.array([1.0 - q, q]), np.array([0, 1]), 1)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("q", [0.001, 0.04, 0.3, 0.9, 1.0])
def test_saturating_detector_follows_non_paralysable_closed_form(q: float, sampler: Sampler) -> None:
    g, n = 25, 2 * 10**7
    reg = register_clicks(_one_detector(q), n, g, 0.0, 0.0, np.random.default_rng(11), sampler)
    expected = q / (1.0 + q * g)  # = R / (1 + R tau) with R = q f, tau = g / f
    assert expected == pytest.approx(registered_rate_dead_time(q, g), rel=1e-12)
    observed = reg.cats.size / n
    if q == 1.0:
        assert reg.cats.size == math.ceil(n / (g + 1))  # saturated: one click per dead period + 1
    else:
        assert observed == pytest.approx(expected, rel=5 * _renewal_rel_sd(q, g, 0.0, n))
    assert int(reg.quiet.sum() + reg.known.sum()) + reg.cats.size == n  # every gate accounted for


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_zero_delay_afterpulses_follow_renewal_closed_form(sampler: Sampler) -> None:
    q, g, p_ap, n = 0.05, 10, 0.2, 2 * 10**7
    reg = register_clicks(_one_detector(q), n, g, p_ap, 0.0, np.random.default_rng(12), sampler)
    expected = registered_rate_dead_time(q, g, p_ap)
    assert reg.cats.size / n == pytest.approx(expected, rel=5 * _renewal_rel_sd(q, g, p_ap, n))
    # afterpulse gates: the share of cycles that end on an afterpulse the light did not also cause
    ap_share = p_ap * (1.0 - q)
    flagged = int(np.count_nonzero(reg.masks & 0x80))
    assert flagged == pytest.approx(ap_share * reg.cats.size, abs=5 * math.sqrt(reg.cats.size * ap_share))


def test_same_seed_same_block_and_samplers_selectable() -> None:
    p = load_preset("snspd-modern", length_km=10.0)
    a = simulate_bb84_block(p, 10**6, np.random.default_rng(9))
    b = simulate_bb84_block(p, 10**6, np.random.default_rng(9))
    assert np.array_equal(a.alice_key, b.alice_key) and np.array_equal(a.bob_key, b.bob_key)
    assert a.detector_clicks == b.detector_clicks and a.counts.sent.tolist() == b.counts.sent.tolist()
    assert int(a.sent.sum()) == 10**6
    with pytest.raises(ValueError, match="sampler must be one of"):
        simulate_bb84_block(p, 10**6, np.random.default_rng(9), sampler="fast")  # type: ignore[arg-type]


def test_gate_law_tables_are_consistent() -> None:
    law = bb84_gate_law(class_model(load_preset("snspd-modern", length_km=10.0)))
    assert law.probs.sum() == pytest.approx(1.0)
    assert law.p_hit[3] == pytest.approx(float(law.probs[law.hit != 0].sum()))
    assert law.click_prob(0) == pytest.approx(law.click_prob(1), rel=1e-12)  # Alice's bit is a fair coin
    j = np.arange(1, law.geo_cdf.shape[1] + 1)
    assert np.allclose(law.geo_cdf[1], 1.0 - (1.0 - law.p_hit[1]) ** j)


PAIR_LAWS = {
    "snspd 10 km, 25 dead gates": (
        bb84_gate_law(class_model(load_preset("snspd-modern", length_km=10.0))),
        25,
    ),
    "dead time past the gap table": (
        bb84_gate_law(class_model(load_preset("snspd-modern", length_km=10.0))),
        700,
    ),
    "gaps past the table (100 km)": (
        bb84_gate_law(class_model(load_preset("snspd-modern", length_km=100.0))),
        25,
    ),
    "one detector blind": (GateLaw.build(np.array([0.7, 0.3]), np.array([0, 2]), 2), 5),
    "both saturated": (GateLaw.build(np.array([0.5, 0.5]), np.array([3, 1]), 2), 3),
}


@pytest.mark.parametrize("case", list(PAIR_LAWS))
def test_pair_walk_gives_the_general_walk_bit_for_bit(case: str) -> None:
    """The two-detector kernel (pair_walk.py) is an optimisation, not a new law: same draws, same block."""
    law, dead = PAIR_LAWS[case]
    n = 3 * 10**6 + 7  # odd length: blocks end in every detector state over the seeds
    for seed in range(3):
        fast = register_clicks(law, n, dead, 0.0, 0.0, np.random.default_rng([seed, 31]))
        ref = register_clicks(law, n, dead, 0.0, 0.0, np.random.default_rng([seed, 31]), fast_pair=False)
        assert fast.cats.size > 0 and np.array_equal(fast.cats, ref.cats)
        assert np.array_equal(fast.masks, ref.masks)
        assert fast.quiet.tolist() == ref.quiet.tolist() and fast.state.tolist() == ref.state.tolist()
        assert int(fast.quiet.sum()) + fast.cats.size == n
