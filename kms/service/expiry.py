"""The expiry sweep (a background job of ``qkms serve``): reserved keys past their TTL become
``expired`` and lose their material, and consumed keys past their redelivery window lose theirs
(``pool_repository.expire_reserved``, at most 1,000 rows each per pass). One transaction per pass,
audited as ``keys.expired`` when any key expired. A clean stop ends every window
(``close_redelivery_windows``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kms.service import audit_recorder
from kms.storage import pool_repository as pool
from kms.storage.database import Database

# Later than any window can end (pool.redelivery_seconds is bounded far below this).
WINDOWS_END = timedelta(days=3650)


def sweep_expired(db: Database, kme_id: str) -> int:
    """One pass; returns how many reserved keys expired."""
    now = datetime.now(UTC)
    actor = f"kme:{kme_id}/expiry"
    with db.write() as conn:
        expired = pool.expire_reserved(conn, now, actor)
        if expired:
            audit_recorder.record(conn, actor, "keys.expired", "pool", {"key_IDs": expired}, at=now)
    return len(expired)


def close_redelivery_windows(db: Database, kme_id: str) -> int:
    """At a clean stop: end every redelivery window now (zeroise the material of every consumed
    key), since a stopped KME redelivers nothing and should hold nothing for it — and ``qkms db
    check`` on the stopped KME would otherwise find material past windows that ended while it was
    down. One transaction per 1,000 rows; audited once as ``keys.redelivery_closed``. Returns rows."""
    now = datetime.now(UTC)
    actor = f"kme:{kme_id}/stop"
    total = 0
    while True:
        with db.write() as conn:
            n = pool.close_redelivery_windows(conn, now + WINDOWS_END, limit=1000)
            total += n
            if n == 0:
                if total:
                    audit_recorder.record(
                        conn,
                        actor,
                        "keys.redelivery_closed",
                        "pool",
                        {"rows": total, "reason": "clean stop"},
                        at=now,
                    )
                return total
