"""BBM92 with an SPDC pair source, and a CHSH test on the same data.

Bennett, Brassard, Mermin, PRL 68, 557 (1992): a source between Alice and Bob emits
polarisation-entangled pairs |Phi+>; both measure in Z (0 deg) or X (45 deg), Z-Z events give
the key, X-X events the phase-error test. Bob also spends a fraction of his settings on 22.5 and
67.5 deg so that S = E(0, 22.5) - E(0, 67.5) + E(45, 22.5) + E(45, 67.5) (Clauser, Horne,
Shimony, Holt, PRL 23, 880 (1969)) can be estimated: S = 2 sqrt(2) V for visibility V, and at
most sqrt(2) V under full intercept-resend, which turns the pairs into classical correlations.

Pair numbers are Poisson (multimode SPDC), every pair an independent Bell pair; both arms are
lossy fibres to threshold detectors with dark counts. For each (Alice setting, Bob setting) class the probability of every one of
the 16 click patterns of the four detectors is exact, by inclusion-exclusion over the
probabilities that a set S of detectors stays silent:

    P(no click in S) = (1 - pd)^|S| exp(-mu [1 - sum_xy P(x, y) (1 - eta_A [x in S]) (1 - eta_B [y in S])])

where P(x, y) is where the two photons of one pair would land. Without detector memory, sampling
follows the same per-class scheme as :mod:`.bb84`. With dead time or afterpulsing, each of the four
detectors has its own memory, as in BB84, and the block goes through :func:`.gates.register_clicks`
(category = setting pair and 16-detector pattern; a coincidence needs a registered click on each
side, so a dead detector on one side also costs the other side's click its partner).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qkd_adapters.sim.params import LinkParameters, SPDCParameters
from qkd_adapters.sim.physics.channel import db_to_transmittance, fibre_transmittance, polarisation_agreement
from qkd_adapters.sim.physics.eve import InterceptResend
from qkd_adapters.sim.physics.gates import SAMPLERS, GateLaw, Sampler, register_clicks
from qkd_adapters.sim.physics.tally import tally_bbm92

ALICE_ANGLES = (0.0, 45.0)
BOB_ANGLES = (0.0, 45.0, 22.5, 67.5)
CHSH_TERMS = ((0, 2, 1.0), (0, 3, -1.0), (1, 2, 1.0), (1, 3, 1.0))  # (alice idx, bob idx, sign)

FloatArray = npt.NDArray[np.float64]
ByteArray = npt.NDArray[np.uint8]

# detector order in a pattern bitmask: bit0 = Alice 0, bit1 = Alice 1, bit2 = Bob 0, bit3 = Bob 1
_SUBSETS = list(range(16))
_COINCIDENCES = [t for t in _SUBSETS if (t & 0b0011) and (t & 0b1100)]


def arm_transmittances(params: LinkParameters, spdc: SPDCParameters) -> tuple[float, float]:
    """(eta_A, eta_B): each arm's fibre, receiver insertion loss and detector efficiency."""
    station = db_to_transmittance(params.insertion_loss_db) * params.detector_efficiency
    a = fibre_transmittance(params.fibre_attenuation_db_per_km, spdc.source_position * params.length_km)
    b = fibre_transmittance(
        params.fibre_attenuation_db_per_km, (1.0 - spdc.source_position) * params.length_km
    )
    return a * station, b * station


def honest_pair(misalignment: float, theta_a: float, theta_b: float) -> FloatArray:
    """P(x, y) for one Phi+ pair at analysers theta_a, theta_b (misalignment at Bob)."""
    same = polarisation_agreement(misalignment, theta_a - theta_b)
    return 0.5 * np.array([[same, 1.0 - same], [1.0 - same, same]])


def intercepted_pair(misalignment: float, theta_a: float, theta_b: float, theta_e: float) -> FloatArray:
    """P(x, y) when Eve measured Bob's photon at theta_e and resent what she found."""
    out = np.zeros((2, 2))
    for z in (0, 1):
        pol = theta_e + 90.0 * z
        pa0 = math.cos(math.radians(pol - theta_a)) ** 2
        pb0_ideal = math.cos(math.radians(pol - theta_b)) ** 2
        pb0 = (1.0 - misalignment) * pb0_ideal + misalignment * (1.0 - pb0_ideal)
        out += 0.5 * np.outer([pa0, 1.0 - pa0], [pb0, 1.0 - pb0])
    return out


