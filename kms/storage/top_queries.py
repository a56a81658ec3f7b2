"""Reads for ``qkms top`` beyond ``/metrics``' figures: the newest audit records of given actions
(link alarms), by the indexed ``action`` column, newest first."""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import Connection, select

from kms.domain.audit_chain import AuditRecord
from kms.storage.schema import audit_records


def newest_records(conn: Connection, actions: Sequence[str], limit: int) -> list[AuditRecord]:
    rows = conn.execute(
        select(audit_records)
        .where(audit_records.c.action.in_(list(actions)))
        .order_by(audit_records.c.seq.desc())
        .limit(limit)
    )
    return [
        AuditRecord(r.seq, r.at, r.actor, r.action, r.subject, json.loads(r.data), r.prev_hash, r.hash)
        for r in rows
    ]
