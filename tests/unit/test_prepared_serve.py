"""Get key with key IDs when the keys change between the request's check and its transaction.

SQLite (``kms.service.get_keys_with_ids.GetKeysWithIds._prepare_serve``): the keys are read, checked
and decrypted before the write turn and consumed by one guarded UPDATE under it. Whatever changes in
between — another fetch, expiry, a link suspension — the guard notices and the ordinary path decides under the turn, so the
outcome is exactly what it would have been without the preparation: no key is served twice, and the
error is the same. PostgreSQL (row locks in the ordinary path) must give the same outcomes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import update

from kms.config import KmsSettings
from kms.domain.errors import InvalidRequest, NotEntitled
from kms.domain.saes import SaeInfo
from kms.provision.workdir import init_workdir
from kms.runtime.assembly import Runtime, build_runtime
from kms.service.group_commit import run_unit
from kms.storage import link_repository
from kms.storage import pool_repository as pool
from kms.storage.pool_repository import EventBatch
from kms.storage.schema import keys
from tests.conftest import database_url

M, S, T = "SAE-M", "SAE-S", "SAE-T"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def rt(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Runtime]:
    res = init_workdir(
        tmp_path / "kme",
        "KME-T",
        [M, S, T],
        link_source="random",
        database_url=database_url(request.param, request),
        # No redelivery window: these tests judge a second fetch by the same slave as refused
        # (tests/unit/test_redelivery.py covers the window, on the prepared path too).
        pool_overrides={"max_pool_bits": 1 << 20, "redelivery_seconds": 0},
    )
    runtime = build_runtime(KmsSettings.load(res.config_path))
    runtime.make_filler().fill_once()
    yield runtime
    runtime.close()


def _sae(rt: Runtime, sae_id: str) -> SaeInfo:
    info = rt.registry.get(sae_id)
    assert info is not None
    return info


def _prepared(rt: Runtime, unit: object) -> bool:
    """SQLite: whether the service handed back a prepared unit (PostgreSQL has no preparation)."""
    return not rt.db.is_sqlite or "_prepare_serve" in getattr(unit, "__qualname__", "")


def _states(rt: Runtime, key_ids: list[str]) -> dict[str, str]:
    with rt.db.read() as conn:
        return {k: r["state"] for k, r in pool.key_records(conn, key_ids).items()}


def test_a_prepared_fetch_serves_and_consumes_like_the_ordinary_one(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=8)
    ids = [k.key_id for k in issued]
    unit, normalised = rt.service.get_keys_with_ids_unit(_sae(rt, S), M, ids)
    assert normalised == ids
    assert _prepared(rt, unit)
    served = run_unit(rt.db, unit)
    assert [(k.key_id, k.material) for k in served] == [(k.key_id, k.material) for k in issued]
    assert set(_states(rt, ids).values()) == {"consumed"}
    with rt.db.read() as conn:
        assert all(r["material"] is None for r in pool.key_records(conn, ids).values())


def test_part_of_a_run_is_served_by_the_ordinary_unit(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=4)  # one run row
    ids = [k.key_id for k in issued]
    unit, _ = rt.service.get_keys_with_ids_unit(_sae(rt, S), M, ids[1:3])
    assert not rt.db.is_sqlite or not _prepared(rt, unit)  # a run is consumed whole, or split first
    assert [k.material for k in run_unit(rt.db, unit)] == [k.material for k in issued[1:3]]
    assert _states(rt, ids) == {
        ids[0]: "reserved",
        ids[1]: "consumed",
        ids[2]: "consumed",
        ids[3]: "reserved",
    }


def test_keys_fetched_in_between_are_not_served_twice(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=4)
    ids = [k.key_id for k in issued]
    first, _ = rt.service.get_keys_with_ids_unit(_sae(rt, S), M, ids)
    second, _ = rt.service.get_keys_with_ids_unit(_sae(rt, S), M, ids)
    assert _prepared(rt, first) and _prepared(rt, second)
    assert len(run_unit(rt.db, first)) == 4
    with pytest.raises(InvalidRequest) as err:
        run_unit(rt.db, second)
    assert {d["reason"] for d in err.value.details or []} == {"key is consumed"}


def test_a_partial_overlap_rolls_back_the_guarded_update(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=4)
    ids = [k.key_id for k in issued]
    prepared, _ = rt.service.get_keys_with_ids_unit(_sae(rt, S), M, ids)
    assert _prepared(rt, prepared)
    rt.service.get_keys_with_ids(_sae(rt, S), M, ids[:1])  # one of them goes in between
    with pytest.raises(InvalidRequest):
        run_unit(rt.db, prepared)
    # The other three were not consumed by the failed attempt and can still be fetched.
    assert _states(rt, ids[1:]) == dict.fromkeys(ids[1:], "reserved")
    again = rt.service.get_keys_with_ids(_sae(rt, S), M, ids[1:])
    assert [k.material for k in again] == [k.material for k in issued[1:]]


def test_a_key_that_expires_in_between_is_reported_expired(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=2)
    ids = [k.key_id for k in issued]
    prepared, _ = rt.service.get_keys_with_ids_unit(_sae(rt, S), M, ids)
    with rt.db.write() as conn:  # the two keys are one run row: both expire
        conn.execute(update(keys).where(keys.c.key_id == ids[0]).values(expires_at=datetime.now(UTC)))
    with pytest.raises(InvalidRequest) as err:
        run_unit(rt.db, prepared)
    assert [d["reason"] for d in err.value.details or []] == ["key expired before it was fetched"] * 2
    assert _states(rt, ids) == dict.fromkeys(ids, "reserved")


def test_a_link_suspended_in_between_stops_the_prepared_fetch(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=2)
    ids = [k.key_id for k in issued]
    prepared, _ = rt.service.get_keys_with_ids_unit(_sae(rt, S), M, ids)
    with rt.db.write() as conn:
        link_repository.suspend_link(conn, "link-local-1", "test", "alarm", EventBatch(datetime.now(UTC)))
    with pytest.raises(InvalidRequest) as err:
        run_unit(rt.db, prepared)
    assert {d["reason"] for d in err.value.details or []} == {"key is suspended"}


def test_requests_the_preparation_cannot_serve_take_the_ordinary_path(rt: Runtime) -> None:
    # Multicast keys, another slave's keys and unknown keys are judged under the write turn.
    multicast = rt.service.get_keys(_sae(rt, M), S, number=2, additional_slave_sae_ids=[T])
    ids = [k.key_id for k in multicast]
    if rt.db.is_sqlite:
        assert not _prepared(rt, rt.service.get_keys_with_ids_unit(_sae(rt, S), M, ids)[0])
    assert [k.material for k in rt.service.get_keys_with_ids(_sae(rt, S), M, ids)] == [
        k.material for k in multicast
    ]
    assert _states(rt, ids) == dict.fromkeys(ids, "reserved")  # T has not fetched them yet
    assert [k.material for k in rt.service.get_keys_with_ids(_sae(rt, T), M, ids)] == [
        k.material for k in multicast
    ]
    assert _states(rt, ids) == dict.fromkeys(ids, "consumed")
    for_s = rt.service.get_keys(_sae(rt, M), S, number=1)
    with pytest.raises(NotEntitled):
        rt.service.get_keys_with_ids(_sae(rt, T), M, [for_s[0].key_id])
    with pytest.raises(InvalidRequest):
        rt.service.get_keys_with_ids(_sae(rt, S), M, ["018f0000-0000-7000-8000-000000000000"])


def test_concurrent_fetches_of_the_same_keys_serve_them_once(rt: Runtime) -> None:
    issued = rt.service.get_keys(_sae(rt, M), S, number=16)
    ids = [k.key_id for k in issued]
    barrier = threading.Barrier(4)

    def fetch() -> list[bytes] | str:
        barrier.wait(timeout=30)
        try:
            return [k.material for k in rt.service.get_keys_with_ids(_sae(rt, S), M, ids)]
        except InvalidRequest as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=4) as ex:
        outcomes = list(ex.map(lambda _: fetch(), range(4)))
    served = [o for o in outcomes if isinstance(o, list)]
    assert served == [[k.material for k in issued]]
    assert len([o for o in outcomes if isinstance(o, str)]) == 3
