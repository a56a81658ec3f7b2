"""Peer receipts for this KME's audit checkpoints (``kms.audit.peer_copies``; the ``Receipt`` type is
``kms.domain.audit_chain``'s)."""

from __future__ import annotations

from sqlalchemy import Connection, func, insert, select

from kms.domain.audit_chain import Receipt
from kms.storage.schema import audit_countersignatures as receipts


def record(conn: Connection, receipt: Receipt) -> bool:
    """Store a receipt unless this peer already countersigned that checkpoint; True if stored."""
    exists = conn.execute(
        select(receipts.c.number).where(
            receipts.c.peer_kme_id == receipt.peer, receipts.c.number == receipt.number
        )
    ).first()
    if exists is not None:
        return False
    conn.execute(
        insert(receipts).values(
            peer_kme_id=receipt.peer,
            number=receipt.number,
            checkpoint_hash=receipt.checkpoint_hash,
            key_version=receipt.key_version,
            algorithm=receipt.algorithm,
            signature=receipt.signature,
            at=receipt.at,
        )
    )
    return True


def latest_per_peer(conn: Connection) -> list[Receipt]:
    """The newest receipt of each peer."""
    newest = (
        select(receipts.c.peer_kme_id, func.max(receipts.c.number).label("number"))
        .group_by(receipts.c.peer_kme_id)
        .subquery()
    )
    rows = conn.execute(
        select(receipts)
        .join(
            newest,
            (receipts.c.peer_kme_id == newest.c.peer_kme_id) & (receipts.c.number == newest.c.number),
        )
        .order_by(receipts.c.peer_kme_id)
    )
    return [
        Receipt(
            r.peer_kme_id,
            int(r.number),
            r.checkpoint_hash,
            int(r.key_version),
            r.algorithm,
            r.signature,
            r.at,
        )
        for r in rows
    ]
