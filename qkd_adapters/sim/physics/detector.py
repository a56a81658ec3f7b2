"""Bob's two threshold detectors: efficiency, dark counts, squashing, dead time, afterpulsing.

Per gate, a pulse yields three *arrival* probabilities (at least one photon reaches either
detector, the detector named by Alice's bit value 'C', the other one 'W'), detection efficiency
already folded into the photon transmittance. Dark counts fire each detector independently with
probability ``pd``. From these follow the exact probabilities of the four click patterns
(none, C only, W only, both); a double click is squashed to a random bit (Beaufils et al.;
Lim et al., PRA 89, 022307 (2014), protocol step 2).

Dead time and afterpulsing correlate gates; :mod:`.gates` applies them (see docs/PHYSICS.md): a
dead detector ignores what reaches it (non-paralysable dead time, ``dead_gates`` blind gates after
each registered click), and each registered click, with probability ``afterpulse_prob``, triggers
one extra click on the same detector at the first gate after it re-arms plus an exponentially
distributed delay (trap release); a pending afterpulse is dropped if that detector clicks first.
:func:`registered_rate_dead_time` is the closed form the samplers are checked against.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

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
