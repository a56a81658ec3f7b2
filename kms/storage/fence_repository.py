"""SQL that fences a restored key store (docs/DECISIONS.md D-28): nothing it holds is served again.

Runs inside the transaction the caller (``kms.service.restore``) opened, before any KME process
serves from the store. Every key that could still be delivered (reserved, suspended, awaiting a
peer, or consumed but inside its redelivery window) and every block with bits left becomes
``compromised`` (``pre_active`` ones ``destroyed``, the only end the lifecycle allows them), and its
sealed material is erased: the snapshot cannot tell which of them were served after it was taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection

from kms.domain.key_ids import run_member
from kms.domain.lifecycle import KeyState
from kms.storage.pool_repository import EventBatch
from kms.storage.rawsql import Raw

# Key states that may still lead to a delivery, and where each goes.
_KEY_FENCE = {
    KeyState.RESERVED.value: KeyState.COMPROMISED.value,
    KeyState.SUSPENDED.value: KeyState.COMPROMISED.value,
    KeyState.PRE_ACTIVE.value: KeyState.DESTROYED.value,
}
_BLOCK_FENCE = {
    KeyState.ACTIVE.value: KeyState.COMPROMISED,
    KeyState.SUSPENDED.value: KeyState.COMPROMISED,
    KeyState.PRE_ACTIVE.value: KeyState.DESTROYED,
}


@dataclass(frozen=True)
class FenceCounts:
    keys: int  # key_IDs (members of runs counted one by one)
    consumed_in_window: int  # consumed keys whose redelivery material was erased
    blocks: int
    bits: int  # unserved pool bits erased


def fence(conn: Connection, at: datetime, actor: str, reason: str) -> FenceCounts:
    raw = Raw(conn)
    now = raw.ts(at)
    keys = 0
    for state, target in _KEY_FENCE.items():
        row = raw.one("SELECT COALESCE(SUM(key_count), 0) FROM keys WHERE state = ?", (state,))
        keys += int(row[0])
        raw.execute(
            "UPDATE keys SET state = ?, material = NULL, closed_at = ? WHERE state = ?", (target, now, state)
        )
    row = raw.one(
        "SELECT COALESCE(SUM(key_count), 0) FROM keys WHERE state = 'consumed' AND material IS NOT NULL"
    )
    in_window = int(row[0])
    raw.execute(
        "UPDATE keys SET state = 'compromised', material = NULL, expires_at = ?"
        " WHERE state = 'consumed' AND material IS NOT NULL",
        (now,),
    )
    events = EventBatch(at)
    blocks = bits = 0
    for state, target in _BLOCK_FENCE.items():
        rows = raw.all(
            "SELECT id, link_id, source_block_id, source_offset_bits, bit_length - next_bit FROM key_blocks"
            " WHERE state = ?",
            (state,),
        )
        for _id, link_id, source, offset, left in rows:
            events.add("block", f"{link_id}/{source}@{offset}", KeyState(state), target, actor, reason)
            bits += int(left)
        blocks += len(rows)
        raw.execute("UPDATE key_blocks SET state = ?, material = NULL WHERE state = ?", (target.value, state))
    events.flush(conn)
    return FenceCounts(keys, in_window, blocks, bits)


def live_key_ids(conn: Connection, limit: int = 100000) -> list[str]:
    """key_IDs that could still be delivered (for tests and reports: empty after :func:`fence`)."""
    raw = Raw(conn)
    rows = raw.all(
        "SELECT key_id, key_count FROM keys WHERE state IN ('reserved', 'suspended', 'pre_active')"
        f" OR material IS NOT NULL LIMIT {int(limit)}"
    )
    return [k if n == 1 else run_member(k, i) for k, n in rows for i in range(int(n))]
