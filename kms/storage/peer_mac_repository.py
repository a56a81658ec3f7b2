"""MAC keys neighbours established with this KME (``peer_mac_keys``, migration 0015), sealed.

A row's key is ``<sender KME>/<key id>``, one column, so that a KEK rotation pages through this
table like the other sealed ones (``kek_repository.SEALED_TABLES``).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection

from kms.storage.rawsql import Raw


def row_id(sender: str, key_id: str) -> str:
    return f"{sender}/{key_id}"


def mac_key_aad(row: str) -> bytes:
    """Associated data of a sealed MAC key: its row, so a sealed key cannot be moved to another."""
    return f"qkms/peer-mac-key/{row}".encode()


def store_key(conn: Connection, row: str, sealed: bytes, kek_id: str, at: datetime) -> None:
    raw = Raw(conn)
    raw.execute(
        "INSERT INTO peer_mac_keys (id, sealed_key, kek_id, created_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (id) DO NOTHING",
        [row, sealed, kek_id, raw.ts(at)],
    )


def load_key(conn: Connection, row: str) -> tuple[bytes, str | None] | None:
    found = Raw(conn).one("SELECT sealed_key, kek_id FROM peer_mac_keys WHERE id = ?", [row])
    return None if found is None else (bytes(found[0]), None if found[1] is None else str(found[1]))


def forget_created_before(conn: Connection, before: datetime) -> int:
    raw = Raw(conn)
    return int(raw.execute("DELETE FROM peer_mac_keys WHERE created_at < ?", [raw.ts(before)]).rowcount)
