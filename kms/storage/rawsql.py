"""Fixed SQL on the raw DB-API cursor, for the delivery hot path.

SQLAlchemy Core builds, caches and compiles statements in Python on every call; for the handful of
statements a key request runs, that costs several times the database work itself. Here the SQL is
written once (``?`` placeholders, rewritten to psycopg's binary ``%b`` — its text-format array
dumper runs a regex per element), executed on the cursor of the
connection the caller's transaction already holds, and timestamps are stored exactly as SQLAlchemy
stores them, so the rest of the code reads these rows through SQLAlchemy unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection


@functools.lru_cache(maxsize=256)
def _for_psycopg(sql: str) -> str:
    return sql.replace("?", "%b")


@functools.lru_cache(maxsize=256)
def _plan_per_call(sql: str) -> bool:
    """Statements over an array parameter are planned for each call (an unnamed statement): the
    generic plan of ``key_id = ANY($1)`` cannot see the array's length and may scan the table. Every
    other statement is prepared by psycopg after a few calls and reuses its cached plan — planning
    was a third of PostgreSQL's time per request."""
    return "ANY(" in sql


class Raw:
    """One cursor on the transaction's connection, dialect-aware."""

    def __init__(self, conn: Connection) -> None:
        self.pg = conn.dialect.name == "postgresql"
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        self.cur: Any = dbapi.cursor()

    def sql(self, text: str) -> str:
        return _for_psycopg(text) if self.pg else text

    def execute(self, text: str, params: Sequence[Any] = ()) -> Any:
        if self.pg:
            self.cur.execute(_for_psycopg(text), params, prepare=False if _plan_per_call(text) else None)
        else:
            self.cur.execute(text, params)
        return self.cur

    def executemany(self, text: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.cur.executemany(self.sql(text), rows)

    def one(self, text: str, params: Sequence[Any] = ()) -> Any:
        return self.execute(text, params).fetchone()

    def all(self, text: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(self.execute(text, params).fetchall())

    def in_list(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """``column IN (...)`` for SQLite, ``column = ANY(array)`` for PostgreSQL — the array sent as
        one comma-joined text when the values allow it (psycopg builds a list parameter element by
        element, ~2 us each: half a millisecond for a 128-key request; one string costs nothing)."""
        if not self.pg:
            return f"{column} IN ({','.join('?' * len(values))})", list(values)
        joined = joined_array(values)
        if joined is None:
            return f"{column} = ANY(?)", [list(values)]
        text, cast = joined
        return f"{column} = ANY(string_to_array(?, ','){cast})", [text]

    def for_update(self, of: str | None = None, skip_locked: bool = False) -> str:
        """Row-lock clause (PostgreSQL only; a SQLite write transaction is already exclusive)."""
        if not self.pg:
            return ""
        return " FOR UPDATE" + (f" OF {of}" if of else "") + (" SKIP LOCKED" if skip_locked else "")

    def ts(self, value: datetime) -> Any:
        """A timestamp as SQLAlchemy stores it: native on PostgreSQL, naive-UTC text on SQLite."""
        if self.pg:
            return value
        return value.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")

    def read_ts(self, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        return datetime.fromisoformat(value).replace(tzinfo=UTC)


def joined_array(values: Sequence[Any]) -> tuple[str, str] | None:
    """``values`` as one comma-joined text and the cast that turns ``string_to_array`` of it back
    into the array — for integers, or strings without commas; None for anything else."""
    if values and all(type(v) is int for v in values):
        return ",".join(map(str, values)), "::bigint[]"
    if values and all(type(v) is str and v and "," not in v for v in values):
        return ",".join(values), ""
    return None
