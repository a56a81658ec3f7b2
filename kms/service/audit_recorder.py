"""The one audit recorder: every use case appends its audit records through here.

A record is appended in the same transaction as the state change it describes, so a change that
cannot be audited does not happen (fail closed, docs/DECISIONS.md D-8). Group-committed use cases
return their entries from their unit and ``kms.service.group_commit`` appends a batch's entries in
one call; everything else calls :func:`append` (or :func:`record`) inside the transaction it opened.
Only :func:`append_alone` opens a transaction of its own: for what is recorded after the fact, such
as a refused request (whose own transaction was rolled back).

Reading ``grep -rn "audit_recorder\\." kms`` lists every place a state change is audited.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from kms.storage import audit_repository
from kms.storage.database import Database

AuditEntry = tuple[str, str, str, Mapping[str, Any]]
"""(actor, action, subject, data): one record before it is chained."""


def append(conn: Connection, entries: Sequence[AuditEntry], at: datetime | None = None) -> None:
    """Chain ``entries``, in order, into the audit trail within the caller's transaction."""
    if entries:
        audit_repository.append(conn, at or datetime.now(UTC), entries)


def record(
    conn: Connection,
    actor: str,
    action: str,
    subject: str,
    data: Mapping[str, Any],
    at: datetime | None = None,
) -> None:
    """One record within the caller's transaction."""
    append(conn, [(actor, action, subject, data)], at)


def append_alone(db: Database, entries: Sequence[AuditEntry], at: datetime | None = None) -> None:
    """``entries`` in a transaction of their own (a record made after the fact: a refusal)."""
    with db.write() as conn:
        append(conn, entries, at)
