"""Peer housekeeping, run by ``qkms serve``'s peer-sync thread: forget peer nonces past the freshness
window, destroy keys left ``pre_active`` by a process that died mid-request (their ledger message
was never settled), audited as ``keys.discarded``, and destroy shared blocks the peer never
confirmed (``blocks.unconfirmed_discarded``): they count against the link's pool limit, so kept
forever they would stop the link being filled."""

from __future__ import annotations

from datetime import datetime

from kms.service import audit_recorder
from kms.storage import mirror_repository as mirrors
from kms.storage import peer_repository as peers
from kms.storage import pool_repository as pool
from kms.storage.database import Database


def sweep_peer_state(
    db: Database,
    actor: str,
    now: datetime,
    seen_before: datetime,
    stale: datetime,
    unconfirmed_before: datetime | None = None,
) -> list[str]:
    """One transaction: prune messages seen before ``seen_before``, destroy keys pending since before
    ``stale`` and shared blocks still unconfirmed that arrived before ``unconfirmed_before``. Returns
    the key_IDs destroyed."""
    events = pool.EventBatch(now)
    with db.write() as conn:
        peers.prune_messages(conn, seen_before)
        gone = peers.destroy_stale_pending(conn, stale, actor)
        entries: list[audit_recorder.AuditEntry] = []
        if gone:
            entries.append((actor, "keys.discarded", "pending", {"key_IDs": gone}))
        if unconfirmed_before is not None:
            per_link = mirrors.discard_unconfirmed(conn, unconfirmed_before, actor, events)
            for link_id, pieces in sorted(per_link.items()):
                detail = {"pieces": pieces, "received_before": unconfirmed_before.isoformat()}
                entries.append((actor, "blocks.unconfirmed_discarded", link_id, detail))
        events.flush(conn)
        audit_recorder.append(conn, entries, now)
    return gone
