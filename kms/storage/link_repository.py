"""SQL for link health: suspending a link's pool and keys on an alarm, resuming it by an operator.

Suspension is one transaction: the link, its active and pre-active blocks, and every reserved key
cut from them become ``suspended``, so nothing derived from a suspended block is served.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, select, update

from kms.domain.lifecycle import KeyState
from kms.storage.pool_repository import EventBatch
from kms.storage.schema import key_blocks, keys, links


@dataclass(frozen=True)
class LinkChange:
    link_id: str
    blocks: int
    keys: int


def link_state(conn: Connection, link_id: str) -> str | None:
    return conn.execute(select(links.c.state).where(links.c.id == link_id)).scalar_one_or_none()


def _block_subject(row: object) -> str:
    return f"{row.link_id}/{row.source_block_id}@{row.source_offset_bits}"  # type: ignore[attr-defined]


def suspend_link(conn: Connection, link_id: str, actor: str, reason: str, events: EventBatch) -> LinkChange:
    conn.execute(update(links).where(links.c.id == link_id).values(state="suspended", updated_at=events.at))
    events.add("link", link_id, KeyState.ACTIVE, KeyState.SUSPENDED, actor, reason[:500])
    blocks = conn.execute(
        select(
            key_blocks.c.id,
            key_blocks.c.link_id,
            key_blocks.c.source_block_id,
            key_blocks.c.source_offset_bits,
            key_blocks.c.state,
        )
        .where(
            key_blocks.c.link_id == link_id,
            key_blocks.c.state.in_([KeyState.ACTIVE.value, KeyState.PRE_ACTIVE.value]),
        )
        .with_for_update()
    ).all()
    for b in blocks:
        events.add("block", _block_subject(b), KeyState(b.state), KeyState.SUSPENDED, actor, "link suspended")
    if blocks:
        conn.execute(
            update(key_blocks)
            .where(key_blocks.c.id.in_([b.id for b in blocks]))
            .values(state=KeyState.SUSPENDED.value)
        )
    all_block_ids = select(key_blocks.c.id).where(key_blocks.c.link_id == link_id)
    reserved = (
        conn.execute(
            select(keys.c.key_id)
            .where(keys.c.block_id.in_(all_block_ids), keys.c.state == KeyState.RESERVED.value)
            .with_for_update()
        )
        .scalars()
        .all()
    )
    for key_id in reserved:
        events.add("key", key_id, KeyState.RESERVED, KeyState.SUSPENDED, actor, "link suspended")
    if reserved:
        conn.execute(update(keys).where(keys.c.key_id.in_(reserved)).values(state=KeyState.SUSPENDED.value))
    return LinkChange(link_id, len(blocks), len(reserved))


def resume_link(
    conn: Connection, link_id: str, actor: str, reason: str, events: EventBatch, discard: bool
) -> LinkChange:
    """Reactivate a link. With ``discard``, its suspended blocks and keys are destroyed instead."""
    conn.execute(update(links).where(links.c.id == link_id).values(state="active", updated_at=events.at))
    events.add("link", link_id, KeyState.SUSPENDED, KeyState.ACTIVE, actor, reason[:500])
    block_target = KeyState.DESTROYED if discard else KeyState.ACTIVE
    blocks = conn.execute(
        select(
            key_blocks.c.id,
            key_blocks.c.link_id,
            key_blocks.c.source_block_id,
            key_blocks.c.source_offset_bits,
        )
        .where(key_blocks.c.link_id == link_id, key_blocks.c.state == KeyState.SUSPENDED.value)
        .with_for_update()
    ).all()
    for b in blocks:
        events.add("block", _block_subject(b), KeyState.SUSPENDED, block_target, actor, reason[:500])
    if blocks:
        values: dict[str, object] = {"state": block_target.value}
        if discard:
            values["material"] = None
        conn.execute(update(key_blocks).where(key_blocks.c.id.in_([b.id for b in blocks])).values(**values))
    key_target = KeyState.DESTROYED if discard else KeyState.RESERVED
    suspended = (
        conn.execute(
            select(keys.c.key_id)
            .where(
                keys.c.block_id.in_(select(key_blocks.c.id).where(key_blocks.c.link_id == link_id)),
                keys.c.state == KeyState.SUSPENDED.value,
            )
            .with_for_update()
        )
        .scalars()
        .all()
    )
    for key_id in suspended:
        events.add("key", key_id, KeyState.SUSPENDED, key_target, actor, reason[:500])
    if suspended:
        kvalues: dict[str, object] = {"state": key_target.value}
        if discard:
            kvalues.update(material=None, closed_at=events.at)
        conn.execute(update(keys).where(keys.c.key_id.in_(suspended)).values(**kvalues))
    return LinkChange(link_id, len(blocks), len(suspended))