def _silence(pair: FloatArray, mean_pairs: float, eta_a: float, eta_b: float, pd: float) -> FloatArray:
    """P(no click in S) for each of the 16 detector subsets S."""
    z = np.zeros(16)
    for s in _SUBSETS:
        keep_a = [1.0 - eta_a if (s >> x) & 1 else 1.0 for x in (0, 1)]
        keep_b = [1.0 - eta_b if (s >> (2 + y)) & 1 else 1.0 for y in (0, 1)]
        avoid = sum(pair[x, y] * keep_a[x] * keep_b[y] for x in (0, 1) for y in (0, 1))
        n_det = bin(s).count("1")
        z[s] = (1.0 - pd) ** n_det * math.exp(-mean_pairs * (1.0 - avoid))
    return z


def _patterns_from_silence(z: FloatArray) -> FloatArray:
    """Inclusion-exclusion: P(clicked set == T) = sum_{U subset T} (-1)^|U| Z(T^c | U)."""
    out = np.zeros(16)
    for t in _SUBSETS:
        comp = 0b1111 & ~t
        total = 0.0
        for u in _SUBSETS:
            if u & ~t:
                continue
            total += (-1.0) ** bin(u).count("1") * z[comp | u]
        out[t] = max(total, 0.0)
    return out


@dataclass(frozen=True)
class BBM92Model:
    """Class probabilities [alice setting, bob setting] and their 16 click-pattern probabilities."""

    weights: FloatArray
    patterns: FloatArray

    @property
    def coincidence_prob(self) -> FloatArray:
        """P(at least one click on each side) per class."""
        return np.asarray(self.patterns[:, :, _COINCIDENCES].sum(axis=2), dtype=np.float64)

    def error_prob(self) -> FloatArray:
        """P(coincidence with different bits) per class (double clicks count half)."""
        out = np.zeros(self.weights.shape)
        for t in _COINCIDENCES:
            out += self.patterns[:, :, t] * _disagreement(t)
        return out


def _side_bit_prob(t: int, side: int) -> tuple[float, float]:
    """P(bit 0), P(bit 1) for one side of pattern t, double click squashed to a fair coin."""
    bits = (t >> (2 * side)) & 0b11
    if bits == 0b01:
        return 1.0, 0.0
    if bits == 0b10:
        return 0.0, 1.0
    return 0.5, 0.5


def _disagreement(t: int) -> float:
    a0, a1 = _side_bit_prob(t, 0)
    b0, b1 = _side_bit_prob(t, 1)
    return a0 * b1 + a1 * b0


def bbm92_model(
    params: LinkParameters, spdc: SPDCParameters, eve: InterceptResend | None = None
) -> BBM92Model:
    """Exact per-class pattern probabilities for the entangled link (optionally attacked)."""
    eta_a, eta_b = arm_transmittances(params, spdc)
    f = spdc.chsh_fraction
    p_alice = (params.p_z, 1.0 - params.p_z)
    p_bob = ((1.0 - f) * params.p_z, (1.0 - f) * (1.0 - params.p_z), f / 2.0, f / 2.0)
    weights = np.outer(p_alice, p_bob)
    patterns = np.zeros((2, 4, 16))
    e_d = params.misalignment
    for ia, ib in itertools.product(range(2), range(4)):
        ta, tb = ALICE_ANGLES[ia], BOB_ANGLES[ib]
        branches = [(1.0, honest_pair(e_d, ta, tb))]
        if eve is not None:
            branches = [(1.0 - eve.fraction, branches[0][1])]
            branches += [(eve.fraction / 2.0, intercepted_pair(e_d, ta, tb, te)) for te in ALICE_ANGLES]
        z = sum(
            (
                w * _silence(pair, spdc.mean_pairs, eta_a, eta_b, params.dark_count_prob)
                for w, pair in branches
            ),
            np.zeros(16),
        )
        patterns[ia, ib] = _patterns_from_silence(z)
    return BBM92Model(weights=weights, patterns=patterns)


