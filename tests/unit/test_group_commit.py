"""Group commit (kms.service.group_commit) on SQLite and a real PostgreSQL: every unit of a batch is
all-or-nothing, a failing unit takes nothing of its own with it and nothing of the others, and the
audit chain gets exactly the entries of the units that committed, in order."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, select, text

from kms.audit.chain import verify_chain
from kms.service.group_commit import AfterCommit, AuditEntry, Unit, execute_batch, run_unit
from kms.storage import audit_repository as audit
from kms.storage import migrate
from kms.storage import registry_repository as registry
from kms.storage.database import Database
from kms.storage.schema import links
from tests.conftest import database_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    url = database_url(request.param, request) or f"sqlite:///{tmp_path / 'gc.db'}"
    migrate.upgrade(url)
    return Database(url)


class Refused(Exception):
    pass


def _add_link(link_id: str, fail_after_write: bool = False) -> Unit[str]:
    """A unit that writes a row, then (optionally) fails — its write must not survive."""

    def unit(conn: Connection) -> tuple[str, list[AuditEntry]]:
        registry.upsert_link(conn, link_id, "KME-X", "test", {})
        if fail_after_write:
            raise Refused(link_id)
        return link_id, [("test", "link.added", link_id, {"n": link_id})]

    return unit


def _links(db: Database) -> set[str]:
    with db.read() as conn:
        return {r[0] for r in conn.execute(select(links.c.id))}


def _audited(db: Database) -> list[str]:
    with db.read() as conn:
        records = audit.read_records(conn)
    assert verify_chain(records, [], lambda *_: False).ok  # no checkpoints: hashes and links only
    return [r.subject for r in records if r.action == "link.added"]


def test_a_batch_commits_every_unit_and_audits_them_in_order(db: Database) -> None:
    outcomes = execute_batch(db, [_add_link(f"L{i}") for i in range(5)])
    assert [o.unwrap() for o in outcomes] == [f"L{i}" for i in range(5)]
    assert _links(db) == {f"L{i}" for i in range(5)}
    assert _audited(db) == [f"L{i}" for i in range(5)]


def test_a_failing_unit_is_rolled_back_alone_and_gets_its_own_error(db: Database) -> None:
    units = [_add_link("A"), _add_link("B", fail_after_write=True), _add_link("C"), _add_link("D")]
    outcomes = execute_batch(db, units)
    assert isinstance(outcomes[1].error, Refused)
    with pytest.raises(Refused):
        outcomes[1].unwrap()
    assert [outcomes[i].unwrap() for i in (0, 2, 3)] == ["A", "C", "D"]
    assert _links(db) == {"A", "C", "D"}
    assert _audited(db) == ["A", "C", "D"]


def test_several_failures_in_one_batch_each_roll_back_only_themselves(db: Database) -> None:
    units = [_add_link(f"L{i}", fail_after_write=i % 2 == 1) for i in range(6)]
    outcomes = execute_batch(db, units)
    assert [o.error is None for o in outcomes] == [True, False, True, False, True, False]
    assert _links(db) == {"L0", "L2", "L4"}
    assert _audited(db) == ["L0", "L2", "L4"]


def test_a_failed_commit_fails_every_unit_and_keeps_nothing(db: Database) -> None:
    # Both units succeed on their own; the batch's shared audit append then fails (one entry
    # cannot be encoded), so the transaction is not committed and no unit may report success.
    def fine(conn: Connection) -> tuple[str, list[AuditEntry]]:
        registry.upsert_link(conn, "OK", "KME-X", "test", {})
        return "ok", [("test", "link.added", "OK", {})]

    def bad_audit(conn: Connection) -> tuple[str, list[AuditEntry]]:
        registry.upsert_link(conn, "E", "KME-X", "test", {})
        data: dict[str, Any] = {"not-json": object()}  # the batch's audit append cannot encode this
        return "e", [("test", "link.added", "E", data)]

    outcomes = execute_batch(db, [fine, bad_audit])
    assert all(o.error is not None for o in outcomes)
    assert _links(db) == set()
    assert _audited(db) == []


def test_run_unit_returns_the_value_or_raises(db: Database) -> None:
    assert run_unit(db, _add_link("ONE")) == "ONE"
    with pytest.raises(Refused):
        run_unit(db, _add_link("TWO", fail_after_write=True))
    assert _links(db) == {"ONE"}


@pytest.mark.postgres
def test_two_batches_that_deadlock_are_both_committed(request: pytest.FixtureRequest) -> None:
    """Batch X locks A then B, batch Y locks B then A: PostgreSQL aborts one; it runs again."""
    url = database_url("postgres", request)
    assert url is not None
    migrate.upgrade(url)
    db = Database(url)
    run_unit(db, _add_link("A"))
    run_unit(db, _add_link("B"))
    both_hold_their_first_lock = threading.Barrier(2, timeout=20)
    first_attempt = {"X": True, "Y": True}
    runs: list[str] = []

    def lock(batch: str, link_id: str, meet: bool) -> Unit[str]:
        def unit(conn: Connection) -> tuple[str, list[AuditEntry]]:
            runs.append(f"{batch}:{link_id}")
            conn.execute(text("SELECT id FROM links WHERE id = :i FOR UPDATE"), {"i": link_id})
            if meet and first_attempt[batch]:
                first_attempt[batch] = False
                both_hold_their_first_lock.wait()
            return link_id, [("test", "link.locked", f"{batch}:{link_id}", {})]

        return unit

    outcomes: dict[str, list[Any]] = {}

    def batch(name: str, first: str, second: str) -> None:
        outcomes[name] = execute_batch(db, [lock(name, first, True), lock(name, second, False)])

    threads = [
        threading.Thread(target=batch, args=("X", "A", "B")),
        threading.Thread(target=batch, args=("Y", "B", "A")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [o.unwrap() for o in outcomes["X"]] == ["A", "B"]
    assert [o.unwrap() for o in outcomes["Y"]] == ["B", "A"]
    assert len(runs) > 4, "one batch should have been the deadlock victim and run again"
    with db.read() as conn:
        records = audit.read_records(conn)
    locked = sorted(r.subject for r in records if r.action == "link.locked")
    assert locked == ["X:A", "X:B", "Y:A", "Y:B"]


def test_an_after_commit_result_is_finished_once_the_batch_has_committed(db: Database) -> None:
    seen_committed: list[bool] = []

    def unit(conn: Connection) -> tuple[AfterCommit[str], list[AuditEntry]]:
        registry.upsert_link(conn, "L-after", "KME-X", "test", {})

        def finish() -> str:
            seen_committed.append("L-after" in _links(db))  # read through another connection
            return "finished"

        return AfterCommit(finish), [("test", "link.added", "L-after", {})]

    def failing_finish(conn: Connection) -> tuple[AfterCommit[str], list[AuditEntry]]:
        registry.upsert_link(conn, "L-kept", "KME-X", "test", {})

        def finish() -> str:
            raise Refused("derivation failed")

        return AfterCommit(finish), [("test", "link.added", "L-kept", {})]

    outcomes = execute_batch(db, [unit, failing_finish])
    assert seen_committed == []  # nothing is finished inside the transaction
    assert outcomes[0].unwrap() == "finished"
    assert seen_committed == [True]
    with pytest.raises(Refused):
        outcomes[1].unwrap()
    assert {"L-after", "L-kept"} <= _links(db)  # a failed finish does not undo the commit
    assert run_unit(db, unit) == "finished"
