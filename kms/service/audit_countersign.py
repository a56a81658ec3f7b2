"""The database side of peer countersigning (``kms.peer.countersign``, protocol in
``kms.audit.peer_copies``): the audited record of a checkpoint that contradicts the copy kept here,
the receipts peers sign for our checkpoints, and our checkpoints read to push or to compare with what
a peer holds. Each call is one transaction. (The replay check of the audit messages is the peer use
cases' ``peer_context.remember_alone``.)"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from kms.domain.audit_chain import Checkpoint, Receipt
from kms.service import audit_recorder
from kms.storage import audit_repository as audit
from kms.storage import countersign_repository as receipts
from kms.storage.database import Database

log = structlog.get_logger(__name__)


def record_copy_conflict(db: Database, origin: str, problem: str) -> None:
    """Audit (``audit.peer_conflict``) a checkpoint of ``origin`` that contradicts the copy held here."""
    with db.write() as conn:
        audit_recorder.record(
            conn, f"kme:{origin}", "audit.peer_conflict", "audit", {"peer": origin, "problem": problem[:500]}
        )


def checkpoints_to_push(db: Database, acked: int | None, limit: int) -> list[Checkpoint]:
    """Our checkpoints after ``acked`` (at most ``limit``); the newest alone when ``acked`` is unknown."""
    with db.read() as conn:
        if acked is None:
            last = audit.last_chained_checkpoint(conn)
            return [last] if last is not None else []
        return audit.chained_checkpoints(conn, acked)[:limit]


def checkpoint(db: Database, number: int) -> Checkpoint | None:
    """Our chained checkpoint ``number``, if the database holds it."""
    with db.read() as conn:
        return _numbered(audit.chained_checkpoints(conn, number - 1)[:1], number)


def store_receipt(db: Database, peer_id: str, receipt: Receipt) -> bool:
    """Store a peer's receipt if it names a checkpoint this database holds, identical; True if stored
    (False too when the peer already countersigned that checkpoint)."""
    with db.write() as conn:
        ours = _numbered(audit.chained_checkpoints(conn, receipt.number - 1)[:1], receipt.number)
        if ours is None or ours.hash() != receipt.checkpoint_hash:
            log.error(
                "audit_peer_holds_other_history",
                peer=peer_id,
                number=receipt.number,
                reason="the peer holds a checkpoint of ours that this database lacks or holds differently",
            )
            return False
        return receipts.record(conn, receipt)


def latest_receipts(db: Database) -> tuple[list[Receipt], dict[int, Checkpoint]]:
    """The newest receipt of each peer, and our checkpoints from the oldest of them on, by number."""
    with db.read() as conn:
        latest = receipts.latest_per_peer(conn)
        ours = {
            cp.number: cp
            for cp in audit.chained_checkpoints(conn, min((r.number for r in latest), default=1) - 1)
        }
    return latest, ours


def _numbered(found: Sequence[Checkpoint], number: int) -> Checkpoint | None:
    return found[0] if found and found[0].number == number else None
