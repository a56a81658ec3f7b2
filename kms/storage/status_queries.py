"""Read-only reports for operators (``qkms status``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Connection, func, select

from kms.domain.lifecycle import KeyState
from kms.storage.database import Database
from kms.storage.schema import key_blocks, keys, links, saes


@dataclass(frozen=True)
class LinkLevel:
    link_id: str
    peer_kme_id: str
    adapter: str
    state: str
    active_blocks: int
    stored_bits: int  # unserved bits this KME may cut
    mirror_bits: int = 0  # a shared link's pieces that the peer KME cuts (held here as a mirror)
    unconfirmed_blocks: int = 0  # pieces waiting for the peer to confirm it holds the same block


@dataclass
class PoolReport:
    links: list[LinkLevel] = field(default_factory=list)
    keys_by_state: dict[str, int] = field(default_factory=dict)
    saes: list[str] = field(default_factory=list)


def pool_report(url: str) -> PoolReport:
    db = Database(url)
    try:
        with db.read() as conn:
            return read_pool_report(conn)
    finally:
        db.dispose()


def read_pool_report(conn: Connection) -> PoolReport:
    """The report in the caller's snapshot (the operator's /metrics reads the same figures)."""
    own: dict[str, tuple[int, int]] = {}
    mirror: dict[str, int] = {}
    for r in conn.execute(
        select(
            key_blocks.c.link_id,
            key_blocks.c.owner_kme_id.is_(None).label("own"),
            func.count().label("blocks"),
            func.sum(key_blocks.c.bit_length - key_blocks.c.next_bit).label("bits"),
        )
        .where(key_blocks.c.state == KeyState.ACTIVE.value)
        .group_by(key_blocks.c.link_id, key_blocks.c.owner_kme_id.is_(None))
    ):
        if r.own:
            own[r.link_id] = (int(r.blocks), int(r.bits or 0))
        else:
            mirror[r.link_id] = int(r.bits or 0)
    pending: dict[str, int] = dict(
        conn.execute(
            select(key_blocks.c.link_id, func.count())
            .where(key_blocks.c.state == KeyState.PRE_ACTIVE.value)
            .group_by(key_blocks.c.link_id)
        ).all()
    )
    report = PoolReport()
    for r in conn.execute(select(links.c.id, links.c.peer_kme_id, links.c.adapter, links.c.state)):
        blocks, bits = own.get(r.id, (0, 0))
        report.links.append(
            LinkLevel(
                r.id,
                r.peer_kme_id,
                r.adapter,
                r.state,
                blocks,
                bits,
                mirror.get(r.id, 0),
                int(pending.get(r.id, 0)),
            )
        )
    report.keys_by_state = {
        r.state: int(r.n)
        for r in conn.execute(
            select(keys.c.state, func.sum(keys.c.key_count).label("n")).group_by(keys.c.state)
        )
    }
    # Not the other KMEs' SAEs this one was told about (``managed_by = 'peer'``, DECISIONS.md D-39).
    registered = select(saes.c.id).where(saes.c.managed_by != "peer").order_by(saes.c.id)
    report.saes = [r.id for r in conn.execute(registered)]
    return report
