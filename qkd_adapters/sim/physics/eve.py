"""Eavesdroppers on a decoy-state BB84 link, as per-pulse mixtures of what reaches Bob.

Each model says, for a pulse of intensity ``k`` and for matching or different bases, which
*branches* can occur (with their probabilities): what arrives at Bob's detectors (three arrival
probabilities, see :mod:`.detector`) and whether Eve then knows Alice's bit. All attacks act on
each pulse independently, so the per-class mixture is exact and the block sampler stays exact.

* :class:`InterceptResend` - Eve measures a chosen fraction of pulses at Alice's output in a
  random basis (ideal detector) and resends her result through the fibre, as a single photon or
  a coherent pulse (Bennett, Brassard 1984; QBER 25 % on full interception).
* :class:`PhotonNumberSplitting` - Eve measures photon number, blocks single photons (some or
  all), keeps one photon of each multi-photon pulse and forwards the rest over a lossless line,
  tuned so the *signal* gain equals the honest one (Brassard, Lutkenhaus, Mor, Sanders, PRL 85,
  1330 (2000)); only the decoy intensities give her away (Hwang 2003; Lo, Ma, Chen 2005).
* :class:`BeamSplitting` - Eve taps the light the fibre would lose and keeps it in a quantum
  memory; with a lossless replacement line Bob's statistics are unchanged, and she learns the
  bit of every pulse of which she kept a photon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from qkd_adapters.sim.params import LinkParameters
from qkd_adapters.sim.physics.channel import bb84_correct_probability
from qkd_adapters.sim.physics.detector import fock_mixture_arrivals, poisson_arrivals
from qkd_adapters.sim.physics.source import multi_photon_probability, poisson_pmf


class Branch(NamedTuple):
    """One way a pulse can go: probability, arrival probabilities at Bob, Eve's knowledge."""

    weight: float
    p_any: float
    p_c: float
    p_w: float
    eve_knows: bool


_VACUUM = (0.0, 0.0, 0.0)


@runtime_checkable
class Eavesdropper(Protocol):
    """An attack on the BB84 quantum channel."""

    @property
    def name(self) -> str: ...

    def bb84_branches(self, params: LinkParameters, intensity: float, same_basis: bool) -> list[Branch]:
        """Branches for a pulse of mean photon number ``intensity``."""
        ...


def honest_branches(params: LinkParameters, intensity: float, same_basis: bool) -> list[Branch]:
    """The channel with nobody on it: Poisson photons thinned by the overall transmittance."""
    r = bb84_correct_probability(params.misalignment, same_basis)
    return [Branch(1.0, *poisson_arrivals(intensity * params.transmittance, r), False)]


def _resend_arrivals(
    params: LinkParameters, mean_photons: float | None, correct: float
) -> tuple[float, float, float]:
    eta = params.transmittance
    if mean_photons is None:
        return (eta, eta * correct, eta * (1.0 - correct))
    return poisson_arrivals(mean_photons * eta, correct)


@dataclass(frozen=True)
class InterceptResend:
    """Measure a ``fraction`` of pulses in a random basis and resend the result.

    ``resend_mean_photons`` None resends a single photon, a number resends a coherent pulse of
    that mean. A pulse in which Eve finds no photon is replaced by vacuum.
    """

    fraction: float = 1.0
    resend_mean_photons: float | None = None

    @property
    def name(self) -> str:
        return "intercept-resend"

    def bb84_branches(self, params: LinkParameters, intensity: float, same_basis: bool) -> list[Branch]:
        f = self.fraction
        out = [Branch(1.0 - f, *b[1:]) for b in honest_branches(params, intensity, same_basis)]
        seen = -math.expm1(-intensity)
        out.append(Branch(f * (1.0 - seen), *_VACUUM, False))
        e_d = params.misalignment
        # Eve's basis equals Alice's: her bit is right, Bob sees it through the misalignment.
        r_right = bb84_correct_probability(e_d, same_basis)
        out.append(Branch(f * seen / 2, *_resend_arrivals(params, self.resend_mean_photons, r_right), True))
        # Eve's basis differs: her bit is a coin toss relative to Alice's. If Bob's basis is
        # Eve's (so not Alice's), all resent photons follow Eve's bit; otherwise each is 50/50.
        for eve_bit_right in (True, False):
            r = (1.0 - e_d if eve_bit_right else e_d) if not same_basis else 0.5
            arrivals = _resend_arrivals(params, self.resend_mean_photons, r)
            out.append(Branch(f * seen / 4, *arrivals, False))
        return out


