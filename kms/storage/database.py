"""Engine creation and transactions that behave the same on SQLite and PostgreSQL.

SQLite: WAL journal, a busy timeout, and ``BEGIN IMMEDIATE`` for write transactions so that two
writers never both read and then both try to upgrade their lock (the classic SQLITE_BUSY deadlock).
Writes are also serialised by a lock — a thread lock within a process and, for a database file, an
``flock`` on ``<file>.lock`` across processes — so that writers queue in the kernel and wake as soon as
the lock is free instead of polling SQLite's busy handler (which sleeps in steps of up to 100 ms).
That is what lets several API processes (``qkms serve --workers N``) share one SQLite file.
A database file is created mode 0600 (its ``-wal`` and ``-shm`` inherit that mode), and its WAL is
kept bounded: cut back to ``WAL_KEEP_BYTES`` whenever SQLite restarts it, and truncated to zero by a
TRUNCATE checkpoint as soon as it passes the limit, when the server is idle and on a clean stop.
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

import structlog
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool

from kms.storage.file_modes import PRIVATE_DIR_MODE, create_private_file, tighten

log = structlog.get_logger(__name__)
MIB = 1024 * 1024
# A commit that leaves the WAL past this many bytes truncates it before giving the write turn back.
WAL_LIMIT_BYTES = 64 * MIB
# What SQLite keeps of a WAL file when it restarts it from the beginning (``journal_size_limit``).
WAL_KEEP_BYTES = 4 * MIB
# How long a TRUNCATE checkpoint waits for readers of older snapshots (it holds the write turn).
TRUNCATE_BUSY_MS = 1000
BUSY_TIMEOUT_MS = 30000


class Database:
    """One engine plus the transaction discipline for its dialect."""

    def __init__(
        self,
        url: str,
        pool_size: int = 10,
        background_checkpoints: bool = False,
        wal_limit_bytes: int = WAL_LIMIT_BYTES,
    ) -> None:
        """``background_checkpoints`` (SQLite): commits never checkpoint the WAL themselves — with its
        fsyncs that is most of a commit's cost — and the server calls :meth:`checkpoint` periodically.
        ``wal_limit_bytes`` (SQLite file): the WAL size past which a commit truncates the WAL."""
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self.lock_path = sqlite_lock_path(url)
        self._lock_fd: int | None = None
        self.wal_path = sqlite_wal_path(url)
        self.wal_limit_bytes = wal_limit_bytes
        # After a TRUNCATE that readers blocked, commits try again only past one more limit's worth.
        self._wal_trigger = wal_limit_bytes
        secure_sqlite_files(url)
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

    def checkpoint(self) -> int:
        """Copy the SQLite WAL into the database file without blocking writers (no-op on PostgreSQL).
        Returns the number of frames in the WAL (0 without one), which changes whenever anyone commits."""
        if not self.is_sqlite:
            return 0
        with self.engine.connect() as conn:
            row = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").first()
        return int(row[1]) if row is not None and row[1] > 0 else 0

    def wal_bytes(self) -> int:
        """Size of the SQLite WAL file (0 when absent, on PostgreSQL, or for an in-memory database)."""
        if self.wal_path is None:
            return 0
        try:
            return self.wal_path.stat().st_size
        except FileNotFoundError:
            return 0

    def truncate_wal(self, blocking: bool = True) -> bool:
        """Fold the whole WAL into the database file and truncate it to zero bytes. Takes the write
        turn so that no writer of ours competes; ``blocking=False`` gives up at once if a writer has
        it. True if the WAL is now empty (or there is none)."""
        if self.wal_path is None:
            return True
        if not self.acquire_turn(blocking=blocking):
            return False
        try:
            with self.engine.connect() as conn:
                return self._truncate_wal(conn)
        finally:
            self.release_turn()

    def _truncate_wal(self, conn: Connection) -> bool:
        """A TRUNCATE checkpoint on ``conn`` (the caller holds the write turn): it waits at most
        ``TRUNCATE_BUSY_MS`` for readers of older snapshots, since writers queue behind it."""
        conn.exec_driver_sql(f"PRAGMA busy_timeout={TRUNCATE_BUSY_MS}")
        try:
            row = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").first()
        finally:
            conn.exec_driver_sql(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        done = row is not None and row[0] == 0
        self._wal_trigger = self.wal_limit_bytes if done else self.wal_bytes() + self.wal_limit_bytes
        return done

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
                if self.wal_path is not None and self.wal_bytes() > self._wal_trigger:
                    self._truncate_wal_after_commit(conn)
        finally:
            if not turn_held:
                self.release_turn()

    def _truncate_wal_after_commit(self, conn: Connection) -> None:
        """The transaction is committed: a failed checkpoint must not look like a failed write."""
        try:
            self._truncate_wal(conn)
        except Exception as exc:
            self._wal_trigger = self.wal_bytes() + self.wal_limit_bytes
            log.error("wal_truncate_failed", error=type(exc).__name__)

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


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    if parsed.database.startswith("file:"):  # a URI filename: SQLite decides where it is
        return None
    return Path(parsed.database)


def sqlite_wal_path(url: str) -> Path | None:
    """``<database file>-wal`` for a SQLite file; None for PostgreSQL or an in-memory database."""
    path = _sqlite_file(url)
    return None if path is None else Path(f"{path}-wal")


def secure_sqlite_files(url: str) -> None:
    """Create a SQLite database file owner-only before SQLite does (SQLite would make it 0644 under
    the usual umask, and its ``-wal`` and ``-shm`` copy the database file's mode); tighten the files
    a previous version left readable by others. No-op for PostgreSQL and in-memory databases."""
    path = _sqlite_file(url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    create_private_file(path)
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        tighten(name)


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
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
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
