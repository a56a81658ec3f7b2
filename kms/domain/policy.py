"""Key policies per SAE pair (docs/DECISIONS.md D-4).

- ``qkd``: the QKD bits as delivered by the link;
- ``hybrid``: the QKD bits combined with an ML-KEM shared secret (``kms.crypto.hybrid``), secure if
  either is;
- ``pqc_fallback``: when allowed and no QKD key can be served (pool short or link suspended), a key
  derived from ML-KEM alone. Within one KME, the encapsulation is to this KME's own ML-KEM key: the
  same code path as between two KMEs, but no extra security on one site, where the KME holds both.

Rules are matched in order; ``*`` matches any SAE. The first matching rule wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    QKD = "qkd"
    HYBRID = "hybrid"


POLICY_FALLBACK = "pqc_fallback"


@dataclass(frozen=True)
class PairPolicy:
    mode: Mode
    pqc_fallback: bool
    kem: str

    def suite(self, fallback: bool) -> str | None:
        """The suite recorded in provenance; None for plain QKD keys."""
        if fallback:
            return f"{self.kem}/HKDF-SHA-384"
        if self.mode is Mode.HYBRID:
            return f"{self.kem}+QKD/HKDF-SHA-384"
        return None


@dataclass(frozen=True)
class PolicyRule:
    master: str
    slave: str
    policy: PairPolicy

    def matches(self, master: str, slave: str) -> bool:
        return self.master in ("*", master) and self.slave in ("*", slave)


class PolicyBook:
    """Resolves the policy for a (master, slave) pair."""

    def __init__(self, default: PairPolicy, rules: Sequence[PolicyRule] = ()) -> None:
        self.default = default
        self.rules = list(rules)

    def for_pair(self, master: str, slave: str) -> PairPolicy:
        for rule in self.rules:
            if rule.matches(master, slave):
                return rule.policy
        return self.default