def coincidence_probability(params: LinkParameters, spdc: SPDCParameters) -> float:
    """Closed form 1 - P(A silent) - P(B silent) + P(both silent) for Poisson pairs."""
    eta_a, eta_b = arm_transmittances(params, spdc)
    mu, pd = spdc.mean_pairs, params.dark_count_prob
    za = (1.0 - pd) ** 2 * math.exp(-mu * eta_a)
    zb = (1.0 - pd) ** 2 * math.exp(-mu * eta_b)
    zab = (1.0 - pd) ** 4 * math.exp(-mu * (eta_a + eta_b - eta_a * eta_b))
    return 1.0 - za - zb + zab


def expected_chsh(model: BBM92Model) -> float:
    """S from the exact per-class agreement probabilities."""
    coinc = model.coincidence_prob
    err = model.error_prob()
    s = 0.0
    for ia, ib, sign in CHSH_TERMS:
        s += sign * (1.0 - 2.0 * err[ia, ib] / coinc[ia, ib])
    return s


@dataclass(frozen=True, repr=False)
class BBM92Block:
    """Sifted Z-Z key (uint8 0/1, equal length and order), coincidence statistics and CHSH S."""

    alice_key: ByteArray
    bob_key: ByteArray
    sent: npt.NDArray[np.int64]
    coincidences: npt.NDArray[np.int64]
    errors: npt.NDArray[np.int64]
    chsh_s: float
    chsh_sigma: float
    n_pulses: int
    duration_s: float
    dead_time_losses: int = 0
    afterpulse_gates: int = 0
    detector_clicks: tuple[int, int, int, int] | None = None

    @property
    def qber_z(self) -> float:
        """Error rate of Z-Z coincidences."""
        return _ratio(self.errors[0, 0], self.coincidences[0, 0])

    @property
    def qber_x(self) -> float:
        """Error rate of X-X coincidences (phase-error test)."""
        return _ratio(self.errors[1, 1], self.coincidences[1, 1])

    def __repr__(self) -> str:
        return (
            f"BBM92Block(n_pulses={self.n_pulses}, sifted={self.alice_key.shape[0]}, "
            f"qber_z={self.qber_z:.4f}, S={self.chsh_s:.3f}+-{self.chsh_sigma:.3f})"
        )


def _ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b > 0 else float("nan")


def simulate_bbm92_block(
    params: LinkParameters,
    spdc: SPDCParameters,
    n_pulses: int,
    rng: np.random.Generator,
    eve: InterceptResend | None = None,
    *,
    sampler: Sampler = "arrivals",
) -> BBM92Block:
    """Simulate ``n_pulses`` source pulses of BBM92 (exact law, reproducible from ``rng``).

    ``sampler`` picks how detectors with memory are simulated (:mod:`.gates`), as for BB84.
    """
    if n_pulses <= 0:
        raise ValueError("n_pulses must be positive")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}")
    model = bbm92_model(params, spdc, eve)
    if params.dead_gates > 0 or params.afterpulse_prob > 0.0:
        return _simulate_with_memory(params, model, n_pulses, rng, sampler)
    w = model.weights.ravel()
    sent = rng.multinomial(n_pulses, w / w.sum()).reshape(2, 4)
    coinc_p = model.coincidence_prob
    coinc = rng.binomial(sent, np.clip(coinc_p, 0.0, 1.0))
    errors = np.zeros((2, 4), dtype=np.int64)
    alice = np.zeros(0, dtype=np.uint8)
    bob = np.zeros(0, dtype=np.uint8)
    for ia, ib in itertools.product(range(2), range(4)):
        probs = model.patterns[ia, ib, _COINCIDENCES]
        probs = probs / probs.sum()
        n = int(coinc[ia, ib])
        if ia == 0 and ib == 0:
            alice, bob = _key_events(probs, n, rng)
            errors[ia, ib] = int(np.count_nonzero(alice != bob))
        else:
            split = rng.multinomial(n, probs)
            errors[ia, ib] = _count_errors(split, rng)
    s, sigma = _chsh(coinc, errors)
    return BBM92Block(
        alice_key=alice,
        bob_key=bob,
        sent=sent,
        coincidences=coinc,
        errors=errors,
        chsh_s=s,
        chsh_sigma=sigma,
        n_pulses=n_pulses,
        duration_s=n_pulses / params.clock_rate_hz,
    )


