"""Decoy-state BB84 with biased basis choice: exact, vectorised block simulation.

Every pulse falls in one of 12 *classes* (intensity x Alice's basis x Bob's basis), chosen
independently with known probabilities. Within a class, pulses are independent and identically
distributed, and a pulse's fate (no click, click on the detector of Alice's bit, on the other,
on both; and whether Eve learnt the bit) has exactly computable probabilities
(:mod:`.detector`, :mod:`.eve`). So instead of looping over ~1e9 pulses we draw

    sent_c ~ Multinomial(N, class probabilities),  detected_c ~ Binomial(sent_c, Q_c),

and generate only the detected events, their outcome drawn from the conditional law given a
detection. This has exactly the joint law of the pulse-by-pulse simulation (docs/PHYSICS.md).
Dead time and afterpulsing couple gates; when either is on, the block goes through
:func:`.gates.register_clicks` instead (still exact for the stated detector model), which jumps
from registered click to registered click.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qkd_adapters.sim.params import LinkParameters
from qkd_adapters.sim.physics.counts import DecoyCounts, X, Z
from qkd_adapters.sim.physics.detector import click_patterns
from qkd_adapters.sim.physics.eve import Eavesdropper, honest_branches
from qkd_adapters.sim.physics.gates import SAMPLERS, GateLaw, Sampler, register_clicks
from qkd_adapters.sim.physics.tally import tally_bb84

N_INTENSITIES, N_BASES = 3, 2
N_CLASSES = N_INTENSITIES * N_BASES * N_BASES
KEY_CLASS = 0  # signal intensity, Alice Z, Bob Z

FloatArray = npt.NDArray[np.float64]
ByteArray = npt.NDArray[np.uint8]


def class_index(k: int, alice_basis: int, bob_basis: int) -> int:
    """Index of the (intensity, Alice basis, Bob basis) class."""
    return k * 4 + alice_basis * 2 + bob_basis


@dataclass(frozen=True)
class ClassModel:
    """Prior class probabilities and, per class, P[eve knows, click pattern] (pattern 0 = none)."""

    weights: FloatArray
    patterns: FloatArray

    @property
    def detect_prob(self) -> FloatArray:
        """Q_c: probability that a pulse of class c gives at least one click."""
        return np.asarray(1.0 - self.patterns[:, :, 0].sum(axis=1), dtype=np.float64)


def class_model(params: LinkParameters, eve: Eavesdropper | None = None) -> ClassModel:
    """Exact per-class click-pattern probabilities for the link and attack."""
    weights = np.zeros(N_CLASSES)
    patterns = np.zeros((N_CLASSES, 2, 4))
    p_basis = (params.p_z, 1.0 - params.p_z)
    for k, (mean, p_k) in enumerate(zip(params.intensities, params.intensity_probabilities, strict=True)):
        for a in range(N_BASES):
            for b in range(N_BASES):
                c = class_index(k, a, b)
                weights[c] = p_k * p_basis[a] * p_basis[b]
                same = a == b
                branches = (
                    honest_branches(params, mean, same)
                    if eve is None
                    else eve.bb84_branches(params, mean, same)
                )
                for br in branches:
                    if br.weight <= 0.0:
                        continue
                    pat = click_patterns(br.p_any, br.p_c, br.p_w, params.dark_count_prob)
                    patterns[c, int(br.eve_knows)] += br.weight * pat
    return ClassModel(weights=weights, patterns=patterns)


@dataclass(frozen=True, repr=False)
class BB84Block:
    """One simulated block: the sifted signal-intensity Z-basis key and the decoy statistics.

    ``alice_key`` and ``bob_key`` are uint8 0/1 arrays of equal length and order. ``eve_knows``
    (only with an eavesdropper) marks key positions whose value Eve learnt: a diagnostic for
    tests, never to be logged.
    """

    alice_key: ByteArray
    bob_key: ByteArray
    counts: DecoyCounts
    n_pulses: int
    duration_s: float
    eve_knows: npt.NDArray[np.bool_] | None = None
    dead_time_losses: int = 0
    afterpulse_gates: int = 0
    double_clicks: int = 0
    detector_clicks: tuple[int, int] | None = None

    @property
    def sent(self) -> npt.NDArray[np.int64]:
        """sent[k, basis]: pulses of intensity k that Alice prepared in that basis."""
        return self.counts.sent

    @property
    def detected(self) -> npt.NDArray[np.int64]:
        """detected[k, basis]: sifted detections (both parties in that basis)."""
        return self.counts.detected

    @property
    def errors(self) -> npt.NDArray[np.int64]:
        """errors[k, basis]: sifted detections whose bits differ."""
        return self.counts.errors

    @property
    def x_detected(self) -> int:
        """X-basis sifted detections, all intensities."""
        return int(self.counts.n_x)

    @property
    def x_errors(self) -> int:
        """X-basis errors, all intensities: the input of the phase-error estimate."""
        return int(self.counts.m_x)

    @property
    def qber_z(self) -> float:
        """Error rate of the sifted signal Z key (from the counts, never from key values here)."""
        return self.counts.qber(0, Z)

    def __repr__(self) -> str:
        return (
            f"BB84Block(n_pulses={self.n_pulses}, sifted={self.alice_key.shape[0]}, "
            f"qber_z={self.qber_z:.4f}, qber_x={self.x_errors / max(self.x_detected, 1):.4f})"
        )


def simulate_bb84_block(
    params: LinkParameters,
    n_pulses: int,
    rng: np.random.Generator,
    eve: Eavesdropper | None = None,
    *,
    sampler: Sampler = "arrivals",
) -> BB84Block:
    """Simulate ``n_pulses`` clock cycles of decoy-state BB84 (exact law, reproducible from ``rng``).

    ``sampler`` picks how detectors with memory are simulated (:mod:`.gates`): ``"arrivals"``
    (fast) or ``"time-ordered"`` (the reference); both sample the same law.
    """
    if n_pulses <= 0:
        raise ValueError("n_pulses must be positive")
    model = class_model(params, eve)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}")
    if params.dead_gates > 0 or params.afterpulse_prob > 0.0:
        return _simulate_with_memory(params, model, n_pulses, rng, eve is not None, sampler)
    return _simulate_independent(params, model, n_pulses, rng, eve is not None)


def _simulate_independent(
    params: LinkParameters, model: ClassModel, n_pulses: int, rng: np.random.Generator, with_eve: bool
) -> BB84Block:
    q = model.detect_prob
    sent = rng.multinomial(n_pulses, model.weights / model.weights.sum())
    detected = rng.binomial(sent, np.clip(q, 0.0, 1.0))
    errors = np.zeros(N_CLASSES, dtype=np.int64)
    doubles = 0
    for c in range(N_CLASSES):
        if c == KEY_CLASS or detected[c] == 0:
            continue
        cat = model.patterns[c, :, 1:].ravel() / q[c]
        split = rng.multinomial(detected[c], cat / cat.sum())
        both = int(split[2] + split[5])
        errors[c] = int(split[1] + split[4]) + int(rng.binomial(both, 0.5))
        doubles += both
    alice, bob, knows, key_errors, key_doubles = _key_events(model, int(detected[KEY_CLASS]), rng)
    errors[KEY_CLASS] = key_errors
    counts = _aggregate(params, sent, detected, errors)
    return BB84Block(
        alice_key=alice,
        bob_key=bob,
        counts=counts,
        n_pulses=n_pulses,
        duration_s=n_pulses / params.clock_rate_hz,
        eve_knows=knows if with_eve else None,
        double_clicks=doubles + key_doubles,
    )


def _key_events(
    model: ClassModel, n: int, rng: np.random.Generator
) -> tuple[ByteArray, ByteArray, npt.NDArray[np.bool_], int, int]:
    """Detected key-class events: one uniform each picks (Eve flag, C / both->right / W / both->wrong)."""
    pat = model.patterns[KEY_CLASS]
    seg = np.array(
        [[p[1], p[3] / 2, p[2], p[3] / 2] for p in pat],
        dtype=np.float64,
    ).ravel()
    cum = np.cumsum(seg / seg.sum())
    u = rng.random(n)
    err = ((u >= cum[1]) & (u < cum[3])) | (u >= cum[5])
    doubles = int(np.count_nonzero(((u >= cum[0]) & (u < cum[1])) | ((u >= cum[2]) & (u < cum[3]))))
    doubles += int(np.count_nonzero(((u >= cum[4]) & (u < cum[5])) | (u >= cum[6])))
    knows = u >= cum[3]
    alice = rng.integers(0, 2, size=n, dtype=np.uint8)
    bob = alice ^ err.view(np.uint8)
    return alice, bob, knows, int(np.count_nonzero(err)), doubles


def bb84_gate_law(model: ClassModel) -> GateLaw:
    """One gate's categories (class, Eve's flag, pattern, Alice's bit) and the detectors each fires.

    Detector 0 reads bit 0: pattern 'C' (the detector of Alice's bit) fires detector ``alice``,
    'W' the other one, 'both' both; Alice's bit is a fair coin independent of the pattern.
    """
    w = model.weights / model.weights.sum()
    probs = 0.5 * (w[:, None, None, None] * model.patterns[:, :, :, None]) * np.ones(2)
    alice = np.arange(2)
    hit = np.zeros((4, 2), dtype=np.uint8)
    hit[1] = 1 << alice  # C only
    hit[2] = 1 << (1 - alice)  # W only
    hit[3] = 3
    hits = np.broadcast_to(hit, probs.shape)
    return GateLaw.build(probs.ravel(), hits.ravel(), 2)


def _simulate_with_memory(
    params: LinkParameters,
    model: ClassModel,
    n_pulses: int,
    rng: np.random.Generator,
    with_eve: bool,
    sampler: Sampler,
) -> BB84Block:
    """Dead time and afterpulsing: registered gates from :mod:`.gates`, then one tally pass."""
    law = bb84_gate_law(model)
    reg = register_clicks(
        law,
        n_pulses,
        params.dead_gates,
        params.afterpulse_prob,
        params.afterpulse_delay_s * params.clock_rate_hz,
        rng,
        sampler,
    )
    detected = np.zeros(N_CLASSES, dtype=np.int64)
    errors = np.zeros(N_CLASSES, dtype=np.int64)
    room = reg.cats.shape[0]
    alice, bob, eve = (np.empty(room, dtype=np.uint8) for _ in range(3))
    stats = np.zeros(4, dtype=np.int64)
    nk = tally_bb84(reg.state, reg.cats, reg.masks, KEY_CLASS, detected, errors, alice, bob, eve, stats)
    totals, unregistered = reg.category_totals(law, rng)
    per_class = totals.reshape(N_CLASSES, -1).sum(axis=1)
    lost = int(unregistered[law.hit != 0].sum())
    counts = _aggregate(params, per_class, detected, errors)
    return BB84Block(
        alice_key=alice[:nk].copy(),
        bob_key=bob[:nk].copy(),
        counts=counts,
        n_pulses=n_pulses,
        duration_s=n_pulses / params.clock_rate_hz,
        eve_knows=eve[:nk].astype(bool) if with_eve else None,
        dead_time_losses=lost,
        afterpulse_gates=int(stats[0]),
        double_clicks=int(stats[1]),
        detector_clicks=(int(stats[2]), int(stats[3])),
    )


def _aggregate(
    params: LinkParameters,
    sent_c: npt.NDArray[np.int64],
    det_c: npt.NDArray[np.int64],
    err_c: npt.NDArray[np.int64],
) -> DecoyCounts:
    return DecoyCounts.from_classes(
        params.intensities,
        params.intensity_probabilities,
        params.p_z,
        np.asarray(sent_c, dtype=np.int64),
        np.asarray(det_c, dtype=np.int64),
        np.asarray(err_c, dtype=np.int64),
    )


__all__ = ["BB84Block", "ClassModel", "X", "Z", "class_model", "simulate_bb84_block"]
