"""Which eavesdropper sits on a simulated link's fibre, as a link option (a string or an AttackSpec)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qkd_adapters.sim.physics.eve import BeamSplitting, Eavesdropper, InterceptResend, PhotonNumberSplitting


@dataclass(frozen=True)
class AttackSpec:
    """Which eavesdropper sits on the fibre: ``none``, ``intercept-resend`` (with the fraction of
    pulses intercepted), ``pns`` (photon-number splitting) or ``beam-splitting``."""

    kind: Literal["none", "intercept-resend", "pns", "beam-splitting"] = "none"
    fraction: float = 1.0

    @classmethod
    def parse(cls, spec: AttackSpec | str | None) -> AttackSpec:
        """Accept an AttackSpec, None, or strings like ``"intercept-resend:0.3"``."""
        if isinstance(spec, AttackSpec):
            return spec
        if spec is None or spec == "none":
            return cls()
        name, _, frac = spec.partition(":")
        if name == "intercept-resend":
            return cls("intercept-resend", float(frac) if frac else 1.0)
        if name in ("pns", "beam-splitting") and not frac:
            return cls(name)  # type: ignore[arg-type]
        raise ValueError(f"unknown attack {spec!r}")

    def eavesdropper(self) -> Eavesdropper | None:
        if self.kind == "intercept-resend":
            return InterceptResend(fraction=self.fraction)
        if self.kind == "pns":
            return PhotonNumberSplitting()
        if self.kind == "beam-splitting":
            return BeamSplitting()
        return None

    def label(self) -> str:
        return f"intercept-resend:{self.fraction:g}" if self.kind == "intercept-resend" else self.kind
