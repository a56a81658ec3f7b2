"""SQL for the registries: SAEs and links, synchronised from configuration at start-up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.dialects import postgresql, sqlite

from kms.domain.saes import SaeInfo
from kms.storage.schema import links, saes


def upsert_saes(conn: Connection, entries: Sequence[SaeInfo]) -> None:
    """Insert or update SAEs so the database matches the configuration."""
    now = datetime.now(UTC)
    for e in entries:
        existing = conn.execute(select(saes.c.id).where(saes.c.id == e.sae_id)).first()
        values = {"kme_id": e.kme_id, "cert_fingerprint": e.fingerprint, "enabled": e.enabled, "role": e.role}
        if existing:
            conn.execute(update(saes).where(saes.c.id == e.sae_id).values(**values))
        else:
            conn.execute(saes.insert().values(id=e.sae_id, created_at=now, **values))


def load_saes(conn: Connection) -> list[SaeInfo]:
    return [
        SaeInfo(r.id, r.kme_id, r.cert_fingerprint, bool(r.enabled), r.role)
        for r in conn.execute(
            select(saes.c.id, saes.c.kme_id, saes.c.cert_fingerprint, saes.c.enabled, saes.c.role)
        )
    ]


def upsert_link(
    conn: Connection, link_id: str, peer_kme_id: str, adapter: str, description: Mapping[str, Any]
) -> None:
    now = datetime.now(UTC)
    values = {
        "peer_kme_id": peer_kme_id,
        "adapter": adapter,
        "description": dict(description),
        "updated_at": now,
    }
    stmt: Any
    if conn.dialect.name == "postgresql":
        stmt = postgresql.insert(links).values(id=link_id, state="active", created_at=now, **values)
    else:
        stmt = sqlite.insert(links).values(id=link_id, state="active", created_at=now, **values)
    conn.execute(stmt.on_conflict_do_update(index_elements=[links.c.id], set_=values))
