"""Bob's two threshold detectors: efficiency, dark counts, squashing, dead time, afterpulsing.

Per gate, a pulse yields three *arrival* probabilities (at least one photon reaches either
detector, the detector named by Alice's bit value 'C', the other one 'W'), detection efficiency
already folded into the photon transmittance. Dark counts fire each detector independently with
probability ``pd``. From these follow the exact probabilities of the four click patterns
(none, C only, W only, both); a double click is squashed to a random bit (Beaufils et al.;
Lim et al., PRA 89, 022307 (2014), protocol step 2).

Dead time and afterpulsing correlate gates, so they are applied by :func:`time_ordered_clicks`,
a single pass over the *would-click* events in time order (see docs/PHYSICS.md): a dead detector
ignores what reaches it (non-paralysable dead time, ``dead_gates`` blind gates after each
registered click), and each registered click, with probability ``afterpulse_prob``, triggers one
extra click on the same detector at the first gate after it re-arms plus an exponentially
distributed delay (trap release); a pending afterpulse is dropped if that detector clicks first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
ByteArray = npt.NDArray[np.uint8]

PATTERN_NONE, PATTERN_C, PATTERN_W, PATTERN_BOTH = 0, 1, 2, 3


def click_patterns(p_any: float, p_c: float, p_w: float, dark_count_prob: float) -> FloatArray:
    """[P(none), P(C only), P(W only), P(both)] from photon-arrival probabilities and dark counts."""
    y0 = dark_count_prob * (2.0 - dark_count_prob)
    any_click = p_any + y0 - p_any * y0
    c_click = p_c + dark_count_prob - p_c * dark_count_prob
    w_click = p_w + dark_count_prob - p_w * dark_count_prob
    c_only = max(any_click - w_click, 0.0)
    w_only = max(any_click - c_click, 0.0)
    both = max(c_click + w_click - any_click, 0.0)
    return np.array([1.0 - any_click, c_only, w_only, both], dtype=np.float64)


def poisson_arrivals(mean_detected: float, correct: float) -> tuple[float, float, float]:
    """Arrival probabilities for a Poisson number of photons of mean ``mean_detected`` at Bob.

    Each photon goes to C with probability ``correct``; Poisson thinning makes the two detectors'
    photon numbers independent Poisson variables.
    """
    x = mean_detected
    return (-math.expm1(-x), -math.expm1(-x * correct), -math.expm1(-x * (1.0 - correct)))


def fock_mixture_arrivals(pmf: FloatArray, eta: float, correct: float) -> tuple[float, float, float]:
    """Arrival probabilities for a mixture of Fock states, P(m) = pmf[m], each photon kept with eta."""
    m = np.arange(pmf.shape[0], dtype=np.float64)

    def hit(q: float) -> float:
        if q <= 0.0:
            return 0.0
        return float(np.sum(pmf * -np.expm1(m * math.log1p(-min(q, 1.0 - 1e-300)))))

    return (hit(eta), hit(eta * correct), hit(eta * (1.0 - correct)))


def registered_rate_dead_time(click_prob: float, dead_gates: int, afterpulse_prob: float = 0.0) -> float:
    """Registered clicks per gate of one detector with Bernoulli(click_prob) would-clicks.

    Non-paralysable dead time of ``dead_gates`` gates; with zero afterpulse delay an afterpulse
    fires at the re-arm gate with probability ``afterpulse_prob``. The mean cycle is
    ``dead_gates + 1 + (1 - s)/q`` with ``s = p_ap + (1 - p_ap) q`` (renewal argument).
    """
    q = click_prob
    s = afterpulse_prob + (1.0 - afterpulse_prob) * q
    return 1.0 / (dead_gates + 1.0 + (1.0 - s) / q)


@numba.njit(cache=True)
def _seed_numba(seed: int) -> None:
    np.random.seed(seed)


@numba.njit(cache=True)
def _draw(cum: FloatArray) -> int:
    """Index drawn from a cumulative distribution (linear scan: categories sorted by weight)."""
    u = np.random.random()
    i = 0
    last = cum.shape[0] - 1
    while i < last and u >= cum[i]:
        i += 1
    return i


@numba.njit(cache=True)
def _time_ordered_kernel(
    n_pulses: int,
    p_click: float,
    cat_cum: FloatArray,
    cat_class: IntArray,
    cat_eve: IntArray,
    cat_pattern: IntArray,
    nondet_cum: FloatArray,
    key_class: int,
    dead_gates: int,
    afterpulse_prob: float,
    afterpulse_delay_gates: float,
    events: IntArray,
    detected: IntArray,
    errors: IntArray,
    extra_gates: IntArray,
    out_alice: ByteArray,
    out_bob: ByteArray,
    out_eve: ByteArray,
    stats: IntArray,
) -> int:
    never = np.int64(1) << np.int64(62)
    log_q = math.log1p(-p_click) if p_click < 1.0 else -np.inf
    dead_until0 = np.int64(0)
    dead_until1 = np.int64(0)
    ap0 = never
    ap1 = never
    capacity = out_alice.shape[0]
    nk = 0

    def next_event(after: np.int64) -> np.int64:
        if p_click <= 0.0:
            return never
        gap = np.int64(1)
        if log_q > -np.inf:
            gap += np.int64(math.floor(math.log1p(-np.random.random()) / log_q))
        return after + gap

    t_ev = next_event(np.int64(-1))
    while True:
        t = min(t_ev, min(ap0, ap1))
        if t >= n_pulses:
            break
        is_ev = t == t_ev
        would0 = False
        would1 = False
        alice = 0
        c = np.int64(-1)
        e = np.int64(0)
        if is_ev:
            k = _draw(cat_cum)
            c = cat_class[k]
            p = cat_pattern[k]
            e = cat_eve[k]
            events[c] += 1
            alice = 1 if np.random.random() < 0.5 else 0
            hit_c = p == 1 or p == 3
            hit_w = p == 2 or p == 3
            if alice == 0:
                would0 = hit_c
                would1 = hit_w
            else:
                would1 = hit_c
                would0 = hit_w
            t_ev = next_event(t)
        ap_fired = False
        if ap0 == t:
            ap_fired = ap_fired or not would0
            would0 = True
            ap0 = never
        if ap1 == t:
            ap_fired = ap_fired or not would1
            would1 = True
            ap1 = never
        click0 = would0 and t >= dead_until0
        click1 = would1 and t >= dead_until1
        if not (click0 or click1):
            if is_ev:
                stats[0] += 1  # would-click event lost to dead time
            continue
        if ap_fired:
            stats[1] += 1  # gate with at least one afterpulse click
        if not is_ev:
            c = np.int64(_draw(nondet_cum))
            alice = 1 if np.random.random() < 0.5 else 0
            extra_gates[c] += 1
        if click0 and click1:
            bob = 1 if np.random.random() < 0.5 else 0
            stats[2] += 1
        elif click0:
            bob = 0
        else:
            bob = 1
        detected[c] += 1
        if bob != alice:
            errors[c] += 1
        if c == key_class:
            if nk >= capacity:
                return -1
            out_alice[nk] = alice
            out_bob[nk] = bob
            out_eve[nk] = e
            nk += 1
        if click0:
            stats[3] += 1
            dead_until0 = t + 1 + dead_gates
            if afterpulse_prob > 0.0 and np.random.random() < afterpulse_prob:
                delay = 0
                if afterpulse_delay_gates > 0.0:
                    delay = int(-afterpulse_delay_gates * math.log(1.0 - np.random.random()))
                ap0 = dead_until0 + delay
        if click1:
            stats[4] += 1
            dead_until1 = t + 1 + dead_gates
            if afterpulse_prob > 0.0 and np.random.random() < afterpulse_prob:
                delay = 0
                if afterpulse_delay_gates > 0.0:
                    delay = int(-afterpulse_delay_gates * math.log(1.0 - np.random.random()))
                ap1 = dead_until1 + delay
    return nk


@dataclass(frozen=True)
class TimeOrderedResult:
    """Registered statistics per class from :func:`time_ordered_clicks`."""

    events: IntArray
    detected: IntArray
    errors: IntArray
    extra_gates: IntArray
    alice: ByteArray
    bob: ByteArray
    eve: ByteArray
    stats: IntArray


def time_ordered_clicks(
    n_pulses: int,
    class_probs: FloatArray,
    event_probs: FloatArray,
    key_class: int,
    dead_gates: int,
    afterpulse_prob: float,
    afterpulse_delay_gates: float,
    seed: int,
) -> TimeOrderedResult:
    """Simulate a block gate by gate in time order, jumping between would-click gates.

    ``class_probs[c]`` is the prior probability of class c and ``event_probs[c, eve, pattern]``
    (pattern 0 = no click) its click-pattern law. Would-click gates form a Bernoulli process
    (geometric gaps); each one's (class, eve flag, pattern) is drawn from the conditional law,
    then dead time and afterpulses are applied. ``events`` counts would-click gates per class,
    ``extra_gates`` the otherwise silent gates that an afterpulse made click (their class drawn
    from the no-click posterior); stats = [lost to dead time, afterpulse gates, double clicks,
    clicks of detector 0, clicks of detector 1].
    """
    law = _click_law(class_probs, event_probs, key_class)
    n_classes = class_probs.shape[0]
    expected_key = n_pulses * law.key_share
    capacity = int(
        expected_key + 10.0 * math.sqrt(expected_key) + 1024 + 4.0 * afterpulse_prob * n_pulses * law.p_click
    )
    while True:
        res = _empty_result(n_classes, capacity)
        _seed_numba(seed)
        nk = _time_ordered_kernel(
            n_pulses,
            law.p_click,
            law.cat_cum,
            law.cat_class,
            law.cat_eve,
            law.cat_pattern,
            law.nondet_cum,
            key_class,
            dead_gates,
            afterpulse_prob,
            afterpulse_delay_gates,
            res.events,
            res.detected,
            res.errors,
            res.extra_gates,
            res.alice,
            res.bob,
            res.eve,
            res.stats,
        )
        if nk >= 0:
            return TimeOrderedResult(
                events=res.events,
                detected=res.detected,
                errors=res.errors,
                extra_gates=res.extra_gates,
                alice=res.alice[:nk],
                bob=res.bob[:nk],
                eve=res.eve[:nk],
                stats=res.stats,
            )
        capacity *= 2


@dataclass(frozen=True)
class _ClickLaw:
    """The law :func:`_time_ordered_kernel` samples would-click gates from.

    ``p_click`` is the probability that a gate would click; the categories (class, eve flag, pattern)
    of a would-click gate are sorted by decreasing probability, ``cat_cum`` their cumulative
    conditional law; ``nondet_cum`` the cumulative class law of a gate that would not click;
    ``key_share`` the probability that a gate is a would-click gate of the key class.
    """

    p_click: float
    cat_cum: FloatArray
    cat_class: IntArray
    cat_eve: IntArray
    cat_pattern: IntArray
    nondet_cum: FloatArray
    key_share: float


def _click_law(class_probs: FloatArray, event_probs: FloatArray, key_class: int) -> _ClickLaw:
    w = class_probs / class_probs.sum()
    joint = w[:, None, None] * event_probs[:, :, 1:]
    flat = joint.reshape(-1)
    p_click = float(flat.sum())
    order = np.argsort(flat)[::-1]
    cat_cum = np.cumsum(flat[order]) / p_click if p_click > 0 else np.ones(1)
    n_pat = event_probs.shape[2] - 1
    n_eve = event_probs.shape[1]
    nondet = w * event_probs[:, :, 0].sum(axis=1)
    return _ClickLaw(
        p_click=p_click,
        cat_cum=cat_cum,
        cat_class=(order // (n_eve * n_pat)).astype(np.int64),
        cat_eve=((order // n_pat) % n_eve).astype(np.int64),
        cat_pattern=(order % n_pat + 1).astype(np.int64),
        nondet_cum=np.cumsum(nondet) / nondet.sum(),
        key_share=float(joint[key_class].sum()),
    )


def _empty_result(n_classes: int, capacity: int) -> TimeOrderedResult:
    """Zeroed counters and room for ``capacity`` key-class clicks, for the kernel to fill."""
    return TimeOrderedResult(
        events=np.zeros(n_classes, dtype=np.int64),
        detected=np.zeros(n_classes, dtype=np.int64),
        errors=np.zeros(n_classes, dtype=np.int64),
        extra_gates=np.zeros(n_classes, dtype=np.int64),
        alice=np.empty(capacity, dtype=np.uint8),
        bob=np.empty(capacity, dtype=np.uint8),
        eve=np.empty(capacity, dtype=np.uint8),
        stats=np.zeros(5, dtype=np.int64),
    )
