"""SQLite's write turn (``Database.acquire_turn``) and group commit on the event loop
(``UnitBatcher(inline=True)``): writers of several processes take turns on one file, a process
waiting for the turn keeps its event loop running, and the units pending when the turn comes are
committed together."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Connection, select

from kms.service.batcher import UnitBatcher
from kms.service.group_commit import AuditEntry, Unit
from kms.storage import migrate
from kms.storage import registry_repository as registry
from kms.storage.database import Database, sqlite_lock_path
from kms.storage.schema import links

# A second process that tries to take the write turn without waiting and prints whether it could.
_OTHER_PROCESS = """
import sys
from kms.storage.database import Database
db = Database(sys.argv[1])
got = db.acquire_turn(blocking=False)
print("got" if got else "busy")
if got:
    db.release_turn()
"""


@pytest.fixture
def db(tmp_path: Path) -> Database:
    url = f"sqlite:///{tmp_path / 'turn.db'}"
    migrate.upgrade(url)
    return Database(url)


def _other_process_gets_turn(url: str) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, url], capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    assert out in ("got", "busy"), out
    return out == "got"


def test_the_write_turn_excludes_other_processes_until_released(db: Database) -> None:
    assert db.lock_path == sqlite_lock_path(db.url)
    assert _other_process_gets_turn(db.url)
    assert db.acquire_turn()
    try:
        assert not _other_process_gets_turn(db.url)
        assert not db.acquire_turn(blocking=False)  # nor another thread of this process
    finally:
        db.release_turn()
    assert _other_process_gets_turn(db.url)


def test_a_write_transaction_holds_the_turn_and_gives_it_back_on_error(db: Database) -> None:
    with db.write() as conn:
        registry.upsert_link(conn, "L1", "KME-X", "test", {})
        assert not _other_process_gets_turn(db.url)
    with pytest.raises(RuntimeError), db.write() as conn:
        registry.upsert_link(conn, "L2", "KME-X", "test", {})
        raise RuntimeError("rolled back")
    assert _other_process_gets_turn(db.url)
    with db.read() as conn:
        assert {r[0] for r in conn.execute(select(links.c.id))} == {"L1"}


def test_an_in_memory_database_has_no_lock_file() -> None:
    assert sqlite_lock_path("sqlite://") is None
    assert sqlite_lock_path("sqlite:///:memory:") is None
    assert sqlite_lock_path("postgresql+psycopg://u@127.0.0.1/x") is None


def _add_link(link_id: str, seen: list[str]) -> Unit[str]:
    def unit(conn: Connection) -> tuple[str, list[AuditEntry]]:
        seen.append(link_id)
        registry.upsert_link(conn, link_id, "KME-X", "test", {})
        return link_id, [("test", "link.added", link_id, {})]

    return unit


def test_units_wait_for_the_turn_without_blocking_the_loop_then_commit_together(db: Database) -> None:
    """Another thread holds the turn (as another process would): the loop keeps running while the
    units wait, and all of them run in the one transaction that starts when the turn is free."""
    batcher = UnitBatcher(db, inline=True, max_batch=64)
    transactions: list[int] = []
    seen: list[str] = []
    original_write = db.write

    def counting_write(turn_held: bool = False):  # type: ignore[no-untyped-def]
        transactions.append(1)
        return original_write(turn_held=turn_held)

    db.write = counting_write  # type: ignore[method-assign]
    assert db.acquire_turn()
    released = threading.Event()

    def release_later() -> None:
        time.sleep(0.5)
        released.set()
        db.release_turn()

    async def scenario() -> tuple[list[str], int]:
        tasks = [asyncio.create_task(batcher.run(_add_link(f"L{i}", seen))) for i in range(10)]
        ticks = 0
        threading.Thread(target=release_later, daemon=True).start()
        while not released.is_set():  # the loop is free while the units wait
            await asyncio.sleep(0.01)
            ticks += 1
        return list(await asyncio.gather(*tasks)), ticks

    results, ticks = asyncio.run(scenario())
    assert results == [f"L{i}" for i in range(10)]
    assert ticks >= 10
    assert sorted(seen) == sorted(results)
    assert len(transactions) == 1, "the units that waited together should commit together"
    with db.read() as conn:
        assert {r[0] for r in conn.execute(select(links.c.id))} == set(results)
    assert _other_process_gets_turn(db.url)  # and the turn was given back
