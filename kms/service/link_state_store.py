"""The network's link-state records as every process of this KME sees them (DECISIONS.md D-26).

Whichever process a neighbour's flood reaches stores the records in the database (one transaction),
so that all processes (``--workers N``, several on one PostgreSQL) route on the same graph. Routing
runs per relayed request; it reads the table through a cache at most ``max_age`` seconds old, as
``LinkStock`` does for the pool. Nothing here is key material or an audited state change: a record
is a signed statement about links, which routing believes or not (``kms.peer.link_state``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime

from kms.service.peer_context import Received, remember
from kms.storage import link_state_repository as repo
from kms.storage.database import Database
from kms.storage.link_state_repository import StoredRecord

MAX_AGE_SECONDS = 0.5


class LinkStateStore:
    def __init__(self, db: Database, max_age: float = MAX_AGE_SECONDS) -> None:
        self.db = db
        self.max_age = max_age
        self._lock = threading.Lock()
        self._cached: tuple[float, list[StoredRecord]] | None = None

    def store(self, records: Sequence[StoredRecord], message: Received | None = None) -> list[bool]:
        """Keep each record newer than the one held for its origin; which ones were (to flood on).
        ``message``: the peer message that carried them, remembered against replay in the same
        transaction."""
        if not records and message is None:
            return []
        with self.db.write() as conn:
            if message is not None:
                remember(conn, message)
            newer = repo.store_newer(conn, records, datetime.now(UTC))
        if any(newer):
            with self._lock:
                self._cached = None
        return newer

    def records(self) -> list[StoredRecord]:
        """Every KME's newest record, at most ``max_age`` seconds old."""
        with self._lock:
            cached = self._cached
        if cached is not None and time.monotonic() - cached[0] < self.max_age:
            return cached[1]
        started = time.monotonic()
        with self.db.read() as conn:
            rows = repo.load_records(conn)
        with self._lock:
            self._cached = (started, rows)
        return rows

    def forget_issued_before(self, issued_before: float) -> int:
        with self.db.write() as conn:
            gone = repo.forget_issued_before(conn, issued_before)
        if gone:
            with self._lock:
                self._cached = None
        return gone
