"""A link's pool is bounded by everything it holds, not only by what is servable now.

Found by a network operator's run (issue 18): the filler's per-link limit counted only ``active``
blocks, so a link end that ran ahead of its peer (blocks waiting for confirmation, ``pre_active``)
or a suspended link kept pulling without bound; a trusted node then spent a fifth of its CPU
summing and announcing tens of thousands of unconfirmed blocks. Unconfirmed blocks that never get
confirmed are destroyed after ``peering.unconfirmed_block_seconds`` so that they cannot hold the
limit forever.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from kms.config import KmsSettings
from kms.domain.errors import ServiceUnavailable
from kms.provision.workdir import init_workdir
from kms.runtime.assembly import Runtime, build_runtime
from kms.service.link_stock import LinkStock
from kms.service.peer_context import PeerSite
from kms.service.peer_sweep import sweep_peer_state
from kms.storage.integrity import run_checks
from kms.storage.pool_repository import stored_bits_by_link
from kms.storage.schema import audit_records, key_blocks
from tests.conftest import database_url

LIMIT = 1 << 20


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def rt(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Runtime]:
    res = init_workdir(
        tmp_path / "kme",
        "KME-T",
        ["SAE-M", "SAE-S"],
        link_source="random",
        database_url=database_url(request.param, request),
        pool_overrides={"max_pool_bits": LIMIT},
    )
    runtime = build_runtime(KmsSettings.load(res.config_path))
    yield runtime
    runtime.close()


def _blocks(rt: Runtime) -> int:
    with rt.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(key_blocks)).scalar_one())


def _set_state(rt: Runtime, state: str) -> None:
    with rt.db.write() as conn:
        conn.execute(update(key_blocks).values(state=state))


@pytest.mark.parametrize("held_as", ["pre_active", "suspended"])
def test_the_filler_stops_at_the_limit_counting_unconfirmed_and_suspended_blocks(
    rt: Runtime, held_as: str
) -> None:
    filler = rt.make_filler()
    while filler.fill_once():
        pass
    held = _blocks(rt)
    assert held > 0
    _set_state(rt, held_as)  # the same bits, now waiting for a peer or for an operator
    assert filler.fill_once() == 0
    assert _blocks(rt) == held


@pytest.mark.parametrize("limit", [LIMIT // 3, LIMIT // 3 + 4096])
def test_the_stored_bits_never_pass_the_limit_whatever_the_block_size(rt: Runtime, limit: int) -> None:
    """A limit that is no multiple of the block size: the filler used to store a whole pulled run
    once the link was under its limit, passing it by up to a run of blocks (issue 18 floor: no
    link's stored material exceeds its limit). Blocks that do not fit wait, none is lost."""
    filler = rt.make_filler()
    filler.cfg = rt.settings.pool.model_copy(update={"max_pool_bits": limit})
    while filler.fill_once(max_events=5):
        with rt.db.read() as conn:
            levels = stored_bits_by_link(conn)
        assert levels and max(levels.values()) <= limit, (levels, limit)
    assert filler.fill_once() == 0  # full: nothing more is stored...
    with rt.db.write() as conn:  # ...until room is made; the waiting blocks then go in first
        conn.execute(update(key_blocks).values(state="destroyed"))
    assert filler.fill_once(max_events=5) > 0
    with rt.db.read() as conn:
        assert 0 < max(stored_bits_by_link(conn).values()) <= limit


def test_a_limit_smaller_than_one_block_does_not_stall_the_link(rt: Runtime) -> None:
    """Found with the console (issue 15): with ``max_pool_bits`` below one block, a block was
    stored only into an empty pool, and the bits left after cutting keys never reach zero: one
    block, then nothing for good. Such a block is now stored alone whenever the link is under
    its limit."""
    filler = rt.make_filler()
    with rt.db.read() as conn:
        assert not stored_bits_by_link(conn)
    filler.cfg = rt.settings.pool.model_copy(update={"max_pool_bits": 1000})  # blocks are 65,536 bits
    assert filler.fill_once(max_events=2) > 0
    assert filler.fill_once(max_events=2) == 0  # over the limit: the next block waits
    master = rt.registry.get("SAE-M")
    assert master is not None
    # 384-bit keys do not divide a 65,536-bit block: 256 bits stay behind.
    with pytest.raises(ServiceUnavailable):
        for _ in range(200):
            rt.service.get_keys(master, "SAE-S", number=1, size=384)
    with rt.db.read() as conn:
        left = max(stored_bits_by_link(conn).values())
    assert 0 < left < 1000  # leftovers, never zero: the old filler waited for zero
    assert filler.fill_once(max_events=2) > 0


def test_blocks_never_confirmed_are_destroyed_audited_and_the_store_checks_clean(rt: Runtime) -> None:
    rt.make_filler().fill_once()
    _set_state(rt, "pre_active")
    pieces = _blocks(rt)
    now = datetime.now(UTC)
    actor = "kme:KME-T/peer-sync"
    # Not old enough yet: kept.
    sweep_peer_state(rt.db, actor, now, now, now, unconfirmed_before=now - timedelta(hours=1))
    with rt.db.read() as conn:
        states = dict(
            conn.execute(select(key_blocks.c.state, func.count()).group_by(key_blocks.c.state)).all()
        )
    assert states == {"pre_active": pieces}
    sweep_peer_state(rt.db, actor, now, now, now, unconfirmed_before=now + timedelta(seconds=1))
    with rt.db.read() as conn:
        rows = conn.execute(select(key_blocks.c.state, key_blocks.c.material)).all()
        records = conn.execute(
            select(audit_records.c.subject, audit_records.c.data).where(
                audit_records.c.action == "blocks.unconfirmed_discarded"
            )
        ).all()
        problems = [c.name for c in run_checks(conn, rt.envelope, kme_id="KME-T") if not c.passed]
    assert {(state, material) for state, material in rows} == {("destroyed", None)}
    assert len(records) == 1 and records[0][0] == "link-local-1"
    assert problems == []


def test_link_stock_is_read_once_for_many_concurrent_routers(rt: Runtime) -> None:
    rt.make_filler().fill_once()
    site = PeerSite("KME-T", rt.settings.pool, rt.db, rt.envelope, rt.identity, rt.registry)
    stock = LinkStock(site, max_age=60.0)
    reads = 0
    fresh = stock.fresh

    def counted() -> list:  # type: ignore[type-arg]
        nonlocal reads
        reads += 1
        return fresh()

    stock.fresh = counted  # type: ignore[method-assign]
    start = threading.Barrier(8)

    def route() -> None:
        start.wait()
        for _ in range(50):
            stock.levels()

    threads = [threading.Thread(target=route) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert reads == 1
    stock.max_age = 0.0  # stale at once: each call re-reads, one thread at a time
    stock.levels()
    assert reads == 2
