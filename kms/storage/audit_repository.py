"""SQL for the audit trail: chained appends, reads, checkpoints.

On PostgreSQL an append locks the single ``audit_head`` row (``FOR UPDATE``), so records chain in
commit order even with several API processes; as the *last* step of the caller's transaction, so the
lock is held only for the append and the COMMIT (one statement for a single record, three for a
group-committed batch). On SQLite the write
transaction is already exclusive. The append is part of
the request's transaction: if it fails, the request fails (fail closed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select

from kms.domain.audit_chain import (
    RECORD_LABEL,
    AnyCheckpoint,
    AuditRecord,
    Checkpoint,
    LegacyCheckpoint,
    canonical_json,
    record_hash,
)
from kms.storage.rawsql import Raw
from kms.storage.schema import audit_checkpoints, audit_head, audit_records


def append(conn: Connection, at: datetime, entries: Sequence[tuple[str, str, str, Mapping[str, Any]]]) -> int:
    """Append (actor, action, subject, data) entries in order; returns the new head seq."""
    raw = Raw(conn)
    stamp = at.isoformat(timespec="microseconds")
    if raw.pg and len(entries) == 1:
        actor, action, subject, data = entries[0]
        return _append_pg(raw, stamp, actor, action, subject, data)
    # SQLite (the write transaction is exclusive) or a batch on PostgreSQL (head locked once; the
    # chain is computed here, then one INSERT and the head update — three round trips in all).
    seq, prev = raw.one("SELECT seq, hash FROM audit_head WHERE id = 1" + raw.for_update())
    seq = int(seq)
    rows = []
    for actor, action, subject, data in entries:
        seq += 1
        body = {
            "seq": seq,
            "at": stamp,
            "actor": actor,
            "action": action,
            "subject": subject,
            "data": dict(data),
        }
        digest = record_hash(body, bytes.fromhex(prev)).hex()
        rows.append((seq, stamp, actor, action, subject, canonical_json(dict(data)).decode(), prev, digest))
        prev = digest
    if not rows:
        return seq
    columns = "seq, at, actor, action, subject, data, prev_hash, hash"
    if raw.pg:
        raw.execute(
            f"INSERT INTO audit_records ({columns}) SELECT * FROM unnest("
            "?::bigint[], ?::varchar[], ?::varchar[], ?::varchar[], ?::varchar[], ?::text[],"
            " ?::varchar[], ?::varchar[])",
            [list(col) for col in zip(*rows, strict=True)],
        )
    else:
        raw.executemany(f"INSERT INTO audit_records ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    raw.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))
    return seq


_SEQ_MARK = -7_340_033  # a seq value that cannot occur, used to split the canonical body around seq

# PostgreSQL: lock the head, hash, insert and advance in ONE statement, so the head row — which
# every request locks — is held for a single round trip plus COMMIT, not four. The hash is the
# same as ``record_hash``: the canonical body is ``prefix || seq || suffix`` (keys are sorted, and
# only seq is unknown before the lock).
_APPEND_PG = (
    "WITH head AS (SELECT seq + 1 AS seq, hash AS prev FROM audit_head WHERE id = 1 FOR UPDATE),"
    " body AS (SELECT seq, prev, ?::bytea || convert_to(seq::text, 'UTF8') || ?::bytea AS enc FROM head),"
    " rec AS (SELECT seq, prev,"
    " encode(sha384(?::bytea || int4send(octet_length(enc)) || enc || decode(prev, 'hex')), 'hex') AS hash"
    " FROM body),"
    " ins AS (INSERT INTO audit_records (seq, at, actor, action, subject, data, prev_hash, hash)"
    " SELECT seq, ?, ?, ?, ?, ?, prev, hash FROM rec RETURNING seq, hash)"
    " UPDATE audit_head SET seq = ins.seq, hash = ins.hash FROM ins WHERE audit_head.id = 1 RETURNING ins.seq"
)


def _append_pg(raw: Raw, stamp: str, actor: str, action: str, subject: str, data: Mapping[str, Any]) -> int:
    body = {
        "seq": _SEQ_MARK,
        "at": stamp,
        "actor": actor,
        "action": action,
        "subject": subject,
        "data": dict(data),
    }
    # The top-level "seq" member is the last one (keys sorted; string contents have quotes escaped).
    marker = b'"seq":' + str(_SEQ_MARK).encode()
    prefix, suffix = canonical_json(body).rsplit(marker, 1)
    prefix += b'"seq":'
    row = raw.one(
        _APPEND_PG,
        (prefix, suffix, RECORD_LABEL, stamp, actor, action, subject, canonical_json(dict(data)).decode()),
    )
    return int(row[0])


def _record(row: Any) -> AuditRecord:
    return AuditRecord(
        row.seq, row.at, row.actor, row.action, row.subject, json.loads(row.data), row.prev_hash, row.hash
    )


def read_records(
    conn: Connection,
    since_seq: int = 0,
    limit: int | None = None,
    subject: str | None = None,
    since_time: str | None = None,
) -> list[AuditRecord]:
    stmt = select(audit_records).where(audit_records.c.seq > since_seq).order_by(audit_records.c.seq)
    if subject is not None:
        stmt = stmt.where(audit_records.c.subject == subject)
    if since_time is not None:
        stmt = stmt.where(audit_records.c.at >= since_time)
    if limit is not None:
        stmt = stmt.limit(limit)
    return [_record(r) for r in conn.execute(stmt)]


def records_mentioning(conn: Connection, key_id: str, limit: int = 100) -> list[AuditRecord]:
    """Records whose data names ``key_id`` (key_IDs are UUIDs, so a text match is exact enough)."""
    stmt = (
        select(audit_records)
        .where(audit_records.c.data.contains(f'"{key_id}"'))
        .order_by(audit_records.c.seq)
        .limit(limit)
    )
    return [_record(r) for r in conn.execute(stmt)]


def head(conn: Connection) -> tuple[int, str]:
    row = conn.execute(select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)).one()
    return int(row.seq), str(row.hash)


def snapshot(conn: Connection) -> None:
    """Make the rest of this read transaction one snapshot on PostgreSQL too (records, head and
    checkpoints read by separate statements must agree while other processes append); call first."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")


