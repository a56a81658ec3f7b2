"""SQL for the KEK keyring (``kek_versions``) and for re-sealing records under a new version.

Every function runs inside the transaction the caller opened. Re-sealing reads a bounded batch of
sealed rows not yet under the target version, in primary-key order after a cursor (so a pass over a
table is linear, and a second pass after a crash starts cheaply), locked: PostgreSQL skips rows a key
request holds (``FOR UPDATE SKIP LOCKED``; they are taken in a later batch), SQLite's write
transaction is exclusive. Material passes through here sealed only; the re-sealing itself is done by
the caller (``kms.service.kek_rotation``) with the envelope.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, inspect, select, text, update

from kms.storage.database import Database
from kms.storage.rawsql import Raw
from kms.storage.schema import kek_versions

# The sealed records, by table: (table, key column, material column).
SEALED_TABLES: tuple[tuple[str, str, str], ...] = (
    ("key_blocks", "id", "material"),
    ("keys", "key_id", "material"),
    ("kme_keys", "id", "sealed_seed"),
    ("peer_mac_keys", "id", "sealed_key"),
)


@dataclass(frozen=True)
class VersionRow:
    kek_id: str
    source: str
    reference: dict[str, Any]
    check_value: str
    state: str
    created_at: datetime
    retired_at: datetime | None


def keyring_exists(conn: Connection) -> bool:
    """Whether the database has the keyring table (migration 0014)."""
    return inspect(conn).has_table("kek_versions")


def versions(conn: Connection) -> list[VersionRow]:
    rows = conn.execute(select(kek_versions).order_by(kek_versions.c.created_at, kek_versions.c.kek_id))
    return [VersionRow(**dict(r._mapping)) for r in rows]


def insert_version(
    conn: Connection, kek_id: str, reference: dict[str, Any], check_value: str, state: str, at: datetime
) -> None:
    conn.execute(
        insert(kek_versions).values(
            kek_id=kek_id,
            source=str(reference["source"]),
            reference=reference,
            check_value=check_value,
            state=state,
            created_at=at,
        )
    )


def set_state(conn: Connection, kek_id: str, state: str, at: datetime | None = None) -> None:
    values: dict[str, Any] = {"state": state}
    if state == "retired":
        values["retired_at"] = at
    conn.execute(update(kek_versions).where(kek_versions.c.kek_id == kek_id).values(**values))


def sealed_counts(conn: Connection) -> dict[str, int]:
    """Rows holding sealed material, per KEK version (every table together)."""
    raw = Raw(conn)
    out: dict[str, int] = {}
    for table, _key, column in SEALED_TABLES:
        for kek_id, count in raw.all(
            f"SELECT kek_id, COUNT(*) FROM {table} WHERE {column} IS NOT NULL GROUP BY kek_id"
        ):
            out[str(kek_id)] = out.get(str(kek_id), 0) + int(count)
    return out


def any_sealed_sample(conn: Connection, kek_id: str) -> tuple[str, tuple[Any, ...]] | None:
    """One sealed row under ``kek_id`` (table and row), to prove a loaded KEK opens the store."""
    for table in ("kme_keys", "key_blocks", "keys"):
        row = _batch(Raw(conn), table, None, kek_id, 1, include=True)
        if row:
            return table, tuple(row[0])
    return None


def reseal_batch(conn: Connection, table: str, after: Any, target: str, limit: int) -> list[tuple[Any, ...]]:
    """Up to ``limit`` sealed rows of ``table`` not under ``target``, after key ``after``, locked.

    Row shapes: key_blocks (id, link_id, source_block_id, source_offset_bits, next_bit, material,
    kek_id); keys (key_id, key_count, material, kek_id); kme_keys (id, purpose, version,
    sealed_seed, kek_id); peer_mac_keys (id, sealed_key, kek_id)."""
    return [tuple(r) for r in _batch(Raw(conn), table, after, target, limit, include=False)]


_COLUMNS = {
    "key_blocks": "id, link_id, source_block_id, source_offset_bits, next_bit, material, kek_id",
    "keys": "key_id, key_count, material, kek_id",
    "kme_keys": "id, purpose, version, sealed_seed, kek_id",
    "peer_mac_keys": "id, sealed_key, kek_id",
}


def _batch(raw: Raw, table: str, after: Any, kek_id: str, limit: int, include: bool) -> list[Any]:
    key, column = {t: (k, c) for t, k, c in SEALED_TABLES}[table]
    where = f"{column} IS NOT NULL AND kek_id {'=' if include else '<>'} ?"
    params: list[Any] = [kek_id]
    if after is not None:
        where += f" AND {key} > ?"
        params.append(after)
    sql = f"SELECT {_COLUMNS[table]} FROM {table} WHERE {where} ORDER BY {key} LIMIT {int(limit)}"
    if not include:
        sql += raw.for_update(skip_locked=True)
    return list(raw.all(sql, params))


def store_resealed(conn: Connection, table: str, rows: list[tuple[Any, bytes, str]]) -> None:
    """Write re-sealed material: (row key, sealed, kek_id) each; the row's other columns unchanged."""
    key, column = {t: (k, c) for t, k, c in SEALED_TABLES}[table]
    Raw(conn).executemany(
        f"UPDATE {table} SET {column} = ?, kek_id = ? WHERE {key} = ?",
        [(sealed, kek_id, row_key) for row_key, sealed, kek_id in rows],
    )


class RotationBusy(RuntimeError):
    """Another ``qkms kek`` command holds the rotation lock of this store."""


@contextlib.contextmanager
def rotation_lock(db: Database) -> Iterator[None]:
    """One KEK rotation or retirement at a time per store: an ``flock`` beside a SQLite file, a
    session-level advisory lock on PostgreSQL (held by a connection of its own until the end)."""
    if db.is_sqlite:
        lock = db.lock_path
        if lock is None:  # in-memory database: one process by construction
            yield
            return
        fd = os.open(lock.with_suffix(".kek-rotation"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise RotationBusy("another `qkms kek` command is rotating or retiring; wait for it") from exc
            yield
        finally:
            os.close(fd)
        return
    with db.engine.connect() as conn:
        got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY}).scalar()
        conn.commit()
        if not got:
            raise RotationBusy("another `qkms kek` command is rotating or retiring; wait for it")
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
            conn.commit()


_LOCK_KEY = zlib.crc32(b"qkms-kek-rotation")
