"""The SAE registry: which applications exist, at which KME, and which certificate each presents.

Identity is the pair (certificate CN, pinned SHA-256 fingerprint); both must match. The registry is
an in-memory map refreshed from the database, so authenticating a request costs one dict lookup.
The database is the record (``qkms sae ...``, DECISIONS.md D-29): every process compares the
registry's version number with the database's at most once per ``sae_registry.refresh_ms`` and
reloads when it changed, so a revocation reaches every process without a restart.

An SAE is ``active``, ``suspended`` (refused until resumed) or ``revoked`` (refused for good; its ID
is never registered again). During a rotation's grace period an SAE has two pinned certificates:
the new one and the old one, accepted until its ``until`` time.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

SAE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def sae_id_refusal(sae_id: str) -> str | None:
    """Why ``sae_id`` cannot name an SAE (it is a certificate CN and a file name), or None."""
    if SAE_ID_PATTERN.match(sae_id):
        return None
    return f"SAE ID {sae_id!r} must be 1-128 characters of letters, digits, '.', '_' or '-'"


class SaeState(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    REVOKED = "revoked"


# The lifecycle's allowed moves: revocation is final, suspension reversible.
SAE_TRANSITIONS: dict[SaeState, frozenset[SaeState]] = {
    SaeState.ACTIVE: frozenset({SaeState.SUSPENDED, SaeState.REVOKED}),
    SaeState.SUSPENDED: frozenset({SaeState.ACTIVE, SaeState.REVOKED}),
    SaeState.REVOKED: frozenset(),
}


def sae_transition_refusal(current: SaeState, target: SaeState) -> str | None:
    """Why ``current -> target`` is not allowed (a one-line message), or None if it is."""
    if target in SAE_TRANSITIONS[current]:
        return None
    if current is SaeState.REVOKED:
        return "is revoked; a revoked SAE cannot change state (register a new SAE ID)"
    return f"is already {current.value}" if current is target else f"is {current.value}, not {target.value}"


def peer_notice_applies(
    held: tuple[SaeState, datetime | None] | None, told: SaeState, changed_at: datetime
) -> bool:
    """Whether a peer KME's notice that its SAE is now ``told`` (as of ``changed_at``, its clock)
    changes what this KME holds (DECISIONS.md D-39): revocation is final, an older notice never
    overrides a newer one, and a notice of the state already held changes nothing."""
    if held is None:
        return told is not SaeState.ACTIVE
    state, at = held
    if state is SaeState.REVOKED or state is told:
        return False
    return at is None or changed_at > at


@dataclass(frozen=True)
class SaeInfo:
    sae_id: str
    kme_id: str
    fingerprint: str
    enabled: bool = True
    role: str = "sae"  # "sae", "auditor" or "kme"
    state: str = SaeState.ACTIVE.value


@dataclass(frozen=True)
class PinnedCertificate:
    """What the registry records of a certificate it pins (never the certificate's key)."""

    fingerprint: str
    subject: str
    issuer: str
    origin: str  # "site-ca" (issued by this KME's CA) or "enterprise" (another CA, pinned)
    not_after: datetime


@dataclass(frozen=True)
class GraceCertificate:
    """An SAE's previous certificate, still accepted until ``until`` (Unix time) after a rotation."""

    fingerprint: str
    sae_id: str
    until: float


class SaeRegistry:
    """Thread-safe lookups by SAE ID and by certificate fingerprint."""

    def __init__(self, entries: Iterable[SaeInfo] = ()) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, SaeInfo] = {}
        self._by_fp: dict[str, SaeInfo] = {}
        self._grace: dict[str, GraceCertificate] = {}
        self._last_reload = 0.0
        # The database's registry version this map reflects (-1: unknown, reload at the first check)
        # and when the next comparison is due (monotonic seconds).
        self.version = -1
        self.next_check = 0.0
        self.replace(entries)

    def replace(self, entries: Iterable[SaeInfo], grace: Iterable[GraceCertificate] = ()) -> None:
        by_id = {e.sae_id: e for e in entries}
        with self._lock:
            self._by_id = by_id
            self._by_fp = {e.fingerprint: e for e in by_id.values()}
            self._grace = {g.fingerprint: g for g in grace if g.sae_id in by_id}

    def get(self, sae_id: str) -> SaeInfo | None:
        return self._by_id.get(sae_id)

    def by_fingerprint(self, fingerprint: str) -> SaeInfo | None:
        info = self._by_fp.get(fingerprint)
        if info is not None or not self._grace:
            return info
        old = self._grace.get(fingerprint)
        if old is None or time.time() >= old.until:
            return None
        return self._by_id.get(old.sae_id)

    def grace_certificates(self) -> Mapping[str, GraceCertificate]:
        return dict(self._grace)

    def check_due(self, now: float, interval: float) -> bool:
        """True at most once per ``interval`` seconds: time to compare the version with the database's."""
        if now < self.next_check:
            return False
        self.next_check = now + interval
        return True

    def stale(self, min_interval: float = 5.0) -> bool:
        """True when a reload is allowed (rate-limited so unknown callers cannot hammer the database)."""
        now = time.monotonic()
        if now - self._last_reload < min_interval:
            return False
        self._last_reload = now
        return True
