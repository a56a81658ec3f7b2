"""SQL for link health: suspending a link's pool and keys on an alarm, resuming it by an operator.

An alarm suspends in one transaction: the link, its active and pre-active blocks, and every
reserved key cut from them become ``suspended``, so nothing derived from a suspended block is served.
An operator's suspend or resume changes the link and its keys in one transaction and then the
link's blocks in bounded batches (``move_link_blocks``, ``kms.service.links``): the cut and the peer
ledger read the *link's* state, so a block of a suspended link is never cut while it waits its turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, func, select, update

from kms.domain.lifecycle import KeyState
from kms.storage.pool_repository import EventBatch, members
from kms.storage.schema import key_blocks, keys, links


@dataclass(frozen=True)
class LinkChange:
    link_id: str
    blocks: int
    keys: int


def count_link_blocks(conn: Connection, link_id: str, states: Sequence[KeyState]) -> int:
    return int(
        conn.execute(
            select(func.count())
            .select_from(key_blocks)
            .where(key_blocks.c.link_id == link_id, key_blocks.c.state.in_([s.value for s in states]))
        ).scalar_one()
    )


def link_state(conn: Connection, link_id: str) -> str | None:
    return conn.execute(select(links.c.state).where(links.c.id == link_id)).scalar_one_or_none()


def move_link_blocks(
    conn: Connection,
    link_id: str,
    current: Sequence[KeyState],
    target: KeyState,
    actor: str,
    reason: str,
    events: EventBatch,
    limit: int | None = None,
) -> int:
    """Lock (up to ``limit`` of) the link's blocks in ``current`` states and move them to ``target``
    (zeroised if destroyed); how many moved."""
    query = (
        select(
            key_blocks.c.id,
            key_blocks.c.link_id,
            key_blocks.c.source_block_id,
            key_blocks.c.source_offset_bits,
            key_blocks.c.state,
        )
        .where(key_blocks.c.link_id == link_id, key_blocks.c.state.in_([s.value for s in current]))
        .order_by(key_blocks.c.id)
        .with_for_update()
    )
    blocks = conn.execute(query if limit is None else query.limit(limit)).all()
    for b in blocks:
        subject = f"{b.link_id}/{b.source_block_id}@{b.source_offset_bits}"
        events.add("block", subject, KeyState(b.state), target, actor, reason[:500])
    if blocks:
        values: dict[str, object] = {"state": target.value}
        if target is KeyState.DESTROYED:
            values["material"] = None
        conn.execute(update(key_blocks).where(key_blocks.c.id.in_([b.id for b in blocks])).values(**values))
    return len(blocks)


def _move_keys(
    conn: Connection,
    link_id: str,
    current: KeyState,
    target: KeyState,
    actor: str,
    reason: str,
    events: EventBatch,
) -> int:
    """Lock the keys cut from the link's blocks that are in ``current`` and move them to ``target``."""
    rows = conn.execute(
        select(keys.c.key_id, keys.c.key_count)
        .where(
            keys.c.block_id.in_(select(key_blocks.c.id).where(key_blocks.c.link_id == link_id)),
            keys.c.state == current.value,
        )
        .with_for_update()
    ).all()
    key_ids = members(rows)  # a run's keys move together, each with its own event
    for key_id in key_ids:
        events.add("key", key_id, current, target, actor, reason[:500])
    if rows:
        values: dict[str, object] = {"state": target.value}
        if target is KeyState.DESTROYED:
            values.update(material=None, closed_at=events.at)
        conn.execute(update(keys).where(keys.c.key_id.in_([r.key_id for r in rows])).values(**values))
    return len(key_ids)


def suspend_link(conn: Connection, link_id: str, actor: str, reason: str, events: EventBatch) -> LinkChange:
    conn.execute(update(links).where(links.c.id == link_id).values(state="suspended", updated_at=events.at))
    events.add("link", link_id, KeyState.ACTIVE, KeyState.SUSPENDED, actor, reason[:500])
    live = (KeyState.ACTIVE, KeyState.PRE_ACTIVE)
    blocks = move_link_blocks(conn, link_id, live, KeyState.SUSPENDED, actor, "link suspended", events)
    n_keys = _move_keys(conn, link_id, KeyState.RESERVED, KeyState.SUSPENDED, actor, "link suspended", events)
    return LinkChange(link_id, blocks, n_keys)


def resume_link(
    conn: Connection, link_id: str, actor: str, reason: str, events: EventBatch, discard: bool
) -> LinkChange:
    """Reactivate a link. With ``discard``, its suspended blocks and keys are destroyed instead."""
    conn.execute(update(links).where(links.c.id == link_id).values(state="active", updated_at=events.at))
    events.add("link", link_id, KeyState.SUSPENDED, KeyState.ACTIVE, actor, reason[:500])
    block_target = KeyState.DESTROYED if discard else KeyState.ACTIVE
    key_target = KeyState.DESTROYED if discard else KeyState.RESERVED
    blocks = move_link_blocks(conn, link_id, (KeyState.SUSPENDED,), block_target, actor, reason, events)
    n_keys = _move_keys(conn, link_id, KeyState.SUSPENDED, key_target, actor, reason, events)
    return LinkChange(link_id, blocks, n_keys)


def suspend_link_keys(conn: Connection, link_id: str, actor: str, reason: str, events: EventBatch) -> int:
    """The link and its reserved keys become ``suspended`` (its blocks follow in batches)."""
    conn.execute(update(links).where(links.c.id == link_id).values(state="suspended", updated_at=events.at))
    events.add("link", link_id, KeyState.ACTIVE, KeyState.SUSPENDED, actor, reason[:500])
    return _move_keys(conn, link_id, KeyState.RESERVED, KeyState.SUSPENDED, actor, "link suspended", events)


def resume_link_keys(
    conn: Connection, link_id: str, actor: str, reason: str, events: EventBatch, discard: bool
) -> int:
    """The link becomes ``active`` again and its suspended keys ``reserved`` (or, with ``discard``,
    ``destroyed``); its blocks follow in batches."""
    conn.execute(update(links).where(links.c.id == link_id).values(state="active", updated_at=events.at))
    events.add("link", link_id, KeyState.SUSPENDED, KeyState.ACTIVE, actor, reason[:500])
    key_target = KeyState.DESTROYED if discard else KeyState.RESERVED
    return _move_keys(conn, link_id, KeyState.SUSPENDED, key_target, actor, reason, events)
