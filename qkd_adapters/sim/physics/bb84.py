"""Decoy-state BB84 with biased basis choice: exact, vectorised block simulation.

Every pulse falls in one of 12 *classes* (intensity x Alice's basis x Bob's basis), chosen
independently with known probabilities. Within a class, pulses are independent and identically
distributed, and a pulse's fate (no click, click on the detector of Alice's bit, on the other,
on both; and whether Eve learnt the bit) has exactly computable probabilities
(:mod:`.detector`, :mod:`.eve`). So instead of looping over ~1e9 pulses we draw

    sent_c ~ Multinomial(N, class probabilities),  detected_c ~ Binomial(sent_c, Q_c),

and generate only the detected events, their outcome drawn from the conditional law given a
detection. This has exactly the joint law of the pulse-by-pulse simulation (docs/PHYSICS.md).
Dead time and afterpulsing couple gates; when either is on, detections are instead placed on the
time axis as a Bernoulli process (geometric gaps) and passed through
:func:`.detector.time_ordered_clicks`, still exact for the stated detector model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from qkd_adapters.sim.params import LinkParameters
from qkd_adapters.sim.physics.counts import DecoyCounts, X, Z
from qkd_adapters.sim.physics.detector import click_patterns, time_ordered_clicks
from qkd_adapters.sim.physics.eve import Eavesdropper, honest_branches

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
) -> BB84Block:
    """Simulate ``n_pulses`` clock cycles of decoy-state BB84 (exact law, reproducible from ``rng``)."""
    if n_pulses <= 0:
        raise ValueError("n_pulses must be positive")
    model = class_model(params, eve)
    if params.dead_gates > 0 or params.afterpulse_prob > 0.0:
        return _simulate_time_ordered(params, model, n_pulses, rng, eve is not None)
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


def _simulate_time_ordered(
    params: LinkParameters, model: ClassModel, n_pulses: int, rng: np.random.Generator, with_eve: bool
) -> BB84Block:
    seed = int(rng.integers(0, 2**62))
    res = time_ordered_clicks(
        n_pulses,
        model.weights,
        model.patterns,
        KEY_CLASS,
        params.dead_gates,
        params.afterpulse_prob,
        params.afterpulse_delay_s * params.clock_rate_hz,
        seed,
    )
    w = model.weights / model.weights.sum()
    nondetect = w * model.patterns[:, :, 0].sum(axis=1)
    quiet = n_pulses - int(res.events.sum()) - int(res.extra_gates.sum())
    sent = res.events + res.extra_gates + rng.multinomial(quiet, nondetect / nondetect.sum())
    counts = _aggregate(params, sent, res.detected, res.errors)
    return BB84Block(
        alice_key=res.alice,
        bob_key=res.bob,
        counts=counts,
        n_pulses=n_pulses,
        duration_s=n_pulses / params.clock_rate_hz,
        eve_knows=res.eve.astype(bool) if with_eve else None,
        dead_time_losses=int(res.stats[0]),
        afterpulse_gates=int(res.stats[1]),
        double_clicks=int(res.stats[2]),
        detector_clicks=(int(res.stats[3]), int(res.stats[4])),
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
