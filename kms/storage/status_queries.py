"""Read-only reports for operators (``qkms status``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

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
    stored_bits: int


@dataclass
class PoolReport:
    links: list[LinkLevel] = field(default_factory=list)
    keys_by_state: dict[str, int] = field(default_factory=dict)
    saes: list[str] = field(default_factory=list)


def pool_report(url: str) -> PoolReport:
    db = Database(url)
    try:
        with db.read() as conn:
            levels = {
                r.link_id: (int(r.blocks), int(r.bits or 0))
                for r in conn.execute(
                    select(
                        key_blocks.c.link_id,
                        func.count().label("blocks"),
                        func.sum(key_blocks.c.bit_length - key_blocks.c.next_bit).label("bits"),
                    )
                    .where(key_blocks.c.state == KeyState.ACTIVE.value)
                    .group_by(key_blocks.c.link_id)
                )
            }
            report = PoolReport()
            for r in conn.execute(select(links.c.id, links.c.peer_kme_id, links.c.adapter, links.c.state)):
                blocks, bits = levels.get(r.id, (0, 0))
                report.links.append(LinkLevel(r.id, r.peer_kme_id, r.adapter, r.state, blocks, bits))
            report.keys_by_state = {
                r.state: int(r.n)
                for r in conn.execute(select(keys.c.state, func.count().label("n")).group_by(keys.c.state))
            }
            report.saes = [r.id for r in conn.execute(select(saes.c.id).order_by(saes.c.id))]
            return report
    finally:
        db.dispose()
