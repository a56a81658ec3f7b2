"""Peer housekeeping, run by ``qkms serve``'s peer-sync thread: forget peer nonces past the freshness
window, and destroy keys left ``pre_active`` by a process that died mid-request (their ledger message
was never settled), audited as ``keys.discarded``."""

from __future__ import annotations

from datetime import datetime

from kms.service import audit_recorder
from kms.storage import peer_repository as peers
from kms.storage.database import Database


def sweep_peer_state(
    db: Database, actor: str, now: datetime, seen_before: datetime, stale: datetime
) -> list[str]:
    """One transaction: prune messages seen before ``seen_before``, destroy keys pending since before
    ``stale``. Returns the key_IDs destroyed."""
    with db.write() as conn:
        peers.prune_messages(conn, seen_before)
        gone = peers.destroy_stale_pending(conn, stale, actor)
        if gone:
            audit_recorder.record(conn, actor, "keys.discarded", "pending", {"key_IDs": gone}, now)
    return gone
