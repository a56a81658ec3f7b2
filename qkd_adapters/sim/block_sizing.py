"""Blocks sized by the finite-key analysis: how many pulses the next block of a link collects.

A fixed block of link time gives no key where the finite-size terms of the bound outweigh the
entropy (GYS at 50 km: every 1 s block at 1 GHz aborts while the asymptotic rate is ~100 kbit/s),
and needlessly long blocks elsewhere. Real systems accumulate detections until the block is
worth closing, within a maximum block time. :class:`BlockSizer` does this: before a block starts
it picks the smallest pulse count (a multiple of ``step_seconds``) at which the finite-key rate,
evaluated on the expected statistics scaled to that size, reaches ``efficiency`` times the rate
of a block of ``max_block_seconds``; where even that gives no key, the block runs to the maximum.

Why the size is fixed when the block starts and not decided from the block's own detections:
the Hoeffding bounds of Lim et al. (2014) and Tomamichel et al. (2012) hold for a block whose
length does not depend on its own test statistics. A rule that stops when *this* block's
statistics look good would need a union bound over every possible stopping point. So the
expected statistics come from the link's model for the first block (:func:`.analytic.expected_counts`,
which knows no dead time) and from the detections of the last ``window`` blocks afterwards,
which includes dead time, afterpulsing and whatever the channel does - but never from the block
being sized.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from qkd_adapters.sim.analytic import expected_counts
from qkd_adapters.sim.finite_key import bbm92_secret_key_length, secret_key_length
from qkd_adapters.sim.params import LinkParameters, SPDCParameters
from qkd_adapters.sim.physics.bb84 import BB84Block
from qkd_adapters.sim.physics.bbm92 import BBM92Block, bbm92_model
from qkd_adapters.sim.physics.counts import DecoyCounts, Z

SizingMode = Literal["fixed", "finite-key"]
SIZING_MODES: tuple[SizingMode, ...] = ("fixed", "finite-key")
EXPECTED_EC_EFFICIENCY = 1.08  # the leak assumed when sizing; the pipeline counts the real one
CLOSED_TARGET = "finite-key target"
CLOSED_MAXIMUM = "maximum block time"
CLOSED_MAX_BITS = "maximum block size (sifted bits)"
CLOSED_FIXED = "fixed block size"

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class BlockSizing:
    """How a link sizes its blocks.

    ``mode="fixed"``: every block is the link's ``pulses_per_block``. ``mode="finite-key"``: each
    block is sized as described in the module docstring; ``efficiency`` in (0, 1] is the share of a
    ``max_block_seconds`` block's finite-key rate a block must be expected to reach, and
    ``step_seconds`` the granularity of block sizes. ``max_block_bits`` caps the expected sifted key
    bits of a block (memory: physics and post-processing hold a few bytes per sifted bit, times ~10
    in temporaries), whatever ``max_block_seconds`` allows.
    """

    mode: SizingMode = "fixed"
    efficiency: float = 0.8
    max_block_seconds: float = 60.0
    step_seconds: float = 0.01
    window: int = 4
    max_block_bits: int = 2**24

    def __post_init__(self) -> None:
        if self.mode not in SIZING_MODES:
            raise ValueError(f"block sizing must be one of {', '.join(SIZING_MODES)}")
        if not 0.0 < self.efficiency <= 1.0:
            raise ValueError("block efficiency must lie in (0, 1]")
        if not (math.isfinite(self.max_block_seconds) and self.max_block_seconds > 0.0):
            raise ValueError("max_block_seconds must be positive")
        if not (math.isfinite(self.step_seconds) and 0.0 < self.step_seconds <= self.max_block_seconds):
            raise ValueError("step_seconds must be positive and at most max_block_seconds")
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.max_block_bits < 1:
            raise ValueError("max_block_bits must be >= 1")


@dataclass(frozen=True)
class BlockPlan:
    """The size chosen for one block and why (recorded in the block's provenance)."""

    pulses: int
    closed_by: str
    statistics_from: str
    expected_length: int
    expected_rate_bps: float
    max_block_rate_bps: float

    def provenance(self, clock_rate_hz: float, sizing: BlockSizing) -> dict[str, Any]:
        return {
            "mode": sizing.mode,
            "link_seconds": self.pulses / clock_rate_hz,
            "closed_by": self.closed_by,
            "statistics_from": self.statistics_from,
            "expected_final_bits": self.expected_length,
            "expected_rate_bps": self.expected_rate_bps,
            "max_block_rate_bps": self.max_block_rate_bps,
            "efficiency_target": sizing.efficiency,
            "max_block_seconds": sizing.max_block_seconds,
        }


class _Bb84Stats:
    """Decoy statistics per pulse: what a block of N pulses is expected to see, times 1/N."""

    def __init__(self, counts: DecoyCounts, pulses: float) -> None:
        self.counts, self.pulses = counts, pulses

    def sifted_per_pulse(self) -> float:
        return float(self.counts.detected[0, Z]) / self.pulses

    def length(self, n_pulses: float, eps_sec: float, eps_cor: float) -> int:
        f = n_pulses / self.pulses
        c = self.counts
        scaled = DecoyCounts(
            c.intensities,
            c.probabilities,
            c.p_z,
            c.sent * f,
            c.detected * f,
            c.errors * f,
            c.detected_all * f,
        )
        n_key = float(scaled.detected[0, Z])
        if n_key <= 0.0:
            return 0
        qber = float(scaled.errors[0, Z]) / n_key
        leak = int(EXPECTED_EC_EFFICIENCY * n_key * _h2(qber))
        return secret_key_length(scaled, leak, eps_sec, eps_cor).length


class _Bbm92Stats:
    """Key and test coincidences and errors per pulse for BBM92."""

    def __init__(self, key: float, key_errors: float, test: float, test_errors: float, pulses: float) -> None:
        self.values = np.array([key, key_errors, test, test_errors], dtype=np.float64) / pulses

    def sifted_per_pulse(self) -> float:
        return float(self.values[0])

    def length(self, n_pulses: float, eps_sec: float, eps_cor: float) -> int:
        n, m, k, e = (float(v) * n_pulses for v in self.values)
        if n < 1.0 or k < 1.0:
            return 0
        leak = int(EXPECTED_EC_EFFICIENCY * n * _h2(m / n))
        return bbm92_secret_key_length(int(n), int(k), round(e), leak, eps_sec, eps_cor)[0]


class BlockSizer:
    """Chooses each block's pulse count from statistics that exclude the block itself."""

    def __init__(
        self,
        sizing: BlockSizing,
        params: LinkParameters,
        *,
        protocol: str = "decoy-bb84",
        spdc: SPDCParameters | None = None,
    ) -> None:
        self.sizing, self.params, self.protocol = sizing, params, protocol
        self.step = max(1, round(sizing.step_seconds * params.clock_rate_hz))
        self.max_steps = max(1, math.floor(sizing.max_block_seconds * params.clock_rate_hz / self.step))
        self._history: deque[BB84Block | BBM92Block] = deque(maxlen=sizing.window)
        self._model = self._model_stats(spdc)

    def observe(self, block: BB84Block | BBM92Block) -> None:
        """Remember a finished block's detections for sizing the blocks after it."""
        self._history.append(block)

    def plan(self) -> BlockPlan:
        """The next block's size: the smallest efficient one, else the maximum."""
        stats, source = (
            (self._observed(), "previous blocks") if self._history else (self._model, "link model")
        )
        p = self.params
        bits_per_step = stats.sifted_per_pulse() * self.step
        cap = (
            max(1, math.floor(self.sizing.max_block_bits / bits_per_step))
            if bits_per_step > 0
            else self.max_steps
        )
        full = self.max_steps * self.step
        full_len = stats.length(full, p.eps_sec, p.eps_cor)
        full_rate = full_len / full
        steps = self.max_steps
        if full_len > 0:
            target = self.sizing.efficiency * full_rate
            lo = 0  # rate(steps) reaches the target; find the smallest such step count
            while steps - lo > 1:
                mid = (lo + steps) // 2
                if stats.length(mid * self.step, p.eps_sec, p.eps_cor) >= target * mid * self.step:
                    steps = mid
                else:
                    lo = mid
        closed = CLOSED_MAXIMUM if steps == self.max_steps else CLOSED_TARGET
        if steps > cap:
            steps, closed = cap, CLOSED_MAX_BITS
        pulses = steps * self.step
        length = stats.length(pulses, p.eps_sec, p.eps_cor)
        hz = p.clock_rate_hz
        return BlockPlan(pulses, closed, source, length, length / pulses * hz, full_rate * hz)

    def _observed(self) -> _Bb84Stats | _Bbm92Stats:
        blocks = list(self._history)
        pulses = float(sum(b.n_pulses for b in blocks))
        if isinstance(blocks[0], BB84Block):
            bb = [b for b in blocks if isinstance(b, BB84Block)]
            c = bb[0].counts
            summed = DecoyCounts(
                c.intensities,
                c.probabilities,
                c.p_z,
                *(np.sum([getattr(b.counts, a) for b in bb], axis=0) for a in _COUNT_FIELDS),
            )
            return _Bb84Stats(summed, pulses)
        ent = [b for b in blocks if isinstance(b, BBM92Block)]
        total = np.sum(
            [[b.coincidences[0, 0], b.errors[0, 0], b.coincidences[1, 1], b.errors[1, 1]] for b in ent], 0
        )
        key, key_errors, test, test_errors = (float(v) for v in total)
        return _Bbm92Stats(key, key_errors, test, test_errors, pulses)

    def _model_stats(self, spdc: SPDCParameters | None) -> _Bb84Stats | _Bbm92Stats:
        """The honest link's expectation: the devices do not know whether Eve is on the fibre."""
        if self.protocol == "decoy-bb84":
            return _Bb84Stats(expected_counts(self.params, 1.0), 1.0)
        if spdc is None:
            raise ValueError("BBM92 block sizing needs the SPDC source parameters")
        model = bbm92_model(self.params, spdc)
        w = model.weights / model.weights.sum()
        coinc = w * model.coincidence_prob
        err = w * model.error_prob()
        return _Bbm92Stats(coinc[0, 0], err[0, 0], coinc[1, 1], err[1, 1], 1.0)


_COUNT_FIELDS = ("sent", "detected", "errors", "detected_all")


def _h2(x: float) -> float:
    if x <= 0.0 or x >= 1.0:
        return 0.0
    return -x * math.log2(x) - (1.0 - x) * math.log2(1.0 - x)
