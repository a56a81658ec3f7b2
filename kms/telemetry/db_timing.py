"""Times database transactions (``qkms_db_transaction_duration_seconds``) with SQLAlchemy engine
events, so that no repository or the hot path's raw SQL needs to know. PostgreSQL transactions
begin through SQLAlchemy (``begin``/``commit``/``rollback`` events); SQLite write transactions are
begun and ended by statement (``BEGIN IMMEDIATE`` ... ``COMMIT``), seen by the cursor events; its
read snapshots (``BEGIN`` ... ``ROLLBACK``) count as outcome ``read``."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, event

from kms.telemetry.metrics import Instruments

_STARTED = "qkms_tx_started"
_READ = "qkms_tx_read"


def time_transactions(engine: Engine, instruments: Instruments) -> None:
    """Observe every transaction of ``engine`` from its start to its end."""
    committed = instruments.db_seconds.labels("commit")
    rolled_back = instruments.db_seconds.labels("rollback")
    read = instruments.db_seconds.labels("read")

    def _end(conn: Any, child: Any) -> None:
        started = conn.info.pop(_STARTED, None)
        if started is not None:
            child.observe(time.perf_counter() - started)

    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "before_cursor_execute")
        def _statement(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            if statement.startswith("BEGIN"):
                conn.info[_STARTED] = time.perf_counter()
                conn.info[_READ] = statement == "BEGIN"
            elif statement == "COMMIT":
                _end(conn, committed)
            elif statement == "ROLLBACK":
                _end(conn, read if conn.info.get(_READ) else rolled_back)

        return

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.info[_STARTED] = time.perf_counter()

    @event.listens_for(engine, "commit")
    def _commit(conn: Any) -> None:
        _end(conn, committed)

    @event.listens_for(engine, "rollback")
    def _rollback(conn: Any) -> None:
        _end(conn, rolled_back)