def pns_tuning(params: LinkParameters) -> tuple[float, float]:
    """(fraction of single photons blocked, fraction of multi-photon pulses forwarded).

    Chosen so the signal intensity's photon-induced gain equals the honest ``1 - exp(-eta mu)``:
    first block singles (they give Eve nothing), then thin the multi-photon pulses if needed.
    """
    mu = params.mu
    eta_bob = params.bob_station_transmittance
    target = -math.expm1(-params.transmittance * mu)
    single = mu * math.exp(-mu) * eta_bob
    multi = _pns_multi_hit(mu, eta_bob, eta_bob)
    if multi >= target:
        return 1.0, target / multi
    return max(0.0, 1.0 - (target - multi) / single), 1.0


def _pns_multi_hit(intensity: float, eta_bob: float, q: float) -> float:
    """sum_{n>=2} P(n) [1 - (1 - q)^(n-1)]: n-1 forwarded photons, each reaching a detector w.p. q."""
    pmf = poisson_pmf(intensity)
    n = len(pmf)
    total = 0.0
    for m in range(2, n):
        total += pmf[m] * -math.expm1((m - 1) * math.log1p(-q))
    return total


@dataclass(frozen=True)
class PhotonNumberSplitting:
    """Photon-number-splitting attack with a lossless line to Bob's receiver.

    ``block_single`` / ``forward_multi`` None means tuned by :func:`pns_tuning` for the link.
    """

    block_single: float | None = None
    forward_multi: float | None = None

    @property
    def name(self) -> str:
        return "photon-number-splitting"

    def bb84_branches(self, params: LinkParameters, intensity: float, same_basis: bool) -> list[Branch]:
        tuned_block, tuned_forward = pns_tuning(params)
        block = tuned_block if self.block_single is None else self.block_single
        forward = tuned_forward if self.forward_multi is None else self.forward_multi
        eta_bob = params.bob_station_transmittance
        r = bb84_correct_probability(params.misalignment, same_basis)
        p0 = math.exp(-intensity)
        p1 = intensity * p0
        p_multi = multi_photon_probability(intensity)
        out = [Branch(p0 + p1 * block + p_multi * (1.0 - forward), *_VACUUM, False)]
        out.append(Branch(p1 * (1.0 - block), eta_bob, eta_bob * r, eta_bob * (1.0 - r), False))
        if p_multi > 0.0 and forward > 0.0:
            pmf = poisson_pmf(intensity)
            fwd = pmf.copy()
            fwd[:2] = 0.0
            fwd = fwd / fwd.sum()
            shifted = fwd[1:]  # P(m = n - 1 forwarded photons)
            arrivals = fock_mixture_arrivals(shifted, eta_bob, r)
            out.append(Branch(p_multi * forward, *arrivals, True))
        return out


@dataclass(frozen=True)
class BeamSplitting:
    """Eve taps ``tap_fraction`` of the light at Alice's output and stores it.

    None taps exactly what the fibre would lose (1 - fibre transmittance) and forwards the rest
    over a lossless line, so Bob sees the honest statistics; a larger tap lowers Bob's gain.
    """

    tap_fraction: float | None = None

    @property
    def name(self) -> str:
        return "beam-splitting"

    def tap(self, params: LinkParameters) -> float:
        """The fraction of the light Eve keeps."""
        return 1.0 - params.fibre_transmittance if self.tap_fraction is None else self.tap_fraction

    def bb84_branches(self, params: LinkParameters, intensity: float, same_basis: bool) -> list[Branch]:
        tau = self.tap(params)
        rest = min(1.0, params.fibre_transmittance / (1.0 - tau)) if tau < 1.0 else 0.0
        bob_mean = intensity * (1.0 - tau) * rest * params.bob_station_transmittance
        r = bb84_correct_probability(params.misalignment, same_basis)
        arrivals = poisson_arrivals(bob_mean, r)
        eve_has = -math.expm1(-intensity * tau)  # independent of Bob's photons (Poisson splitting)
        return [Branch(eve_has, *arrivals, True), Branch(1.0 - eve_has, *arrivals, False)]
