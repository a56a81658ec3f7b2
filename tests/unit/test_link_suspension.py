"""A link alarm suspends the link: nothing cut from its blocks is served; the policy's fallback takes over."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from kms.config import KmsSettings
from kms.domain.errors import InvalidRequest, ServiceUnavailable
from kms.provision.workdir import init_workdir
from kms.runtime.assembly import Runtime, build_runtime
from kms.runtime.filler import PoolFiller
from kms.storage.schema import key_blocks
from qkd_adapters.keyblock import KeyBlock, LinkAlarm, Provenance

M, S, T = "SAE-M", "SAE-S", "SAE-T"


@pytest.fixture
def rt(tmp_path: Path) -> Runtime:
    policy = {
        "mode": "qkd",
        "pqc_fallback": False,
        "kem": "ML-KEM-768",
        "rules": [{"master": M, "slave": S, "mode": "qkd", "pqc_fallback": True}],
    }
    res = init_workdir(
        tmp_path / "kme",
        "KME-T",
        [M, S, T],
        link_source="random",
        policy=policy,
        pool_overrides={"max_pool_bits": 1 << 20},
    )
    runtime = build_runtime(KmsSettings.load(res.config_path))
    yield runtime
    runtime.close()


def _sae(rt: Runtime, sae_id: str):  # type: ignore[no-untyped-def]
    info = rt.registry.get(sae_id)
    assert info is not None
    return info


def test_alarm_suspends_and_fallback_takes_over(rt: Runtime) -> None:
    filler = rt.make_filler()
    assert filler.fill_once() > 0
    svc = rt.service
    pending = svc.get_keys(_sae(rt, M), S, number=2)
    other = svc.get_keys(_sae(rt, M), T, number=1)

    code = "qber-over-threshold"
    assert filler.handle_alarm(
        LinkAlarm("link-local-1", "blk-9", "QBER 0.26 above 0.11", details={"code": code})
    )

    # Keys already reserved from the suspended link are not served, to anyone.
    with pytest.raises(InvalidRequest) as err:
        svc.get_keys_with_ids(_sae(rt, S), M, [k.key_id for k in pending])
    assert {d["reason"] for d in err.value.details or []} == {"key is suspended"}
    # M -> S may fall back to ML-KEM; M -> T may not.
    with pytest.raises(ServiceUnavailable):
        svc.get_keys(_sae(rt, M), T)
    fallback = svc.get_keys(_sae(rt, M), S, number=2)
    served = svc.get_keys_with_ids(_sae(rt, S), M, [k.key_id for k in fallback])
    assert [k.material for k in served] == [k.material for k in fallback]
    from kms.service.audit_queries import AuditService

    audit = AuditService(rt.db, rt.identity, "KME-T")
    prov = audit.provenance(fallback[0].key_id)
    assert prov is not None and prov["policy"] == "pqc_fallback" and prov["bits"] is None
    assert prov["kem"]["algorithm"] == "ML-KEM-768"
    assert audit.provenance(other[0].key_id)["state"] == "suspended"  # type: ignore[index]

    # Blocks that arrive while suspended are stored suspended, never served.
    filler.fill_once()
    with rt.db.read() as conn:
        states = set(conn.execute(select(key_blocks.c.state)).scalars())
    assert "active" not in states and "suspended" in states
    actions = [r["action"] for r in audit.events(limit=1000)["records"]]
    assert "link.alarm" in actions and "link.suspended" in actions


def test_non_suspending_alarm_only_recorded(rt: Runtime) -> None:
    filler = rt.make_filler()
    filler.fill_once()
    assert not filler.handle_alarm(
        LinkAlarm(
            "link-local-1",
            "blk-1",
            "finite-key bound gives no key",
            details={"code": "no-positive-key-length"},
        )
    )
    assert len(rt.service.get_keys(_sae(rt, M), T)) == 1


def test_operator_resumes_the_link(rt: Runtime) -> None:
    filler = rt.make_filler()
    filler.fill_once()
    pending = rt.service.get_keys(_sae(rt, M), S)
    filler.handle_alarm(
        LinkAlarm("link-local-1", None, "verification failed", details={"code": "verification-failed"})
    )
    config = str(rt.settings.config_dir / "qkms.toml")
    res = subprocess.run(
        [sys.executable, "-m", "kms", "link", "resume", "link-local-1", "--config", config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    served = rt.service.get_keys_with_ids(_sae(rt, S), M, [pending[0].key_id])
    assert served[0].material == pending[0].material
    again = subprocess.run(
        [sys.executable, "-m", "kms", "link", "resume", "link-local-1", "--config", config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "is not suspended" in again.stderr


class _ScriptedSource:
    """A key source that hands out one scripted pull (blocks and alarms in stream order)."""

    def __init__(self, link_id: str, events: list[KeyBlock | LinkAlarm]) -> None:
        self.link_id = link_id
        self._events = events

    def describe(self) -> dict[str, str]:
        return {"kind": "scripted"}

    def pull(self, max_events: int = 16, timeout: float = 0.0) -> list[KeyBlock | LinkAlarm]:
        events, self._events = self._events, []
        return events

    def close(self) -> None:
        pass


def _block(link_id: str, block_id: str) -> KeyBlock:
    prov = Provenance(protocol="test-random", is_qkd=False, adapter="scripted")
    return KeyBlock(link_id, block_id, os.urandom(1024), 8192, prov)


def test_blocks_after_a_suspending_alarm_in_the_same_pull_are_stored_suspended(rt: Runtime) -> None:
    link = "link-local-1"
    alarm = LinkAlarm(link, "b3", "QBER 0.3", details={"code": "qber-over-threshold"})
    events: list[KeyBlock | LinkAlarm] = [_block(link, "b1"), _block(link, "b2"), alarm, _block(link, "b4")]
    filler = PoolFiller(
        "KME-T",
        rt.db,
        rt.envelope,
        rt.settings.pool,
        [(_ScriptedSource(link, events), "KME-T")],
        suspend_on=rt.settings.link_health.suspend_on,
    )
    assert filler.fill_once() > 0
    with rt.db.read() as conn:
        rows = conn.execute(select(key_blocks.c.source_block_id, key_blocks.c.state)).all()
    states: dict[str, set[str]] = {}
    for block_id, state in rows:
        states.setdefault(block_id, set()).add(state)
    # b1 and b2 went in (one transaction) before the alarm; the alarm then suspended them with the link.
    assert states == {"b1": {"suspended"}, "b2": {"suspended"}, "b4": {"suspended"}}
    from kms.service.audit_queries import AuditService

    records = AuditService(rt.db, rt.identity, "KME-T").events(limit=1000)["records"]
    order = [(r["action"], r["data"].get("block_id")) for r in records if r["action"] != "audit.checkpoint"]
    assert order == [
        ("block.received", "b1"),
        ("block.received", "b2"),
        ("link.alarm", "b3"),
        ("link.suspended", None),
        ("link.blocks_moved", None),  # b1 and b2, in a transaction after the alarm's
        ("block.received", "b4"),
    ]
    received = [r["data"] for r in records if r["action"] == "block.received"]
    assert received[0]["state"] == "active" and received[2]["state"] == "suspended"


def _count_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts write transactions opened from now on (one element, updated in place)."""
    from kms.storage.database import Database

    writes = [0]
    real_write = Database.write

    def counting_write(self: Database, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        writes[0] += 1
        return real_write(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Database, "write", counting_write)
    return writes


def _block_states(rt: Runtime) -> dict[str, int]:
    with rt.db.read() as conn:
        rows = conn.execute(select(key_blocks.c.state)).scalars().all()
    out: dict[str, int] = {}
    for state in rows:
        out[state] = out.get(state, 0) + 1
    return out


def test_an_operators_suspend_and_resume_move_blocks_in_bounded_batches(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 18: suspending a link with 42,685 blocks held the KME 5 s in one transaction. The link
    and its keys now change at once, its blocks in batches, each its own short transaction."""
    from kms.service import links

    filler = rt.make_filler()
    while filler.fill_once():
        pass
    total = sum(_block_states(rt).values())
    assert total >= 8
    pending = rt.service.get_keys(_sae(rt, M), S)
    monkeypatch.setattr(links, "BLOCK_BATCH", 3)
    writes = _count_writes(monkeypatch)
    change = links.suspend(rt.db, "link-local-1", "maintenance")
    assert (change.blocks, change.keys) == (total, 1)
    assert writes[0] >= 1 + total // 3  # the link and keys, then a transaction per batch of 3 blocks
    assert _block_states(rt) == {"suspended": total}
    with pytest.raises(ServiceUnavailable):  # M -> T has no fallback: nothing to serve it from
        rt.service.get_keys(_sae(rt, M), T)
    with pytest.raises(InvalidRequest):  # the reserved key is suspended with its link
        rt.service.get_keys_with_ids(_sae(rt, S), M, [pending[0].key_id])
    change = links.resume(rt.db, "link-local-1", "checked", discard=False)
    assert (change.blocks, change.keys) == (total, 1)
    assert _block_states(rt) == {"active": total}
    served = rt.service.get_keys_with_ids(_sae(rt, S), M, [pending[0].key_id])
    assert served[0].material == pending[0].material


def test_an_alarms_suspension_moves_blocks_in_bounded_batches_too(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alarm path suspended every block in the alarm's one transaction (issue 18 left it so
    after the operator's path was batched): it now moves them as the operator's does."""
    from kms.service import links

    filler = rt.make_filler()
    while filler.fill_once():
        pass
    total = sum(_block_states(rt).values())
    assert total >= 8
    monkeypatch.setattr(links, "BLOCK_BATCH", 3)
    writes = _count_writes(monkeypatch)
    alarm = LinkAlarm("link-local-1", "blk-9", "QBER 0.3", details={"code": "qber-over-threshold"})
    assert filler.handle_alarm(alarm)
    assert writes[0] >= 1 + total // 3
    assert _block_states(rt) == {"suspended": total}
    from kms.service.audit_queries import AuditService

    records = AuditService(rt.db, rt.identity, "KME-T").events(limit=1000)["records"]
    moved = [r for r in records if r["action"] == "link.blocks_moved"]
    assert len(moved) == 1 and moved[0]["actor"] == "adapter:link-local-1", moved
    assert {k: moved[0]["data"][k] for k in ("to", "blocks")} == {"to": "suspended", "blocks": total}


def test_a_suspend_interrupted_between_batches_serves_nothing_and_is_finished_by_running_it_again(
    rt: Runtime,
) -> None:
    from datetime import UTC, datetime

    from kms.service import links
    from kms.storage import link_repository
    from kms.storage.pool_repository import EventBatch

    filler = rt.make_filler()
    filler.fill_once()
    # As if the process died after the first transaction: the link is suspended, its blocks are not.
    events = EventBatch(datetime.now(UTC))
    with rt.db.write() as conn:
        link_repository.suspend_link_keys(conn, "link-local-1", "operator", "maintenance", events)
        events.flush(conn)
    assert "active" in _block_states(rt)
    with pytest.raises(ServiceUnavailable):  # nothing is cut from a suspended link's blocks
        rt.service.get_keys(_sae(rt, M), T)
    change = links.suspend(rt.db, "link-local-1", "finish")
    assert change.blocks > 0 and set(_block_states(rt)) == {"suspended"}
    with pytest.raises(links.LinkStateError, match="is not active"):
        links.suspend(rt.db, "link-local-1", "again")
