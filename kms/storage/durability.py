"""Refuse a PostgreSQL that may forget commits it acknowledged.

Every key a master receives was committed first; if the database later forgets that commit (a crash
of a server running with ``fsync``, ``synchronous_commit`` or ``full_page_writes`` off), the key's
bits are free again after recovery and are cut for other key_IDs — the same key served twice, the
worst failure a KMS can have (seen in the outage test: docs/OPERATIONS.md, "PostgreSQL must run with
synchronous_commit = on"). The settings are read through the KME's own connections, so per-database
and per-role overrides count. ``synchronous_commit = local`` (flushed locally, replica not awaited)
is accepted: it loses nothing on this server's crash.
"""

from __future__ import annotations

from kms.storage.database import Database

# setting -> the value that loses acknowledged commits in a crash
UNSAFE = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def durability_problems(db: Database) -> list[str]:
    """What makes this database forget acknowledged commits in a crash; empty when durable (SQLite:
    WAL commits survive a crash of the KME process; see docs/OPERATIONS.md on power loss)."""
    if db.is_sqlite:
        return []
    problems = []
    with db.read() as conn:
        for setting, unsafe in UNSAFE.items():
            value = str(conn.exec_driver_sql(f"SHOW {setting}").scalar())
            if value == unsafe:
                problems.append(
                    f"PostgreSQL runs with {setting} = {value}: a crash can forget commits it acknowledged,"
                    " and their keys would be served again; set it to on"
                )
    return problems
