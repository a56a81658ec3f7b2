"""Finite-key secret key length of decoy-state BB84 (two decoys, Hoeffding bounds).

Follows Lim, Curty, Walenta, Xu, Zbinden, "Concise security bounds for practical decoy-state
quantum key distribution", PRA 89, 022307 (2014), Eqs. (1)-(5), with the bases renamed: Z is
the key basis here (X in the paper) and X the test basis. Three intensities
mu1 > mu2 + mu3, mu2 > mu3 >= 0 (signal, weak decoy, vacuum decoy).

Two variants (``key_from``):

* ``"all"`` - the paper's protocol: key from Z events of all intensities; the secrecy budget is
  split as eps_sec = 21 eps (their Eq. B4 with every term equal).
* ``"signal"`` (default, what :func:`simulate_bb84_block` delivers) - key from signal-intensity
  Z events only. Given the photon-number counts, intensity labels are assigned independently
  with P(k | n) = p_k e^-k k^n / (n! tau_n) (Lim et al. App. A), so the signal share of the
  vacuum and single-photon events is bounded below by P(mu1 | n) s_{Z,n}^L minus a Hoeffding
  term sqrt(n_Z / 2 ln(1/eps)) (valid since s_{Z,n} <= n_Z). Those two extra failure events are
  charged twice each, like the smoothing terms, so eps_sec = 25 eps. The phase-error sampling
  bound (Eq. 5) is applied between the X-basis single-photon events and the signal Z-basis
  single-photon events, which are a random split of a common pool for the same reason.

``leak_ec_bits`` is what error correction revealed. Lim's formula also subtracts log2(2/eps_cor)
for the verification hash; callers that fold the tag into ``leak_ec_bits`` are charged for it
twice, which is conservative by ~50 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

from qkd_adapters.sim.physics.counts import DecoyCounts, X, Z
from qkd_adapters.sim.physics.source import tau_n

KeyFrom = Literal["signal", "all"]
N_EPS_TERMS: dict[str, int] = {"all": 21, "signal": 25}


class HasCounts(Protocol):
    """Anything carrying DecoyCounts (a BB84Block does)."""

    @property
    def counts(self) -> DecoyCounts: ...


@dataclass(frozen=True)
class FiniteKeyResult:
    """The secret key length and every bound it rests on (all are event counts, not rates)."""

    length: int
    s_z0: float
    s_z1: float
    phi_z: float
    abort_reason: str | None
    n_key: int
    s_z0_all: float
    s_z1_all: float
    s_x0: float
    s_x1: float
    v_x1: float
    phase_error_observed: float
    delta_n_z: float
    delta_n_x: float
    delta_m_x: float
    leak_ec_bits: int
    pa_penalty_bits: float
    eps_sec: float
    eps_cor: float
    eps_unit: float
    key_from: str

    @property
    def secret_fraction(self) -> float:
        """Secret bits per sifted key bit."""
        return self.length / self.n_key if self.n_key > 0 else 0.0


def hoeffding_delta(n: float, eps: float) -> float:
    """sqrt(n / 2 ln(1/eps)): Hoeffding deviation for n trials at failure probability eps."""
    return math.sqrt(max(n, 0.0) / 2.0 * math.log(1.0 / eps))


def decoy_vacuum_single_bounds(
    n_k: tuple[float, float, float],
    delta: float,
    intensities: tuple[float, float, float],
    probabilities: tuple[float, float, float],
) -> tuple[float, float]:
    """Lower bounds on vacuum and single-photon event counts (Lim et al. Eqs. 2 and 3)."""
    mu1, mu2, mu3 = intensities
    nplus = [math.exp(k) / p * (n + delta) for k, p, n in zip(intensities, probabilities, n_k, strict=True)]
    nminus = [math.exp(k) / p * (n - delta) for k, p, n in zip(intensities, probabilities, n_k, strict=True)]
    tau0 = tau_n(intensities, probabilities, 0)
    tau1 = tau_n(intensities, probabilities, 1)
    s0 = max(0.0, tau0 * (mu2 * nminus[2] - mu3 * nplus[1]) / (mu2 - mu3))
    s1 = (
        tau1
        * mu1
        * (nminus[1] - nplus[2] - (mu2**2 - mu3**2) / mu1**2 * (nplus[0] - s0 / tau0))
        / (mu1 * (mu2 - mu3) - mu2**2 + mu3**2)
    )
    return s0, s1


def single_photon_error_bound(
    m_k: tuple[float, float, float],
    delta: float,
    intensities: tuple[float, float, float],
    probabilities: tuple[float, float, float],
) -> float:
    """Upper bound on single-photon errors in the test basis (Lim et al. Eq. 4)."""
    _, mu2, mu3 = intensities
    _, p2, p3 = probabilities
    tau1 = tau_n(intensities, probabilities, 1)
    m_plus2 = math.exp(mu2) / p2 * (m_k[1] + delta)
    m_minus3 = math.exp(mu3) / p3 * (m_k[2] - delta)
    return tau1 * (m_plus2 - m_minus3) / (mu2 - mu3)


def gamma_sampling(eps: float, rate: float, c: float, d: float) -> float:
    """Lim et al. Eq. 5 gamma(a, b, c, d): sampling deviation of the phase-error rate."""
    b = min(max(rate, 1e-12), 0.5)
    var = (c + d) * (1.0 - b) * b / (c * d * math.log(2.0))
    arg = (c + d) / (c * d * (1.0 - b) * b * eps * eps)
    return math.sqrt(var * math.log2(arg)) if arg > 1.0 else 0.0


def secret_key_length(
    stats: DecoyCounts | HasCounts,
    leak_ec_bits: int,
    eps_sec: float,
    eps_cor: float,
    *,
    key_from: KeyFrom = "signal",
    phase_error_tolerance: float = 0.5,
) -> FiniteKeyResult:
    """Secret key length extractable from a block, with all intermediate bounds."""
    counts = stats if isinstance(stats, DecoyCounts) else stats.counts
    mu = counts.intensities
    p = counts.probabilities
    _check_arguments(key_from, eps_sec, eps_cor, leak_ec_bits, mu, p)
    n_terms = N_EPS_TERMS[key_from]
    eps = eps_sec / n_terms
    n_z_k = _triple(counts.detected[:, Z])
    n_x_k = _triple(counts.detected[:, X])
    m_x_k = _triple(counts.errors[:, X])
    n_z, n_x, m_x = sum(n_z_k), sum(n_x_k), sum(m_x_k)
    d_nz, d_nx, d_mx = hoeffding_delta(n_z, eps), hoeffding_delta(n_x, eps), hoeffding_delta(m_x, eps)

    s_z0_all, s_z1_all = decoy_vacuum_single_bounds(n_z_k, d_nz, mu, p)
    s_x0, s_x1 = decoy_vacuum_single_bounds(n_x_k, d_nx, mu, p)
    v_x1 = max(0.0, single_photon_error_bound(m_x_k, d_mx, mu, p))

    n_key, s_z0, s_z1 = _key_events_bounds(key_from, n_z_k, d_nz, s_z0_all, s_z1_all, mu, p)

    pa_penalty = 6.0 * math.log2(n_terms / eps_sec) + math.log2(2.0 / eps_cor)
    observed = m_x / n_x if n_x > 0 else float("nan")

    def result(length: int, phi: float, reason: str | None) -> FiniteKeyResult:
        return FiniteKeyResult(
            length=length,
            s_z0=s_z0,
            s_z1=s_z1,
            phi_z=phi,
            abort_reason=reason,
            n_key=n_key,
            s_z0_all=s_z0_all,
            s_z1_all=s_z1_all,
            s_x0=s_x0,
            s_x1=s_x1,
            v_x1=v_x1,
            phase_error_observed=observed,
            delta_n_z=d_nz,
            delta_n_x=d_nx,
            delta_m_x=d_mx,
            leak_ec_bits=leak_ec_bits,
            pa_penalty_bits=pa_penalty,
            eps_sec=eps_sec,
            eps_cor=eps_cor,
            eps_unit=eps,
            key_from=key_from,
        )

    if n_key <= 0:
        return result(0, float("nan"), "no sifted key")
    if n_x <= 0:
        return result(0, float("nan"), "no test-basis detections for the phase-error estimate")
    if s_x1 <= 0.0 or s_z1 <= 0.0:
        return result(0, float("nan"), _single_photon_reason(n_z_k, n_x_k, s_z1, s_x1, mu, p))
    rate = min(v_x1 / s_x1, 0.5)
    phi = rate + gamma_sampling(eps, rate, s_x1, s_z1)
    if phi >= min(phase_error_tolerance, 0.5):
        return result(0, phi, "phase-error bound above tolerance")
    raw = s_z0 + s_z1 * (1.0 - _h2(phi)) - leak_ec_bits - pa_penalty
    length = max(0, min(math.floor(raw), n_key))
    reason = None if length > 0 else "finite-size and leakage terms exceed the extractable entropy"
    return result(length, phi, reason)


def _single_photon_reason(
    n_z_k: tuple[float, float, float],
    n_x_k: tuple[float, float, float],
    s_z1: float,
    s_x1: float,
    mu: tuple[float, float, float],
    p: tuple[float, float, float],
) -> str:
    """Why a single-photon lower bound is not positive: too few events, or gains no honest source gives.

    The bound is re-evaluated without the Hoeffding terms. If it is positive then, the counts are
    fine and only their finite-size deviation wins: the block is too short. If it is still not
    positive, the decoy gains themselves do not fit photon-number-independent loss (a PNS-type
    attack, or a source not doing what its intensities say).
    """
    _, z1_exact = decoy_vacuum_single_bounds(n_z_k, 0.0, mu, p)
    _, x1_exact = decoy_vacuum_single_bounds(n_x_k, 0.0, mu, p)
    bounds = f"s_Z1 >= {s_z1:.4g}, s_X1 >= {s_x1:.4g}"
    if z1_exact > 0.0 and x1_exact > 0.0:
        return (
            f"single-photon lower bound not positive ({bounds}): the block has too few decoy events "
            "for their statistical deviation; a longer block is needed"
        )
    return (
        f"single-photon lower bound not positive even without finite-size terms ({bounds}): the decoy "
        "gains do not fit photon-number-independent loss (photon-number-splitting attack or a faulty source)"
    )


def bbm92_secret_key_length(
    n: int, k: int, x_errors: int, leak_bits: int, eps_sec: float, eps_cor: float
) -> tuple[int, str | None]:
    """Entanglement-based finite-key length (Tomamichel, Lim, Gisin, Renner 2012, Eq. 2).

    l = n (1 - h(Q_X + mu)) - leak - log2(2 / (eps_sec^2 eps_cor)), with n key bits, k X-X test
    bits at error rate Q_X and mu = sqrt((n + k)/(n k) (k + 1)/k ln(2/eps_sec)).
    """
    if n <= 0 or k <= 0:
        return 0, "no key or no test-basis coincidences"
    q_x = x_errors / k
    mu = math.sqrt((n + k) / (n * k) * (k + 1) / k * math.log(2.0 / eps_sec))
    if q_x + mu >= 0.5:
        return 0, "phase-error bound above 1/2"
    raw = n * (1.0 - _h2(q_x + mu)) - leak_bits - math.log2(2.0 / (eps_sec**2 * eps_cor))
    length = max(0, min(n, math.floor(raw)))
    return length, None if length > 0 else "finite-size and leakage terms exceed the extractable entropy"


def _check_arguments(
    key_from: str,
    eps_sec: float,
    eps_cor: float,
    leak_ec_bits: int,
    mu: tuple[float, float, float],
    p: tuple[float, float, float],
) -> None:
    """Raise ValueError for arguments outside what :func:`secret_key_length` (and the paper) allows."""
    if key_from not in N_EPS_TERMS:
        raise ValueError("key_from must be 'signal' or 'all'")
    if not (0.0 < eps_sec < 1.0 and 0.0 < eps_cor < 1.0):
        raise ValueError("eps_sec and eps_cor must lie in (0, 1)")
    if leak_ec_bits < 0:
        raise ValueError("leak_ec_bits must be >= 0")
    if not (mu[0] > mu[1] + mu[2] and mu[1] > mu[2] >= 0.0):
        raise ValueError("intensities must satisfy mu1 > mu2 + mu3 and mu2 > mu3 >= 0")
    if min(p) <= 0.0:
        raise ValueError("every intensity needs a positive probability")


def _key_events_bounds(
    key_from: str,
    n_z_k: tuple[float, float, float],
    d_nz: float,
    s_z0_all: float,
    s_z1_all: float,
    mu: tuple[float, float, float],
    p: tuple[float, float, float],
) -> tuple[int, float, float]:
    """(n_key, s_z0, s_z1): the key events and the lower bounds on their vacuum and single-photon events.

    ``"all"``: every Z event is key (n_Z), the paper's protocol. ``"signal"``: only signal-intensity
    Z events; the signal share of the vacuum and single-photon events is P(mu1 | n) s_{Z,n}^L minus
    the Hoeffding term (Lim et al. App. A; see the module docstring). Both bounds are capped by the
    key events.
    """
    if key_from == "all":
        n_key = round(sum(n_z_k))
        s_z0, s_z1 = s_z0_all, s_z1_all
    else:
        n_key = round(n_z_k[0])
        share0 = p[0] * math.exp(-mu[0]) / tau_n(mu, p, 0)
        share1 = p[0] * math.exp(-mu[0]) * mu[0] / tau_n(mu, p, 1)
        s_z0 = max(0.0, share0 * s_z0_all - d_nz)
        s_z1 = share1 * s_z1_all - d_nz
    s_z0 = min(s_z0, float(n_key))
    s_z1 = min(s_z1, float(n_key) - s_z0)
    return n_key, s_z0, s_z1


def _triple(values: object) -> tuple[float, float, float]:
    seq = [float(v) for v in values]  # type: ignore[attr-defined]
    return (seq[0], seq[1], seq[2])


def _h2(x: float) -> float:
    if x <= 0.0 or x >= 1.0:
        return 0.0
    return -x * math.log2(x) - (1.0 - x) * math.log2(1.0 - x)
