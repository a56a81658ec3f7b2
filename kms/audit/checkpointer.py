"""Signs audit checkpoints with the KME's ML-DSA key, off the delivery hot path.

A background thread calls :func:`write_checkpoint` every ``audit.checkpoint_seconds``: if the chain
head moved since the last checkpoint, it signs (head seq, head hash, KME ID, key version, time).
"""

from __future__ import annotations

from datetime import UTC, datetime

from kms.audit.chain import CHECKPOINT_CONTEXT, Checkpoint
from kms.crypto.identity import KmeIdentity
from kms.storage import audit_repository as audit
from kms.storage.database import Database


def write_checkpoint(db: Database, identity: KmeIdentity, kme_id: str) -> Checkpoint | None:
    with db.read() as conn:
        seq, head_hash = audit.head(conn)
        if seq == 0 or audit.last_checkpoint_seq(conn) >= seq:
            return None
    info = identity.active_public("sign")
    unsigned = Checkpoint(
        seq, head_hash, kme_id, info.version, info.algorithm, datetime.now(UTC).isoformat(), ""
    )
    version, algorithm, signature = identity.sign(unsigned.message(), CHECKPOINT_CONTEXT)
    if version != info.version:  # rotated in between: sign again with the version named inside
        return write_checkpoint(db, identity, kme_id)
    cp = Checkpoint(seq, head_hash, kme_id, version, algorithm, unsigned.at, signature.hex())
    with db.write() as conn:
        if audit.last_checkpoint_seq(conn) < seq:
            audit.insert_checkpoint(conn, cp)
    return cp
