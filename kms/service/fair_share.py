"""Fair shares as a use case (issue 16 part 4, DECISIONS.md D-30): admit or refuse a checked Get key
request before any database work, and record refusals without letting a greedy SAE flood the audit.

One instance per API process, called on the event loop by ``kms.service.gateway``. The rules are
pure (``kms.domain.quotas``); this adds the clock, each process's share of the rates, the reserved
counts (read from the database at most every ``quotas.reserved_refresh_ms``, plus what this process
admitted since) and the audit: the first refusal per (master, slave, rule) in a window is recorded
(``quota.refused``) with the number of those not recorded since, so the audit grows by at most one
record per pair and rule per window and process, however fast an SAE retries. Every refusal is
counted (``qkms_quota_refusals_total``, summed over the ``--workers`` processes by ``kms.telemetry``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from kms.config import KmsSettings
from kms.domain.delivery import KeyOrder
from kms.domain.errors import ServiceUnavailable
from kms.domain.quotas import FairShareRules, QuotaLimits, Refusal
from kms.service import audit_recorder
from kms.storage.database import Database
from kms.storage.quota_queries import reserved_by_master
from kms.telemetry.metrics import instruments

log = structlog.get_logger(__name__)

MAX_TRACKED = 1024
# ``qkms_quota_refusals_total{limit}``: each rule by the [quotas] key that sets it (a fixed set; SAE IDs
# stay out of the label: per-process counters cannot share one bound on them; the audit and the
# request's log line name the SAE).
LIMIT_LABELS = {
    "reserved keys": "max_reserved_keys_per_master",
    "pool share": "max_pool_share",
    **{
        f"{scope} {unit}/s": f"{scope.lower()}_{unit}_per_second"
        for scope in ("SAE", "pair")
        for unit in ("requests", "keys", "bits")
    },
}


class QuotaExceeded(ServiceUnavailable):
    """A request over a fair-share limit (503); ``records``: audit records to write for it, if any."""

    def __init__(self, refusal: Refusal, records: list[RefusalRecord]) -> None:
        super().__init__(refusal.message)
        self.records = records


@dataclass(frozen=True)
class RefusalRecord:
    master: str
    slave: str
    rule: str
    message: str
    repeats: int  # refusals of this pair and rule since the last record, not recorded one by one

    def audit_entry(self) -> audit_recorder.AuditEntry:
        data = {"slave": self.slave, "rule": self.rule, "message": self.message, "repeats": self.repeats}
        return f"sae:{self.master}", "quota.refused", self.master, data


@dataclass
class _Window:
    started: float
    repeats: int = 0


@dataclass
class FairShares:
    db: Database
    rules: FairShareRules
    reserved_refresh: float
    audit_window: float
    clock: Callable[[], float] = time.monotonic
    _reserved: dict[str, tuple[int, int]] = field(default_factory=dict)
    _next_read: float = 0.0
    _windows: dict[tuple[str, str, str], _Window] = field(default_factory=dict)

    @classmethod
    def for_settings(cls, settings: KmsSettings, db: Database, processes: int) -> FairShares | None:
        """The process's fair shares, or None when no limit is configured (nothing on the hot path)."""
        q = settings.quotas
        share = 1 / max(processes, 1)
        limits = QuotaLimits(
            q.sae_requests_per_second * share,
            q.sae_keys_per_second * share,
            q.sae_bits_per_second * share,
            q.pair_requests_per_second * share,
            q.pair_keys_per_second * share,
            q.pair_bits_per_second * share,
            q.burst_seconds,
            q.max_reserved_keys_per_master,
            int(q.max_pool_share * settings.pool.max_pool_bits),
        )
        if not (limits.any_rate or limits.any_cap):
            return None
        return cls(db, FairShareRules(limits), q.reserved_refresh_ms / 1000, q.audit_window_seconds)

    def admit(self, order: KeyOrder) -> None:
        """Pay for ``order`` or raise ``QuotaExceeded`` (nothing paid)."""
        now = self.clock()
        master = order.master.sae_id
        held = self._held(master, now) if self.rules.limits.any_cap else (0, 0)
        bits = order.number * order.size
        refusal = self.rules.admit(master, order.slave.sae_id, order.number, bits, held, now)
        if refusal is not None:
            if (counted := instruments()) is not None:
                counted.quota_refusals.labels(LIMIT_LABELS.get(refusal.rule, "other")).inc()
            raise QuotaExceeded(refusal, self._note(master, order.slave.sae_id, refusal, now))
        if self.rules.limits.any_cap:
            self._reserved[master] = (held[0] + order.number, held[1] + bits)

    def _held(self, master: str, now: float) -> tuple[int, int]:
        if now >= self._next_read:
            self._next_read = now + self.reserved_refresh
            with self.db.read() as conn:
                self._reserved = reserved_by_master(conn)
        return self._reserved.get(master, (0, 0))

    def _note(self, master: str, slave: str, refusal: Refusal, now: float) -> list[RefusalRecord]:
        key = (master, slave, refusal.rule)
        window = self._windows.get(key)
        if window is not None and now - window.started < self.audit_window:
            window.repeats += 1
            return []
        if window is None and len(self._windows) >= MAX_TRACKED:
            self._windows = {k: w for k, w in self._windows.items() if now - w.started < self.audit_window}
            if len(self._windows) >= MAX_TRACKED:  # still full: count it, record nothing now
                return []
        repeats = window.repeats if window is not None else 0
        self._windows[key] = _Window(now)
        return [RefusalRecord(master, slave, refusal.rule, refusal.message, repeats)]

    def record(self, records: list[RefusalRecord]) -> None:
        """Log and audit refusals (in a thread: the audit append is a database write)."""
        for r in records:
            log.warning("quota_refused", master=r.master, slave=r.slave, rule=r.rule, repeats=r.repeats)
        try:
            audit_recorder.append_alone(self.db, [r.audit_entry() for r in records])
        except Exception as exc:  # the SAE still gets its 503; the log says the record is missing
            log.error("quota_audit_failed", error=type(exc).__name__, records=len(records))
