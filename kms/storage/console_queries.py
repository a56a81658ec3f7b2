"""Reads behind the web console beyond ``/metrics``' figures (``kms.service.console_view``): the
stored blocks of the last hour (their size, time and QBER: the per-block statistics the charts are
drawn from), link events from the audit trail, fallback keys, the newest audit records."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, func, select

from kms.domain.audit_chain import AuditRecord
from kms.storage.console_repository import utc
from kms.storage.schema import audit_records, key_blocks, keys


@dataclass(frozen=True)
class BlockStat:
    link_id: str
    source_block_id: str
    received_at: datetime
    bits: int
    qber: float | None


def blocks_since(conn: Connection, since: datetime, link_id: str | None = None) -> list[BlockStat]:
    """Every stored piece received since ``since`` (pieces of one adapter block share its ID)."""
    query = select(
        key_blocks.c.link_id,
        key_blocks.c.source_block_id,
        key_blocks.c.received_at,
        key_blocks.c.bit_length,
        key_blocks.c.provenance,
    ).where(key_blocks.c.received_at >= since)
    if link_id is not None:
        query = query.where(key_blocks.c.link_id == link_id)
    out = []
    for r in conn.execute(query.order_by(key_blocks.c.id)):
        provenance = r.provenance if isinstance(r.provenance, dict) else json.loads(r.provenance)
        qber = provenance.get("qber")
        out.append(
            BlockStat(
                r.link_id,
                r.source_block_id,
                utc(r.received_at),
                int(r.bit_length),
                float(qber) if isinstance(qber, int | float) else None,
            )
        )
    return out


def records_since(conn: Connection, actions: Sequence[str], since: datetime) -> list[AuditRecord]:
    """Audit records of ``actions`` from ``since`` on, oldest first."""
    rows = conn.execute(
        select(audit_records)
        .where(audit_records.c.action.in_(list(actions)))
        .where(audit_records.c.at >= since.isoformat(timespec="microseconds"))
        .order_by(audit_records.c.seq)
    )
    return [_record(r) for r in rows]


def newest_records(conn: Connection, limit: int) -> list[AuditRecord]:
    rows = conn.execute(select(audit_records).order_by(audit_records.c.seq.desc()).limit(limit))
    return [_record(r) for r in rows]


def fallback_keys_since(conn: Connection, since: datetime) -> dict[tuple[str, str], int]:
    """Keys delivered under the PQC fallback policy since ``since``, by (master, slave) SAE pair."""
    rows = conn.execute(
        select(keys.c.master_sae_id, keys.c.slave_sae_id, func.sum(keys.c.key_count))
        .where(keys.c.policy == "pqc_fallback")
        .where(keys.c.created_at >= since)
        .group_by(keys.c.master_sae_id, keys.c.slave_sae_id)
    )
    return {(m, s): int(n or 0) for m, s, n in rows}


def _record(r: Row[Any]) -> AuditRecord:
    return AuditRecord(r.seq, r.at, r.actor, r.action, r.subject, json.loads(r.data), r.prev_hash, r.hash)
