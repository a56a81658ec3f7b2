"""The key-rate plot writes a PNG and takes Monte Carlo points from a callable."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qkd_adapters.sim.params import LinkParameters, load_preset
from qkd_adapters.sim.plot import monte_carlo_points, plot_key_rate_vs_distance


def test_plot_writes_png_with_custom_points(tmp_path: Path) -> None:
    calls: list[float] = []

    def point(p: LinkParameters, rng: np.random.Generator) -> float:
        calls.append(p.length_km)
        return 1e-4 * float(np.exp(-p.length_km / 30.0)) * (1 + 0.01 * rng.standard_normal())

    out = plot_key_rate_vs_distance(
        load_preset("gys"), tmp_path / "rate.png", mc_distances_km=[0.0, 50.0], mc_point=point, repeats=2
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(set(calls)) == [0.0, 50.0] and len(calls) == 4


def test_default_monte_carlo_points_are_reproducible() -> None:
    p = load_preset("gys", clock_rate_hz=1e9)
    from qkd_adapters.sim.plot import simulated_asymptotic_rate

    a = monte_carlo_points(p, [10.0, 40.0], simulated_asymptotic_rate(10**8), repeats=2, seed=3)
    b = monte_carlo_points(p, [10.0, 40.0], simulated_asymptotic_rate(10**8), repeats=2, seed=3)
    assert np.array_equal(a[0], b[0]) and a[0][0] > a[0][1] > 0
