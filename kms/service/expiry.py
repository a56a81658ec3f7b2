"""The expiry sweep (a background job of ``qkms serve``): reserved keys past their TTL become
``expired`` and lose their material, and consumed keys past their redelivery window lose theirs
(``pool_repository.expire_reserved``, at most 1,000 rows each per pass). One transaction per pass,
audited as ``keys.expired`` when any key expired."""

from __future__ import annotations

from datetime import UTC, datetime

from kms.service import audit_recorder
from kms.storage import pool_repository as pool
from kms.storage.database import Database


def sweep_expired(db: Database, kme_id: str) -> int:
    """One pass; returns how many reserved keys expired."""
    now = datetime.now(UTC)
    actor = f"kme:{kme_id}/expiry"
    with db.write() as conn:
        expired = pool.expire_reserved(conn, now, actor)
        if expired:
            audit_recorder.record(conn, actor, "keys.expired", "pool", {"key_IDs": expired}, at=now)
    return len(expired)
