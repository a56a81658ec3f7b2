"""Per-intensity, per-basis detection statistics: what decoy-state parameter estimation reads.

Index conventions: intensity 0 = signal (mu), 1 = weak decoy (nu), 2 = vacuum decoy; basis
0 = Z (key), 1 = X (test). ``detected[k, b]`` and ``errors[k, b]`` count events in which both
Alice and Bob used basis b (the n_{b,k} and m_{b,k} of Lim et al. 2014); ``sent[k, b]`` counts
pulses Alice sent with intensity k in basis b, whatever Bob chose. Counts are integers for a
simulated block and floats for the expected values of :func:`qkd_adapters.sim.analytic.expected_counts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Z, X = 0, 1
SIGNAL, DECOY, VACUUM = 0, 1, 2


@dataclass(frozen=True)
class DecoyCounts:
    """Sent, detected and erroneous counts per (intensity, basis), plus the protocol settings."""

    intensities: tuple[float, float, float]
    probabilities: tuple[float, float, float]
    p_z: float
    sent: npt.NDArray[Any]
    detected: npt.NDArray[Any]
    errors: npt.NDArray[Any]
    detected_all: npt.NDArray[Any]

    @classmethod
    def from_classes(
        cls,
        intensities: tuple[float, float, float],
        probabilities: tuple[float, float, float],
        p_z: float,
        sent: npt.NDArray[Any],
        detected: npt.NDArray[Any],
        errors: npt.NDArray[Any],
    ) -> DecoyCounts:
        """Fold per-class arrays (intensity x Alice basis x Bob basis, flattened) into per-(intensity,
        basis) counts: matching bases only for detections and errors. Keeps the arrays' dtype, so
        simulated integer counts and analytic expectations share one definition."""
        shape = (len(intensities), 2, 2)
        s, d, e = (np.asarray(a).reshape(shape) for a in (sent, detected, errors))
        diag = np.arange(2)
        return cls(
            intensities=intensities,
            probabilities=probabilities,
            p_z=p_z,
            sent=s.sum(axis=2),
            detected=d[:, diag, diag],
            errors=e[:, diag, diag],
            detected_all=d.sum(axis=(1, 2)),
        )

    @property
    def n_z(self) -> float:
        """Sifted Z-basis detections over all intensities."""
        return float(np.sum(self.detected[:, Z]))

    @property
    def n_x(self) -> float:
        """Sifted X-basis detections over all intensities."""
        return float(np.sum(self.detected[:, X]))

    @property
    def m_z(self) -> float:
        """Z-basis errors over all intensities."""
        return float(np.sum(self.errors[:, Z]))

    @property
    def m_x(self) -> float:
        """X-basis errors over all intensities (the observed phase-error test)."""
        return float(np.sum(self.errors[:, X]))

    def gain(self, k: int) -> float:
        """Q_k: detections (any bases) per pulse of intensity k."""
        sent = float(np.sum(self.sent[k]))
        return float(self.detected_all[k]) / sent if sent > 0 else float("nan")

    def qber(self, k: int, basis: int) -> float:
        """Error rate among sifted events of intensity k in the given basis."""
        n = float(self.detected[k, basis])
        return float(self.errors[k, basis]) / n if n > 0 else float("nan")
