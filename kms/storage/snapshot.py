"""Consistent online snapshots of the store and putting one back (``qkms backup`` / ``qkms restore``).

SQLite: the online backup API copies the database page by page inside one read transaction, so the
copy is the database as of one commit even while the KME writes. PostgreSQL: ``pg_dump`` (custom
format) reads everything in one repeatable-read snapshot; ``pg_restore`` loads it into a *staging*
database, which replaces the live one only by a rename once it has been checked and fenced, so a
failed restore changes nothing. Passwords go to the tools in ``PGPASSWORD``, never on a command line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from kms.storage.database import _sqlite_file, sqlite_lock_path
from kms.storage.file_modes import PRIVATE_FILE_MODE

SQLITE_SIDE_FILES = ("-wal", "-shm")


class SnapshotError(RuntimeError):
    """A snapshot or restore step failed; the message is one line."""


def sqlite_path(url: str) -> Path:
    path = _sqlite_file(url)
    if path is None:
        raise SnapshotError("an in-memory SQLite database cannot be backed up or restored")
    return path


def sqlite_snapshot(url: str, dest: Path) -> None:
    """Copy the live SQLite database at ``url`` to ``dest`` (created 0600) as of one commit."""
    source = sqlite3.connect(f"file:{sqlite_path(url)}?mode=ro", uri=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    os.close(fd)
    target = sqlite3.connect(dest)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


def sqlite_install(staged: Path, url: str, keep_as: Path) -> None:
    """Put ``staged`` in place of the database at ``url``; the old file (and its WAL, folded in
    first) is kept as ``keep_as``. The KME must be stopped (the caller checked)."""
    live = sqlite_path(url)
    if live.exists():
        with contextlib.closing(sqlite3.connect(live)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        os.replace(live, keep_as)
    for suffix in SQLITE_SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            Path(f"{live}{suffix}").unlink()
    os.replace(staged, live)


def sqlite_in_use(url: str) -> bool:
    """Whether a KME process holds the pool filler's leader lock on this database file."""
    lock = sqlite_lock_path(url)
    if lock is None:
        return False
    leader = lock.with_suffix(".leader")
    if not leader.exists():
        return False
    fd = os.open(leader, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if it was taken
    return False


# -------------------------------------------------------------------------------- PostgreSQL


def _libpq(url: str, database: str | None = None) -> tuple[list[str], dict[str, str]]:
    """Connection arguments for the PostgreSQL tools, and the environment carrying the password."""
    parsed: URL = make_url(url)
    args = ["--host", parsed.host or "localhost", "--port", str(parsed.port or 5432)]
    if parsed.username:
        args += ["--username", parsed.username]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    args += ["--dbname", database or str(parsed.database)]
    return args, env


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SnapshotError(f"{name} not found on PATH (install the PostgreSQL client tools)")
    return found


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SnapshotError(f"{what} failed: {last}")


def pg_snapshot(url: str, dest: Path) -> None:
    """``pg_dump`` of the database at ``url`` (custom format, no owners or grants) to ``dest``."""
    args, env = _libpq(url)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    os.close(fd)
    _run([_tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges", "--file", str(dest), *args],
         env, "pg_dump")  # fmt: skip


def pg_staging_name(url: str) -> str:
    return f"{make_url(url).database}_restoring"


def pg_load_staging(url: str, dump: Path) -> str:
    """A fresh staging database next to the live one, loaded from ``dump``; returns its URL."""
    staging = pg_staging_name(url)
    _admin(url, f'DROP DATABASE IF EXISTS "{staging}"', f'CREATE DATABASE "{staging}"')
    args, env = _libpq(url, staging)
    _run([_tool("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
          *args, str(dump)], env, "pg_restore")  # fmt: skip
    return make_url(url).set(database=staging).render_as_string(hide_password=False)


def pg_drop_staging(url: str) -> None:
    _admin(url, f'DROP DATABASE IF EXISTS "{pg_staging_name(url)}"')


def pg_install(url: str, keep_as: str) -> bool:
    """Rename the live database (if any) to ``keep_as`` and the staging one to the live name; whether
    there was a live database to keep."""
    live = str(make_url(url).database)
    with _connect(url, "postgres") as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (live,)).fetchone()
    rename = [f'ALTER DATABASE "{live}" RENAME TO "{keep_as}"'] if exists else []
    _admin(url, *rename, f'ALTER DATABASE "{pg_staging_name(url)}" RENAME TO "{live}"')
    return bool(exists)


def pg_sessions(url: str) -> int:
    """Other sessions connected to the live database (a running KME holds some)."""
    with _connect(url, str(make_url(url).database)) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0


def _connect(url: str, database: str):  # type: ignore[no-untyped-def]
    import psycopg

    parsed = make_url(url)
    return psycopg.connect(
        host=parsed.host or "localhost",
        port=parsed.port or 5432,
        user=parsed.username,
        password=parsed.password,
        dbname=database,
        autocommit=True,
    )


def _admin(url: str, *statements: str) -> None:
    """Statements on the server's maintenance database (names come from the configuration only)."""
    for name in (pg_staging_name(url), str(make_url(url).database)):
        if not name.replace("_", "").isalnum():
            raise SnapshotError(f"database name {name!r} is not a plain identifier")
    with _connect(url, "postgres") as conn:
        for sql in statements:
            conn.execute(sql.encode())
