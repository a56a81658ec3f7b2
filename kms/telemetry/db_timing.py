"""Times database transactions (``qkms_db_transaction_duration_seconds``) from the pool: every unit
of work in this code base takes one connection for one transaction (``Database.write`` and
``Database.read``), so the time from checkout to checkin is the transaction's, waits for locks
included. Pool events fire twice per transaction; statement or connection events would be cheaper
to write but put every statement on SQLAlchemy's slow event path (measured: about 18 us per write
transaction on SQLite for an empty listener, three times what this costs), and the hot path's raw
SQL would escape them anyway. The observation itself is buffered (``kms.telemetry.buffered``):
about 0.2 us instead of prometheus-client's 6 us of multiprocess writes; the two pool events' dispatch
(about 5 us per transaction) remains."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, event

from kms.telemetry.metrics import Instruments

_STARTED = "qkms_checkout"


def time_transactions(engine: Engine, instruments: Instruments) -> None:
    """Observe how long each connection of ``engine`` is held, checkout to checkin."""
    held = instruments.db_seconds

    @event.listens_for(engine, "checkout")
    def _checkout(_dbapi: Any, record: Any, _proxy: Any) -> None:
        record.info[_STARTED] = time.perf_counter()

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi: Any, record: Any) -> None:
        started = record.info.pop(_STARTED, None)
        if started is not None:
            held.observe(time.perf_counter() - started)
