"""Engine creation and transactions that behave the same on SQLite and PostgreSQL.

SQLite: WAL journal, a busy timeout, and ``BEGIN IMMEDIATE`` for write transactions so that two
writers never both read and then both try to upgrade their lock (the classic SQLITE_BUSY deadlock).
Within one process, writes are also serialised by a lock so threads never spin on the busy handler.
PostgreSQL: READ COMMITTED with row locks (``FOR UPDATE SKIP LOCKED``) taken by the repositories.
"""

from __future__ import annotations

import contextlib
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
        self.engine = _make_engine(url, pool_size, self.is_sqlite, background_checkpoints)

    def checkpoint(self) -> None:
        """Copy the SQLite WAL into the database file without blocking writers (no-op on PostgreSQL)."""
        if self.is_sqlite:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: committed on success, rolled back on any exception."""
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self.engine.connect() as conn:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")

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
    elif parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
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
