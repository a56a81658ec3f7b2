"""The newest link-state record of each KME of the network (``link_state_records``, migration 0012).

The table keeps the signed record as received; what it says is the peer protocol's business
(``kms.peer.link_state``). A record replaces the stored one only when its sequence number is higher,
decided by the database, so two processes storing records of one KME at once keep the newest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from kms.storage.rawsql import Raw


@dataclass(frozen=True)
class StoredRecord:
    origin: str
    seq: int
    issued_at: float
    record: str


def store_newer(conn: Connection, records: Sequence[StoredRecord], at: datetime) -> list[bool]:
    """Store each record that is newer than the one held for its origin; whether each was."""
    raw = Raw(conn)
    out: list[bool] = []
    for r in records:
        inserted = raw.execute(
            "INSERT INTO link_state_records (origin_kme_id, seq, issued_at, record, received_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (origin_kme_id) DO NOTHING",
            [r.origin, r.seq, r.issued_at, r.record, raw.ts(at)],
        ).rowcount
        if inserted != 1:
            inserted = raw.execute(
                "UPDATE link_state_records SET seq = ?, issued_at = ?, record = ?, received_at = ?"
                " WHERE origin_kme_id = ? AND seq < ?",
                [r.seq, r.issued_at, r.record, raw.ts(at), r.origin, r.seq],
            ).rowcount
        out.append(inserted == 1)
    return out


def load_records(conn: Connection) -> list[StoredRecord]:
    return [
        StoredRecord(str(o), int(s), float(i), str(rec))
        for o, s, i, rec in Raw(conn).all(
            "SELECT origin_kme_id, seq, issued_at, record FROM link_state_records ORDER BY origin_kme_id"
        )
    ]


def forget_issued_before(conn: Connection, issued_before: float) -> int:
    """Drop records their origins stopped renewing (a KME gone from the network)."""
    return int(
        Raw(conn).execute("DELETE FROM link_state_records WHERE issued_at < ?", [issued_before]).rowcount
    )
