"""Key rate against distance: analytic curves, the PLOB bound and Monte Carlo points, as a PNG.

Monte Carlo points come from a callable ``(params at that length, rng) -> rate per pulse``, run a
few times per distance (mean and standard error plotted). The default simulates a block and
applies the asymptotic weak+vacuum formula to its counts; the post-processing side can pass a
callable that runs the whole pipeline and returns final secret bits per pulse.

matplotlib is not a dependency of a server install: it comes with the ``plots`` extra
(``pip install 'qkms[plots]'``) and is imported only when a plot is drawn; without it
:func:`plot_key_rate_vs_distance` raises ``ModuleNotFoundError`` (``name="matplotlib"``) saying so,
before any simulation runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np

from qkd_adapters.sim import analytic
from qkd_adapters.sim.params import LinkParameters
from qkd_adapters.sim.physics.bb84 import simulate_bb84_block

PLOTS_EXTRA_HINT = (
    "key-rate plots need matplotlib, which a server install leaves out: pip install 'qkms[plots]'"
)


def _pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files only, no display), or a clear error without it."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(PLOTS_EXTRA_HINT, name="matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


RatePoint = Callable[[LinkParameters, np.random.Generator], float]


def simulated_asymptotic_rate(n_pulses: int) -> RatePoint:
    """Default Monte Carlo point: one block, MQZL weak+vacuum rate from its counts."""

    def point(params: LinkParameters, rng: np.random.Generator) -> float:
        block = simulate_bb84_block(params, n_pulses, rng)
        return analytic.asymptotic_rate_from_counts(block.counts, params.ec_inefficiency)

    return point


def monte_carlo_points(
    params: LinkParameters,
    distances_km: Sequence[float],
    point: RatePoint,
    repeats: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error of ``point`` at each distance (seeded, reproducible)."""
    rng = np.random.default_rng(seed)
    means, errs = [], []
    for length in distances_km:
        p = replace(params, length_km=float(length))
        samples = np.array([point(p, rng) for _ in range(repeats)])
        means.append(float(samples.mean()))
        errs.append(float(samples.std(ddof=1) / math.sqrt(repeats)) if repeats > 1 else 0.0)
    return np.array(means), np.array(errs)


def plot_key_rate_vs_distance(
    params: LinkParameters,
    path: str | Path,
    *,
    max_km: float | None = None,
    mc_distances_km: Sequence[float] | None = None,
    mc_point: RatePoint | None = None,
    mc_pulses: int = 10**8,
    repeats: int = 4,
    seed: int = 2024,
    title: str | None = None,
) -> Path:
    """Write the PNG and return its path. Rates are per pulse, with this protocol's sifting."""
    plt = _pyplot()
    if max_km is None:
        max_km = 1.1 * analytic.max_distance(params, "infinite", optimise_mu=False) + 10.0
    grid = np.linspace(0.0, max_km, 200)
    inf, wv, plob = [], [], []
    for length in grid:
        p = replace(params, length_km=float(length))
        inf.append(analytic.key_rate_infinite_decoy(p))
        wv.append(analytic.key_rate_weak_vacuum(p))
        plob.append(analytic.plob_bound_for(p))
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    ax.semilogy(grid, _positive(plob), "k--", label="PLOB bound -log2(1-eta)")
    ax.semilogy(grid, _positive(inf), "C0-", label="GLLP, infinite decoys")
    ax.semilogy(grid, _positive(wv), "C1-", label=f"weak + vacuum decoy (nu = {params.nu:g})")
    if mc_distances_km is None:
        mc_distances_km = list(np.linspace(0.0, 0.8 * max_km, 6))
    if len(mc_distances_km) > 0:
        point = mc_point if mc_point is not None else simulated_asymptotic_rate(mc_pulses)
        means, errs = monte_carlo_points(params, mc_distances_km, point, repeats, seed)
        keep = means > 0
        ax.errorbar(
            np.asarray(mc_distances_km)[keep],
            means[keep],
            yerr=errs[keep],
            fmt="o",
            color="C3",
            capsize=3,
            label="Monte Carlo",
        )
    ax.set_xlabel("fibre length (km)")
    ax.set_ylabel("secret key rate (bits per pulse)")
    ax.set_title(title or f"Decoy-state BB84, preset {params.name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(path)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _positive(values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    return np.where(arr > 0, arr, np.nan)
