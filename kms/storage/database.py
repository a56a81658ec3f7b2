"""Engine creation and transactions that behave the same on SQLite and PostgreSQL.

SQLite: WAL journal, a busy timeout, and ``BEGIN IMMEDIATE`` for write transactions so that two
writers never both read and then both try to upgrade their lock (the classic SQLITE_BUSY deadlock).
Writes are also serialised by a lock — a thread lock within a process and, for a database file, an
``flock`` on ``<file>.lock`` across processes — so that writers queue in the kernel and wake as soon as
the lock is free instead of polling SQLite's busy handler (which sleeps in steps of up to 100 ms).
That is what lets several API processes (``qkms serve --workers N``) share one SQLite file.
PostgreSQL: READ COMMITTED with row locks (``FOR UPDATE SKIP LOCKED``) taken by the repositories.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool


class Database:
    """One engine plus the transaction discipline for its dialect."""

    def __init__(self, url: str, pool_size: int = 10, background_checkpoints: bool = False) -> None:
        """``background_checkpoints`` (SQLite): commits never checkpoint the WAL themselves — with its
        fsyncs that is most of a commit's cost — and the server calls :meth:`checkpoint` periodically."""
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self.lock_path = sqlite_lock_path(url)
        self._lock_fd: int | None = None
        self.engine = _make_engine(url, pool_size, self.is_sqlite, background_checkpoints)

    def acquire_turn(self, blocking: bool = True) -> bool:
        """SQLite: take this process's write turn — the thread lock, then the file lock that other
        processes share. The turn may be released from another thread (:meth:`release_turn`), so a
        helper thread can wait for it while the event loop goes on. PostgreSQL has no write turn
        (writers take row locks): always granted."""
        if self._write_lock is None:
            return True
        if not self._write_lock.acquire(blocking=blocking):
            return False
        if self.lock_path is None:
            return True
        try:
            if self._lock_fd is None:
                self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            # Blocking, this waits in the kernel without the GIL.
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._write_lock.release()
            return False
        except BaseException:
            self._write_lock.release()
            raise
        return True

    def release_turn(self) -> None:
        if self._write_lock is None:
            return
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._write_lock.release()

    def checkpoint(self) -> None:
        """Copy the SQLite WAL into the database file without blocking writers (no-op on PostgreSQL)."""
        if self.is_sqlite:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    @contextlib.contextmanager
    def write(self, turn_held: bool = False) -> Iterator[Connection]:
        """A write transaction: committed on success, rolled back on any exception. ``turn_held``
        (SQLite): the caller already holds the write turn (:meth:`acquire_turn`)."""
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        if not turn_held:
            self.acquire_turn()
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.exec_driver_sql("ROLLBACK")
                    raise
                conn.exec_driver_sql("COMMIT")
        finally:
            if not turn_held:
                self.release_turn()

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read-only transaction (a consistent snapshot for status queries)."""
        with self.engine.connect() as conn:
            if self.is_sqlite:
                conn.exec_driver_sql("BEGIN")
                try:
                    yield conn
                finally:
                    conn.exec_driver_sql("ROLLBACK")
            else:
                with conn.begin():
                    yield conn

    def dispose(self) -> None:
        self.engine.dispose()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def sqlite_lock_path(url: str) -> Path | None:
    """``<database file>.lock`` for a SQLite file; None for PostgreSQL or an in-memory database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(f"{parsed.database}.lock")


def _make_engine(url: str, pool_size: int, is_sqlite: bool, background_checkpoints: bool) -> Engine:
    if not is_sqlite:
        # No pre-ping: it costs a round trip per checkout; a dropped connection fails that request
        # (503) and the pool replaces it. Plans: psycopg prepares a statement after a few calls and
        # PostgreSQL reuses its plan; statements over arrays are planned per call (``rawsql``).
        return create_engine(url, pool_size=pool_size, max_overflow=pool_size)
    parsed = make_url(url)
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    if parsed.database in (None, "", ":memory:"):
        kwargs["poolclass"] = StaticPool
    else:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["pool_use_lifo"] = True
    engine = create_engine(url, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so BEGIN IMMEDIATE means what it says.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        if background_checkpoints:
            cur.execute("PRAGMA wal_autocheckpoint=0")
        cur.close()

    return engine


@contextlib.contextmanager
def savepoint(conn: Connection, name: str = "qkms_sp") -> Iterator[None]:
    """A savepoint inside the current write transaction: rolled back to if the block raises."""
    conn.exec_driver_sql(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        conn.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {name}")
        conn.exec_driver_sql(f"RELEASE SAVEPOINT {name}")
        raise
    conn.exec_driver_sql(f"RELEASE SAVEPOINT {name}")