def bbm92_gate_law(model: BBM92Model) -> GateLaw:
    """One gate's categories (setting pair, 16-detector click pattern); the pattern is the hit mask."""
    w = model.weights.ravel() / model.weights.sum()
    probs = w[:, None] * model.patterns.reshape(8, 16)
    hits = np.broadcast_to(np.arange(16, dtype=np.uint8), probs.shape)
    return GateLaw.build(probs.ravel(), hits.ravel(), 4)


def _simulate_with_memory(
    params: LinkParameters, model: BBM92Model, n_pulses: int, rng: np.random.Generator, sampler: Sampler
) -> BBM92Block:
    """Dead time and afterpulsing on all four detectors: registered gates, then one tally pass."""
    law = bbm92_gate_law(model)
    reg = register_clicks(
        law,
        n_pulses,
        params.dead_gates,
        params.afterpulse_prob,
        params.afterpulse_delay_s * params.clock_rate_hz,
        rng,
        sampler,
    )
    coinc = np.zeros(8, dtype=np.int64)
    errors = np.zeros(8, dtype=np.int64)
    room = reg.cats.shape[0]
    alice, bob = np.empty(room, dtype=np.uint8), np.empty(room, dtype=np.uint8)
    stats = np.zeros(5, dtype=np.int64)
    nk = tally_bbm92(reg.state, reg.cats, reg.masks, 0, coinc, errors, alice, bob, stats)
    totals, unregistered = reg.category_totals(law, rng)
    sent = totals.reshape(8, 16).sum(axis=1).reshape(2, 4)
    s, sigma = _chsh(coinc.reshape(2, 4), errors.reshape(2, 4))
    return BBM92Block(
        alice_key=alice[:nk].copy(),
        bob_key=bob[:nk].copy(),
        sent=sent,
        coincidences=coinc.reshape(2, 4),
        errors=errors.reshape(2, 4),
        chsh_s=s,
        chsh_sigma=sigma,
        n_pulses=n_pulses,
        duration_s=n_pulses / params.clock_rate_hz,
        dead_time_losses=int(unregistered[law.hit != 0].sum()),
        afterpulse_gates=int(stats[0]),
        detector_clicks=(int(stats[1]), int(stats[2]), int(stats[3]), int(stats[4])),
    )


def _key_events(probs: FloatArray, n: int, rng: np.random.Generator) -> tuple[ByteArray, ByteArray]:
    cum = np.cumsum(probs)
    cat = np.minimum(np.searchsorted(cum, rng.random(n), side="right"), len(probs) - 1)
    pats = np.asarray(_COINCIDENCES, dtype=np.int64)[cat]
    sides = []
    for side in (0, 1):
        bits2 = (pats >> (2 * side)) & 0b11
        bit = (bits2 == 0b10).astype(np.uint8)
        double = bits2 == 0b11
        bit[double] = rng.integers(0, 2, size=int(np.count_nonzero(double)), dtype=np.uint8)
        sides.append(bit)
    return sides[0], sides[1]


def _count_errors(split: npt.NDArray[np.int64], rng: np.random.Generator) -> int:
    errors = 0
    for count, t in zip(split, _COINCIDENCES, strict=True):
        d = _disagreement(t)
        if d == 1.0:
            errors += int(count)
        elif d > 0.0:
            errors += int(rng.binomial(int(count), d))
    return errors


def _chsh(coinc: npt.NDArray[np.int64], errors: npt.NDArray[np.int64]) -> tuple[float, float]:
    s = 0.0
    var = 0.0
    for ia, ib, sign in CHSH_TERMS:
        n = float(coinc[ia, ib])
        if n <= 0:
            return float("nan"), float("nan")
        e = 1.0 - 2.0 * float(errors[ia, ib]) / n
        s += sign * e
        var += (1.0 - e * e) / n
    return s, math.sqrt(var)
