"""Read-only queries behind the operator's health probe and ``/metrics`` (``kms.service.operator_*``).

Each runs in the caller's read snapshot. Figures about shared state come from here rather than from
a process's memory, so that every process of a KME (``--workers N``, or several hosts on one
PostgreSQL) would report the same ones.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, func, select, text
from sqlalchemy.exc import DBAPIError

from kms.storage.database import Database, savepoint
from kms.storage.schema import audit_checkpoints, audit_head, audit_records, key_blocks, keys, peer_messages


@dataclass(frozen=True)
class LinkTotals:
    produced_bits: int  # every bit a link delivered into the pool (blocks are never deleted)
    served_bits: int  # of this KME's own pieces, bits cut into keys so far


@dataclass(frozen=True)
class PairKeys:
    master_sae_id: str
    slave_sae_id: str
    policy: str
    state: str
    keys: int


def ping(conn: Connection) -> None:
    conn.execute(text("SELECT 1")).scalar_one()


def schema_revision(conn: Connection) -> str | None:
    """The Alembic revision the database is at (None: never migrated). Read from Alembic's table
    directly: ``MigrationContext`` logs a line per call, once per probe."""
    try:
        with savepoint(conn, "qkms_revision"):  # PostgreSQL: a missing table must not end the snapshot
            row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    except DBAPIError:
        return None
    return None if row is None else str(row[0])


def audit_head_matches_newest(conn: Connection) -> tuple[bool, int]:
    """Whether the chain head row names the newest record (what the next append will chain to),
    and the head's sequence number."""
    head = conn.execute(select(audit_head.c.seq, audit_head.c.hash)).first()
    newest = conn.execute(
        select(audit_records.c.seq, audit_records.c.hash).order_by(audit_records.c.seq.desc()).limit(1)
    ).first()
    if head is None:
        return newest is None, 0
    if newest is None:
        return int(head.seq) == 0, int(head.seq)
    return (int(head.seq), head.hash) == (int(newest.seq), newest.hash), int(head.seq)


def writable(conn: Connection, db: Database) -> bool:
    """PostgreSQL: not a read-only standby or session; SQLite: the file and its folder are writable."""
    if db.is_sqlite:
        path = db.lock_path
        if path is None:
            return True
        database_file = path.with_suffix("")
        return os.access(database_file, os.W_OK) and os.access(database_file.parent, os.W_OK)
    read_only = conn.execute(text("SELECT current_setting('transaction_read_only')")).scalar_one()
    return str(read_only) == "off"


def link_totals(conn: Connection) -> dict[str, LinkTotals]:
    rows = conn.execute(
        select(
            key_blocks.c.link_id,
            func.sum(key_blocks.c.bit_length).label("produced"),
            func.sum(key_blocks.c.next_bit).filter(key_blocks.c.owner_kme_id.is_(None)).label("served"),
        ).group_by(key_blocks.c.link_id)
    )
    return {r.link_id: LinkTotals(int(r.produced or 0), int(r.served or 0)) for r in rows}


def newest_block_qber(conn: Connection, link_id: str) -> float | None:
    """The QBER in the provenance of the link's newest block (None: no block or no QBER reported)."""
    row = conn.execute(
        select(key_blocks.c.provenance)
        .where(key_blocks.c.link_id == link_id)
        .order_by(key_blocks.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    provenance = row.provenance if isinstance(row.provenance, dict) else json.loads(row.provenance)
    qber = provenance.get("qber")
    return float(qber) if isinstance(qber, int | float) else None


def keys_by_pair(conn: Connection) -> list[PairKeys]:
    rows = conn.execute(
        select(
            keys.c.master_sae_id,
            keys.c.slave_sae_id,
            keys.c.policy,
            keys.c.state,
            func.sum(keys.c.key_count).label("n"),
        ).group_by(keys.c.master_sae_id, keys.c.slave_sae_id, keys.c.policy, keys.c.state)
    )
    return [PairKeys(r.master_sae_id, r.slave_sae_id, r.policy, r.state, int(r.n or 0)) for r in rows]


def newest_checkpoint(conn: Connection) -> tuple[int, int, datetime] | None:
    """The newest signed checkpoint's number (0 for a legacy one), the last record it signs, and
    its time."""
    row = conn.execute(
        select(audit_checkpoints.c.number, audit_checkpoints.c.upto_seq, audit_checkpoints.c.at)
        .order_by(audit_checkpoints.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    return int(row.number or 0), int(row.upto_seq), datetime.fromisoformat(row.at)


def newest_peer_messages(conn: Connection) -> dict[str, datetime]:
    """When each peer KME's newest accepted message arrived."""
    rows = conn.execute(
        select(peer_messages.c.sender, func.max(peer_messages.c.received_at)).group_by(peer_messages.c.sender)
    )
    return {sender: at for sender, at in rows if at is not None}
