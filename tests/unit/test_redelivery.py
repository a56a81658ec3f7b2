"""The redelivery window (issue 13, finding 7): a slave whose answer was lost gets the same keys again.

Through the delivery service on a real SQLite file and a real PostgreSQL server: a consumed key
keeps its sealed material for ``pool.redelivery_seconds``, during which the *same* slave SAE asking
for the same key_IDs gets identical bytes (audited ``keys.redelivered``); any other SAE gets today's
answers; after the window the sweep zeroises the material and a retry gets 400. Materials are
compared by hash and never printed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kms.config import KmsSettings
from kms.domain.delivery import DeliveredKey
from kms.domain.errors import InvalidRequest, NotEntitled
from kms.domain.saes import SaeInfo
from kms.provision.workdir import init_workdir
from kms.runtime.assembly import Runtime, build_runtime
from kms.storage import audit_repository as audit
from kms.storage import pool_repository as pool
from tests.conftest import database_url

M, S, T, U = "SAE-M", "SAE-S", "SAE-T", "SAE-U"
WINDOW = 60.0


def _runtime(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    backend: str,
    window: float,
    policy: dict[str, Any] | None = None,
) -> Runtime:
    res = init_workdir(
        tmp_path / "kme",
        "KME-T",
        [M, S, T, U],
        link_source="random",
        database_url=database_url(backend, request),
        pool_overrides={"max_pool_bits": 1 << 20, "redelivery_seconds": window},
        policy=policy,
    )
    runtime = build_runtime(KmsSettings.load(res.config_path))
    runtime.make_filler().fill_once()
    return runtime


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def rt(tmp_path: Path, request: pytest.FixtureRequest, backend: str) -> Iterator[Runtime]:
    runtime = _runtime(tmp_path, request, backend, WINDOW)
    yield runtime
    runtime.close()


def _sae(rt: Runtime, sae_id: str) -> SaeInfo:
    info = rt.registry.get(sae_id)
    assert info is not None
    return info


def _digests(keys: Sequence[DeliveredKey]) -> list[tuple[str, str]]:
    """Key_IDs and material hashes: what the tests compare (never the material itself)."""
    return [(k.key_id, hashlib.sha256(k.material).hexdigest()) for k in keys]


def _records(rt: Runtime, key_ids: list[str]) -> dict[str, dict[str, Any]]:
    with rt.db.read() as conn:
        return pool.key_records(conn, key_ids)


def _actions(rt: Runtime, action: str) -> list[dict[str, Any]]:
    with rt.db.read() as conn:
        return [
            {"actor": r.actor, "subject": r.subject, **r.data}
            for r in audit.read_records(conn)
            if r.action == action
        ]


def _sweep(rt: Runtime, now: datetime) -> None:
    with rt.db.write() as conn:
        pool.expire_reserved(conn, now, "test")


def _refused(rt: Runtime, sae: str, key_ids: list[str]) -> set[str]:
    with pytest.raises(InvalidRequest) as err:
        rt.service.get_keys_with_ids(_sae(rt, sae), M, key_ids)
    return {d.get("reason", "") for d in err.value.details or []}


def test_a_lost_answer_is_redelivered_identically_and_audited(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=4)  # one run row
    ids = [k.key_id for k in issued]
    first = rt.service.get_keys_with_ids(_sae(rt, S), M, ids)  # the answer the slave never got
    assert _digests(first) == _digests(issued)
    assert {r["state"] for r in _records(rt, ids).values()} == {"consumed"}

    again = rt.service.get_keys_with_ids(_sae(rt, S), M, ids)
    assert _digests(again) == _digests(issued)
    redelivered = _actions(rt, "keys.redelivered")
    assert redelivered == [{"actor": f"sae:{S}", "subject": f"{M}->{S}", "key_IDs": ids}]
    # A redelivery changes no key: still consumed, consumed once, in one keys.delivered record.
    assert {r["state"] for r in _records(rt, ids).values()} == {"consumed"}
    assert [d["consumed"] for d in _actions(rt, "keys.delivered")] == [ids]


def test_after_the_window_the_material_is_zeroised_and_a_retry_refused(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    rt = _runtime(tmp_path, request, backend, 1.0)
    try:
        issued = rt.service.get_keys(_sae(rt, M), S, number=3)
        ids = [k.key_id for k in issued]
        rt.service.get_keys_with_ids(_sae(rt, S), M, ids)
        assert all(r["material"] is not None for r in _records(rt, ids).values())  # held, sealed
        with rt.db.read() as conn:
            assert pool.consumed_material_overdue(conn, datetime.now(UTC)) == []

        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:  # let the 1 s window pass (bounded)
            time.sleep(0.25)
        # Past the window, not yet swept: the material is still there but no longer served.
        assert _refused(rt, S, ids) == {"key is consumed"}
        with rt.db.read() as conn:
            assert sorted(pool.consumed_material_overdue(conn, datetime.now(UTC))) == sorted(ids)

        _sweep(rt, datetime.now(UTC))
        assert all(r["material"] is None for r in _records(rt, ids).values())
        assert {r["state"] for r in _records(rt, ids).values()} == {"consumed"}
        with rt.db.read() as conn:
            assert pool.consumed_material_overdue(conn, datetime.now(UTC)) == []
        assert _refused(rt, S, ids) == {"key is consumed"}
        assert _actions(rt, "keys.redelivered") == []
    finally:
        rt.close()


def test_no_other_sae_ever_gets_a_redelivery(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=2)
    ids = [k.key_id for k in issued]
    rt.service.get_keys_with_ids(_sae(rt, S), M, ids)
    with pytest.raises(NotEntitled):
        rt.service.get_keys_with_ids(_sae(rt, T), M, ids)
    # Named with another master, the keys are unknown (as today), even to their own slave.
    with pytest.raises(InvalidRequest):
        rt.service.get_keys_with_ids(_sae(rt, S), T, ids)
    assert _actions(rt, "keys.redelivered") == []
    assert [d["key_IDs"] for d in _actions(rt, "access.denied")] == [ids]


def test_multicast_slaves_refetch_inside_the_window(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=2, additional_slave_sae_ids=[T])
    ids = [k.key_id for k in issued]
    assert _digests(rt.service.get_keys_with_ids(_sae(rt, S), M, ids)) == _digests(issued)
    # S served, T not yet: the key stays reserved, and S may fetch again.
    assert _digests(rt.service.get_keys_with_ids(_sae(rt, S), M, ids)) == _digests(issued)
    assert {r["state"] for r in _records(rt, ids).values()} == {"reserved"}
    assert _digests(rt.service.get_keys_with_ids(_sae(rt, T), M, ids)) == _digests(issued)
    assert {r["state"] for r in _records(rt, ids).values()} == {"consumed"}
    for slave in (S, T):
        assert _digests(rt.service.get_keys_with_ids(_sae(rt, slave), M, ids)) == _digests(issued)
    with pytest.raises(NotEntitled):
        rt.service.get_keys_with_ids(_sae(rt, U), M, ids)
    assert [(d["actor"], d["key_IDs"]) for d in _actions(rt, "keys.redelivered")] == [
        (f"sae:{S}", ids),
        (f"sae:{S}", ids),
        (f"sae:{T}", ids),
    ]


def test_parts_of_a_run_and_split_runs_are_redelivered(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=6)
    ids = [k.key_id for k in issued]
    rt.service.get_keys_with_ids(_sae(rt, S), M, ids[1:3])  # splits the run
    assert _digests(rt.service.get_keys_with_ids(_sae(rt, S), M, ids[2:0:-1])) == _digests(issued[2:0:-1])
    rt.service.get_keys_with_ids(_sae(rt, S), M, [ids[0], *ids[3:]])
    assert _digests(rt.service.get_keys_with_ids(_sae(rt, S), M, ids)) == _digests(issued)
    assert {r["state"] for r in _records(rt, ids).values()} == {"consumed"}

    whole = rt.service.get_keys(_sae(rt, M), S, number=5)  # a run consumed whole
    whole_ids = [k.key_id for k in whole]
    rt.service.get_keys_with_ids(_sae(rt, S), M, whole_ids)
    assert _digests(rt.service.get_keys_with_ids(_sae(rt, S), M, whole_ids[3:1:-1])) == _digests(
        whole[3:1:-1]
    )


def test_a_request_mixing_redeliverable_and_fresh_keys_gets_todays_answer(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=2)
    ids = [k.key_id for k in issued]
    rt.service.get_keys_with_ids(_sae(rt, S), M, ids[:1])
    assert _refused(rt, S, ids) == {"key is consumed"}
    assert _records(rt, ids[1:])[ids[1]]["state"] == "reserved"  # the fresh key was not served
    assert _actions(rt, "keys.redelivered") == []


def test_the_sweep_zeroises_only_keys_whose_window_passed(rt: Runtime) -> None:
    early = rt.service.get_keys(_sae(rt, M), S, number=2)
    rt.service.get_keys_with_ids(_sae(rt, S), M, [k.key_id for k in early])
    late = rt.service.get_keys(_sae(rt, M), S, number=1)
    rt.service.get_keys_with_ids(_sae(rt, S), M, [k.key_id for k in late])
    cut = _records(rt, [late[0].key_id])[late[0].key_id]["expires_at"]
    cut = cut if cut.tzinfo else cut.replace(tzinfo=UTC)
    _sweep(rt, cut - timedelta(microseconds=1))  # after the first window, before the second
    held = {k: r["material"] is not None for k, r in _records(rt, [k.key_id for k in early + late]).items()}
    assert held == {early[0].key_id: False, early[1].key_id: False, late[0].key_id: True}
    assert _digests(rt.service.get_keys_with_ids(_sae(rt, S), M, [late[0].key_id])) == _digests(late)
    assert _refused(rt, S, [early[0].key_id]) == {"key is consumed"}


def test_a_zero_window_zeroises_at_consumption_as_before(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    rt = _runtime(tmp_path, request, backend, 0)
    try:
        issued = rt.service.get_keys(_sae(rt, M), S, number=4)
        ids = [k.key_id for k in issued]
        rt.service.get_keys_with_ids(_sae(rt, S), M, ids)
        assert all(r["material"] is None for r in _records(rt, ids).values())
        assert _refused(rt, S, ids) == {"key is consumed"}
    finally:
        rt.close()


def test_hybrid_keys_are_redelivered_identically(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    rt = _runtime(tmp_path, request, backend, WINDOW, policy={"mode": "hybrid"})
    try:
        issued = rt.service.get_keys(_sae(rt, M), S, number=3)
        ids = [k.key_id for k in issued]
        assert {r["policy"] for r in _records(rt, ids).values()} == {"hybrid"}
        assert _digests(rt.service.get_keys_with_ids(_sae(rt, S), M, ids)) == _digests(issued)
        assert _digests(rt.service.get_keys_with_ids(_sae(rt, S), M, ids)) == _digests(issued)
    finally:
        rt.close()


def test_concurrent_retries_are_consumed_once_and_redelivered_identically(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=16)
    ids = [k.key_id for k in issued]
    barrier = threading.Barrier(4)

    def fetch() -> list[tuple[str, str]]:
        barrier.wait(timeout=30)
        return _digests(rt.service.get_keys_with_ids(_sae(rt, S), M, ids))

    with ThreadPoolExecutor(max_workers=4) as ex:
        outcomes = list(ex.map(lambda _: fetch(), range(4)))
    assert outcomes == [_digests(issued)] * 4
    assert [d["consumed"] for d in _actions(rt, "keys.delivered")] == [ids]
    assert len(_actions(rt, "keys.redelivered")) == 3
