"""Records refused authentications (401 before routing) in the log and the audit, without letting a
flood of them grow either without bound.

A client whose certificate passed the TLS handshake (so it comes from a CA this KME trusts) but maps
to no SAE allowed here — an unpinned certificate, a CN that does not match, a KME or auditor
certificate on the key API — is refused before anything else runs. Each such denial is worth an
``access.denied`` record, but a client that repeats one in a loop must not be able to write one audit
record (a database write, kept forever) per request. So denials are aggregated per (certificate
fingerprint, reason): the first in a window is logged and audited at once; the others in the same
window are only counted, and the count (``repeats``) goes into the next record for the same
certificate and reason, or into a summary record when the window is evicted or the server stops.
The audit grows by at most one record per certificate and reason per window (plus one overflow
bucket, once ``MAX_TRACKED`` certificates and reasons are being counted), per server process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from kms.service import audit_recorder
from kms.storage.database import Database

log = structlog.get_logger(__name__)

MAX_TRACKED = 1024
_OVERFLOW = ("*", "denials from more certificates and reasons than are tracked one by one")
_TEXT_LIMIT = 200


@dataclass(frozen=True)
class Denial:
    """One refused request, described without key material (certificate, reason, method, path)."""

    fingerprint: str
    common_name: str
    role: str | None
    reason: str
    method: str
    path: str
    repeats: int = 0  # further identical denials since the last record, not recorded one by one
    summary: bool = False  # a record of repeats only (window evicted, server stopping)

    def audit_entry(self) -> tuple[str, str, str, dict[str, Any]]:
        actor = f"cert:{self.fingerprint[:16]}"
        data = {
            "reason": self.reason,
            "fingerprint": self.fingerprint,
            "common_name": self.common_name[:_TEXT_LIMIT],
            "role": self.role,
            "method": self.method[:16],
            "path": self.path[:_TEXT_LIMIT],
            "repeats": self.repeats,
        }
        if self.summary:
            data["summary"] = True
        return actor, "access.denied", "api", data


@dataclass
class _Window:
    started: float
    last: Denial
    repeats: int = 0


@dataclass
class DenialAggregator:
    """Decides which denials become records (pure: no I/O, one event loop calls it)."""

    window_seconds: float
    max_tracked: int = MAX_TRACKED
    clock: Callable[[], float] = time.monotonic
    _windows: dict[tuple[str, str], _Window] = field(default_factory=dict)

    def note(self, denial: Denial) -> list[Denial]:
        """The records to write for this denial: none (counted), or it with earlier repeats, and
        summaries of windows evicted to make room."""
        now = self.clock()
        out: list[Denial] = []
        key = (denial.fingerprint, denial.reason)
        window = self._windows.get(key)
        if window is None and len(self._windows) >= self.max_tracked:
            out.extend(self._evict(now))
            if len(self._windows) >= self.max_tracked:
                key = _OVERFLOW
                window = self._windows.get(key)
                denial = replace(
                    denial, fingerprint=_OVERFLOW[0], common_name="", role=None, reason=_OVERFLOW[1]
                )
        if window is not None and now - window.started < self.window_seconds:
            window.repeats += 1
            window.last = denial
            return out
        repeats = window.repeats if window is not None else 0
        self._windows[key] = _Window(now, denial)
        out.append(replace(denial, repeats=repeats))
        return out

    def flush(self) -> list[Denial]:
        """Summaries of every count not yet recorded (the server is stopping)."""
        out = [replace(w.last, repeats=w.repeats, summary=True) for w in self._windows.values() if w.repeats]
        self._windows.clear()
        return out

    def _evict(self, now: float) -> list[Denial]:
        out = []
        for key, window in list(self._windows.items()):
            if now - window.started >= self.window_seconds:
                del self._windows[key]
                if window.repeats:
                    out.append(replace(window.last, repeats=window.repeats, summary=True))
        return out


def write_denials(db: Database, denials: list[Denial]) -> None:
    """Log and audit ``denials`` (in a thread: the audit append is a database write)."""
    for d in denials:
        log.warning(
            "access_denied",
            reason=d.reason,
            fingerprint=d.fingerprint,
            common_name=d.common_name[:_TEXT_LIMIT],
            role=d.role,
            method=d.method[:16],
            path=d.path[:_TEXT_LIMIT],
            repeats=d.repeats,
            summary=d.summary,
        )
    try:
        audit_recorder.append_alone(db, [d.audit_entry() for d in denials])
    except Exception as exc:  # the client still gets its 401; the log says the record is missing
        log.error("access_denied_audit_failed", error=type(exc).__name__, records=len(denials))
