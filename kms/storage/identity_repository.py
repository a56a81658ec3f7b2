"""SQL for the KME's own PQC key versions (``kme_keys``), for ``kms.service.identity_keys``.

Every function runs inside a transaction (or read) the caller opened. Seeds come and go sealed; this
module never sees a private key in the clear.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from kms.crypto.identity import NewKey, PublicKeyInfo
from kms.storage.schema import kme_keys


def _public(row: Any) -> PublicKeyInfo:
    return PublicKeyInfo(row.purpose, row.algorithm, row.version, bytes(row.public_key), row.state)


def active_key(conn: Connection, purpose: str) -> PublicKeyInfo | None:
    row = conn.execute(
        select(kme_keys).where(kme_keys.c.purpose == purpose, kme_keys.c.state == "active")
    ).first()
    return None if row is None else _public(row)


def public_keys(conn: Connection) -> list[PublicKeyInfo]:
    rows = conn.execute(select(kme_keys).order_by(kme_keys.c.purpose, kme_keys.c.version)).all()
    return [_public(r) for r in rows]


def sealed_seed(conn: Connection, purpose: str, version: int) -> bytes | None:
    """The sealed seed of a version; None if unknown or destroyed."""
    row = conn.execute(
        select(kme_keys.c.sealed_seed).where(kme_keys.c.purpose == purpose, kme_keys.c.version == version)
    ).first()
    return None if row is None or row.sealed_seed is None else bytes(row.sealed_seed)


def next_version(conn: Connection, purpose: str) -> int:
    current = conn.execute(
        select(func.coalesce(func.max(kme_keys.c.version), 0)).where(kme_keys.c.purpose == purpose)
    ).scalar_one()
    return int(current) + 1


def insert_key(conn: Connection, key: NewKey, at: datetime) -> None:
    """Store ``key`` as the active version of its purpose."""
    conn.execute(
        insert(kme_keys).values(
            purpose=key.purpose,
            algorithm=key.algorithm,
            version=key.version,
            public_key=key.public_key,
            sealed_seed=key.sealed_seed,
            kek_id=key.kek_id,
            state="active",
            created_at=at,
        )
    )


def retire_active(conn: Connection, purpose: str, at: datetime) -> None:
    conn.execute(
        update(kme_keys)
        .where(kme_keys.c.purpose == purpose, kme_keys.c.state == "active")
        .values(state="retired", retired_at=at)
    )


def destroy_retired(conn: Connection, purpose: str, version: int) -> bool:
    """Zeroise a retired version's sealed seed; False if that version is not retired."""
    done = conn.execute(
        update(kme_keys)
        .where(
            kme_keys.c.purpose == purpose,
            kme_keys.c.version == version,
            kme_keys.c.state == "retired",
        )
        .values(sealed_seed=None, state="destroyed")
    ).rowcount
    return bool(done)
