"""SQL for a peer KME's restore (DECISIONS.md D-39, completing D-28 across sites).

When an adjacent KME says it was restored from a backup, every piece this KME holds of a block shared
with it and confirmed before the restore is retired here: the peer fenced its own pieces and its
mirrors of ours (so it refuses every entry cut from them) or, for blocks that arrived after its
snapshot, holds no record of them at all. Our mirrors of its pieces can then never be asked for
again, and our own pieces of those blocks could only earn refusals (a 503 and discarded bits per try).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from kms.domain.audit_chain import AuditRecord
from kms.domain.lifecycle import KeyState
from kms.storage.audit_repository import read_records
from kms.storage.pool_repository import EventBatch
from kms.storage.rawsql import Raw

# Blocks the peer had confirmed (``pre_active`` ones are left to block confirmation and its sweep).
_CONFIRMED = (KeyState.ACTIVE.value, KeyState.SUSPENDED.value)


@dataclass(frozen=True)
class Retired:
    link_id: str
    own_pieces: int
    mirrored_pieces: int
    bits: int  # unserved bits dropped (own pieces' bits left plus the mirrors' untaken size)


def retire_shared(
    conn: Connection, peer_kme_id: str, received_before: datetime, actor: str, reason: str, events: EventBatch
) -> list[Retired]:
    """Destroy (material erased) every piece, own or mirrored, of a block shared with ``peer_kme_id``
    that the peer confirmed and that arrived here before ``received_before``; one lifecycle event each."""
    raw = Raw(conn)
    where = (
        "link_id IN (SELECT id FROM links WHERE peer_kme_id = ?)"
        " AND state IN ('active', 'suspended') AND received_at < ?"
    )
    rows = raw.all(
        "SELECT id, link_id, source_block_id, source_offset_bits, state, owner_kme_id,"
        f" bit_length - next_bit FROM key_blocks WHERE {where}" + raw.for_update(),
        (peer_kme_id, raw.ts(received_before)),
    )
    per_link: dict[str, list[int]] = {}
    for _id, link_id, block_id, offset, state, owner, left in rows:
        counts = per_link.setdefault(link_id, [0, 0, 0])
        counts[1 if owner else 0] += 1
        counts[2] += int(left)
        events.add(
            "block", f"{link_id}/{block_id}@{offset}", KeyState(state), KeyState.DESTROYED, actor, reason
        )
    if rows:
        raw.execute(
            f"UPDATE key_blocks SET state = 'destroyed', material = NULL WHERE {where}",
            (peer_kme_id, raw.ts(received_before)),
        )
    return [Retired(link, c[0], c[1], c[2]) for link, c in sorted(per_link.items())]


def keys_recorded_from(conn: Connection, peer_kme_id: str) -> int:
    """Keys the peer made for slaves here that are still waiting to be fetched (they are kept)."""
    row = Raw(conn).one(
        "SELECT COALESCE(SUM(key_count), 0) FROM keys WHERE source_kme_id = ? AND state = 'reserved'",
        (peer_kme_id,),
    )
    return int(row[0])


def last_restore(conn: Connection, kme_id: str) -> AuditRecord | None:
    """The newest ``backup.restored`` record of this KME, if it was ever restored."""
    found = [r for r in read_records(conn, subject=kme_id) if r.action == "backup.restored"]
    return found[-1] if found else None
