"""SQL for the KME-to-KME protocol: the replay guard, keys pending at a peer, link levels.

The blocks shared with a peer (confirmation, mirrored pieces, rebalancing) are ``mirror_repository``'s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from kms.domain.lifecycle import KeyState
from kms.storage.pool_repository import EventBatch
from kms.storage.rawsql import Raw


def remember_message(
    conn: Connection, sender: str, nonce: str, session: str, seq: int, msg_type: str, at: datetime
) -> bool:
    """Record an accepted message; False if its nonce or (session, seq) was seen before (a replay)."""
    raw = Raw(conn)
    seen = raw.one(
        "SELECT 1 FROM peer_messages WHERE sender = ? AND (nonce = ? OR (session = ? AND seq = ?))",
        (sender, nonce, session, seq),
    )
    if seen is not None:
        return False
    raw.execute(
        "INSERT INTO peer_messages (sender, nonce, session, seq, msg_type, received_at) VALUES (?, ?, ?, ?, ?, ?)",
        (sender, nonce, session, seq, msg_type, raw.ts(at)),
    )
    return True


def void_message(
    conn: Connection, sender: str, nonce: str, session: str, seq: int, msg_type: str, at: datetime
) -> bool:
    """Mark a request of ``sender`` as seen before it arrives (its sender withdrew it), so that
    :func:`remember_message` refuses it as a replay. False if it had arrived already. On PostgreSQL a
    concurrent transaction remembering the same request makes this wait for it and then do nothing."""
    raw = Raw(conn)
    inserted = raw.execute(
        "INSERT INTO peer_messages (sender, nonce, session, seq, msg_type, received_at)"
        " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (sender, nonce, session, seq, msg_type, raw.ts(at)),
    ).rowcount
    return bool(inserted == 1)


def prune_messages(conn: Connection, before: datetime) -> int:
    """Forget messages older than the freshness window: their timestamps alone now reject replays."""
    raw = Raw(conn)
    return int(raw.execute("DELETE FROM peer_messages WHERE received_at < ?", (raw.ts(before),)).rowcount)


def close_pending_keys(
    conn: Connection, key_ids: Sequence[str], target: KeyState, actor: str, reason: str, at: datetime
) -> int:
    """Settle keys cut for a slave at another KME: ``consumed`` once that KME recorded them,
    ``destroyed`` (bits discarded, never served) when it did not."""
    raw = Raw(conn)
    where, params = raw.in_list("key_id", key_ids)
    count = raw.execute(
        f"UPDATE keys SET state = ?, closed_at = ? WHERE state = 'pre_active' AND {where}",
        [target.value, raw.ts(at), *params],
    ).rowcount
    if target is KeyState.DESTROYED:
        events = EventBatch(at)
        for key_id in key_ids:
            events.add("key", key_id, KeyState.PRE_ACTIVE, target, actor, reason[:500])
        events.flush(conn)
    return int(count)


def destroy_recorded(
    conn: Connection, origin: str, canceller: str, key_ids: Sequence[str], actor: str, at: datetime
) -> list[str]:
    """The master's KME (or a trusted node on the key's route) withdrew keys recorded here because it
    could not confirm delivery: zeroise those still reserved for a slave here, and close the relay
    copies (``pre_active``, no material) a trusted node keeps of them."""
    raw = Raw(conn)
    where, params = raw.in_list("key_id", key_ids)
    rows = [
        (str(r[0]), KeyState(str(r[2])))
        for r in raw.all(
            "SELECT key_id, route, state FROM keys WHERE source_kme_id = ?"
            f" AND state IN ('reserved', 'pre_active') AND {where}" + raw.for_update(),
            [origin, *params],
        )
        if canceller == origin or canceller in _route_nodes(r[1])
    ]
    if rows:
        rwhere, rparams = raw.in_list("key_id", [k for k, _ in rows])
        raw.execute(
            f"UPDATE keys SET state = 'destroyed', material = NULL, closed_at = ? WHERE {rwhere}",
            [raw.ts(at), *rparams],
        )
        events = EventBatch(at)
        for key_id, state in rows:
            events.add("key", key_id, state, KeyState.DESTROYED, actor, "withdrawn by the master's KME")
        events.flush(conn)
    return [k for k, _ in rows]


def _route_nodes(route: Any) -> set[str]:
    hops = json.loads(route) if isinstance(route, str) else route or []
    return {str(h.get("from")) for h in hops if isinstance(h, dict)}


@dataclass(frozen=True)
class LinkLevel:
    link_id: str
    peer_kme_id: str
    state: str
    own_bits: int  # unserved bits in active pieces this KME cuts
    mirror_bits: int = 0  # bits in active pieces the peer cuts (this KME's mirror)
    rate: int | None = None  # own key bits/s stored lately (``LinkStock``); None: not measured yet


def link_levels(conn: Connection) -> list[LinkLevel]:
    raw = Raw(conn)
    own: dict[str, int] = {}
    mirror: dict[str, int] = {}
    for link_id, is_own, bits in raw.all(
        "SELECT link_id, owner_kme_id IS NULL, SUM(bit_length - next_bit) FROM key_blocks"
        " WHERE state = 'active' GROUP BY link_id, owner_kme_id IS NULL"
    ):
        (own if is_own else mirror)[link_id] = int(bits or 0)
    return [
        LinkLevel(r[0], r[1], r[2], own.get(r[0], 0), mirror.get(r[0], 0))
        for r in raw.all("SELECT id, peer_kme_id, state FROM links")
    ]


def own_bits_stored_after(conn: Connection, after_id: int | None) -> tuple[int, dict[str, int]]:
    """(highest block row ID, own bits per link stored in rows after ``after_id``): a range of the
    primary key, so a key-rate reading costs only the rows stored since the last one. ``None``: only
    the highest ID (a first reading)."""
    raw = Raw(conn)
    top = raw.one("SELECT MAX(id) FROM key_blocks")
    highest = int(top[0]) if top and top[0] is not None else 0
    if after_id is None:
        return highest, {}
    rows = raw.all(
        "SELECT link_id, SUM(bit_length) FROM key_blocks WHERE id > ? AND id <= ? AND owner_kme_id IS NULL"
        " GROUP BY link_id",
        (after_id, highest),
    )
    return highest, {str(r[0]): int(r[1] or 0) for r in rows}


def peer_links(conn: Connection) -> list[LinkLevel]:
    """Every link with its peer and state; the stock figures left 0 (no sum over the pool)."""
    return [
        LinkLevel(r[0], r[1], r[2], 0, 0) for r in Raw(conn).all("SELECT id, peer_kme_id, state FROM links")
    ]


def peer_link(conn: Connection, link_id: str) -> tuple[str, str] | None:
    """(peer KME, state) of a link."""
    row = Raw(conn).one("SELECT peer_kme_id, state FROM links WHERE id = ?", (link_id,))
    return (row[0], row[1]) if row else None


def destroy_stale_pending(conn: Connection, before: datetime, actor: str) -> list[str]:
    """Keys still ``pre_active`` long after their request (the process died between cutting them and
    hearing from the peer): destroyed, so their bits are accounted for and never served."""
    raw = Raw(conn)
    rows = [
        r[0]
        for r in raw.all(
            "SELECT key_id FROM keys WHERE state = 'pre_active' AND created_at < ? LIMIT 1000"
            + raw.for_update(skip_locked=True),
            (raw.ts(before),),
        )
    ]
    if rows:
        close_pending_keys(
            conn,
            rows,
            KeyState.DESTROYED,
            actor,
            "no answer from the peer before the process stopped",
            before,
        )
    return rows
