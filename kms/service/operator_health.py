"""Readiness of a KME for the operator's health probe (``GET /v1/health/ready``, docs/OPERATIONS.md
"Health and metrics").

Ready means: the database answers; its schema is at the migrations' head; the KEK seals and opens
(the KEK is usable, so stored keys can be unwrapped); the audit chain accepts appends (its head row
names the newest record and the database is writable); and at least one link holds key bits on an
active link, or a PQC fallback is configured. Read only: nothing is written, nothing audited (a
probe every few seconds must not grow the audit chain). The database part runs under a time limit
(:mod:`kms.service.single_flight`), so a probe answers even when the database hangs.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kms.config import KmsSettings
from kms.crypto.envelope import Envelope
from kms.service.single_flight import CallTimedOut, SingleFlight
from kms.storage import operator_queries as queries
from kms.storage.database import Database
from kms.storage.migrate import head_revision
from kms.storage.status_queries import read_pool_report

_KEK_PROBE_AAD = b"qkms/health-probe"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Health:
    ready: bool
    role: str  # "leader" (this process fills the pool) or "standby"
    pid: int
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0


class HealthService:
    """Runs the readiness checks of one KME process."""

    def __init__(
        self, db: Database, envelope: Envelope, settings: KmsSettings, role: Callable[[], str]
    ) -> None:
        self.db = db
        self.envelope = envelope
        self.settings = settings
        self.role = role
        self.head = head_revision()
        self.timeout = settings.operator.health_timeout_seconds
        self._database = SingleFlight("qkms-health-db", self._database_checks)
        # Sealing may read the KEK keyring from the database (rotation): bounded as well.
        self._kek = SingleFlight("qkms-health-kek", self._kek_check)

    def check(self) -> Health:
        started = time.monotonic()
        self._kek.start()  # in parallel with the database checks: a probe takes one time limit
        database = self._bounded_database_checks()
        left = max(0.0, self.timeout - (time.monotonic() - started))
        checks = [*database, self._bounded_kek_check(left)]
        return Health(
            ready=all(c.ok for c in checks),
            role=self.role(),
            pid=os.getpid(),
            checks=checks,
            seconds=round(time.monotonic() - started, 4),
        )

    def _bounded_database_checks(self) -> list[Check]:
        names = ("database", "migrations", "audit", "key_supply")
        try:
            return self._database.run(self.timeout)
        except CallTimedOut:
            why = f"no answer within {self.timeout:g} s"
        except Exception as exc:
            # The driver's message may name hosts and users; the kind of failure is enough here.
            why = f"unreachable ({type(exc).__name__})"
        return [Check(names[0], False, why)] + [
            Check(n, False, "not checked: database down") for n in names[1:]
        ]

    def _database_checks(self) -> list[Check]:
        with self.db.read() as conn:
            queries.ping(conn)
            revision = queries.schema_revision(conn)
            head_ok, head_seq = queries.audit_head_matches_newest(conn)
            can_write = queries.writable(conn, self.db)
            report = read_pool_report(conn)
        at_head = revision == self.head
        audit_ok = head_ok and can_write
        if not head_ok:
            audit_detail = "chain head does not name the newest record"
        elif not can_write:
            audit_detail = "database is read-only"
        else:
            audit_detail = f"head at record {head_seq}"
        serving = [
            link.link_id
            for link in report.links
            if link.state == "active" and (link.stored_bits > 0 or link.mirror_bits > 0)
        ]
        fallback = self._fallback_configured()
        if serving:
            supply = f"links with key bits: {', '.join(sorted(serving))}"
        elif fallback:
            supply = "no link holds key bits; PQC fallback configured"
        else:
            supply = "no active link holds key bits and no PQC fallback is configured"
        return [
            Check("database", True, "answers"),
            Check(
                "migrations", at_head, f"at {revision}" if at_head else f"at {revision}, head is {self.head}"
            ),
            Check("audit", audit_ok, audit_detail),
            Check("key_supply", bool(serving) or fallback, supply),
        ]

    def _fallback_configured(self) -> bool:
        policy = self.settings.policy
        return policy.pqc_fallback or any(rule.pqc_fallback for rule in policy.rules)

    def _bounded_kek_check(self, timeout: float) -> Check:
        try:
            return self._kek.run(timeout)
        except CallTimedOut:
            return Check("kek", False, f"no answer within {self.timeout:g} s")

    def _kek_check(self) -> Check:
        probe = secrets.token_bytes(16)
        try:
            ok = self.envelope.open(self.envelope.seal(probe, _KEK_PROBE_AAD), _KEK_PROBE_AAD) == probe
        except Exception as exc:
            return Check("kek", False, f"seal/open failed ({type(exc).__name__})")
        return Check("kek", ok, "seals and opens" if ok else "opened a different value")