def head_row(conn: Connection) -> tuple[int, str] | None:
    row = conn.execute(select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)).first()
    return None if row is None else (int(row.seq), str(row.hash))


def last_record(conn: Connection) -> tuple[int, str] | None:
    """The highest-numbered record actually stored (``audit_head`` is only what appends believe)."""
    row = conn.execute(
        select(audit_records.c.seq, audit_records.c.hash).order_by(audit_records.c.seq.desc()).limit(1)
    ).first()
    return None if row is None else (int(row.seq), str(row.hash))


def record_at(conn: Connection, seq: int) -> AuditRecord | None:
    row = conn.execute(select(audit_records).where(audit_records.c.seq == seq)).first()
    return None if row is None else _record(row)


def count_after(conn: Connection, seq: int) -> int:
    return int(
        conn.execute(
            select(func.count()).select_from(audit_records).where(audit_records.c.seq > seq)
        ).scalar_one()
    )


def _chained(row: Any) -> Checkpoint:
    return Checkpoint(
        int(row.number),
        str(row.prev_hash),
        int(row.from_seq),
        int(row.upto_seq),
        row.head_hash,
        row.kme_id,
        int(row.key_version),
        row.algorithm,
        row.at,
        row.signature,
    )


def last_chained_checkpoint(conn: Connection) -> Checkpoint | None:
    row = conn.execute(
        select(audit_checkpoints)
        .where(audit_checkpoints.c.number.is_not(None))
        .order_by(audit_checkpoints.c.number.desc())
        .limit(1)
    ).first()
    return None if row is None else _chained(row)


def chained_checkpoints(conn: Connection, after_number: int = 0) -> list[Checkpoint]:
    rows = conn.execute(
        select(audit_checkpoints)
        .where(audit_checkpoints.c.number > after_number)
        .order_by(audit_checkpoints.c.number)
    )
    return [_chained(r) for r in rows]


def pinned_records(conn: Connection) -> list[tuple[int, int, str, str | None]]:
    """(number, upto_seq, head_hash, hash of the stored record at upto_seq or None) per chained checkpoint."""
    stmt = (
        select(
            audit_checkpoints.c.number,
            audit_checkpoints.c.upto_seq,
            audit_checkpoints.c.head_hash,
            audit_records.c.hash,
        )
        .select_from(
            audit_checkpoints.outerjoin(audit_records, audit_records.c.seq == audit_checkpoints.c.upto_seq)
        )
        .where(audit_checkpoints.c.number.is_not(None))
        .order_by(audit_checkpoints.c.number)
    )
    return [(int(r[0]), int(r[1]), str(r[2]), r[3]) for r in conn.execute(stmt)]


def last_checkpoint_seq(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(audit_checkpoints.c.upto_seq), 0))).scalar_one())


def insert_checkpoint(conn: Connection, cp: Checkpoint) -> None:
    conn.execute(
        insert(audit_checkpoints).values(
            number=cp.number,
            prev_hash=cp.prev_hash,
            from_seq=cp.from_seq,
            upto_seq=cp.upto_seq,
            head_hash=cp.head_hash,
            kme_id=cp.kme_id,
            key_version=cp.key_version,
            algorithm=cp.algorithm,
            at=cp.at,
            signature=cp.signature,
        )
    )


def read_checkpoints(conn: Connection) -> list[AnyCheckpoint]:
    """Legacy (unchained) checkpoints by seq, then the chained ones by number."""
    rows = conn.execute(
        select(audit_checkpoints).order_by(
            audit_checkpoints.c.number.is_not(None), audit_checkpoints.c.number, audit_checkpoints.c.upto_seq
        )
    )
    return [
        LegacyCheckpoint(r.upto_seq, r.head_hash, r.kme_id, r.key_version, r.algorithm, r.at, r.signature)
        if r.number is None
        else _chained(r)
        for r in rows
    ]
