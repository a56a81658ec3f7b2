"""Whether the database answers, known within a time limit (the console asks before each page).

A console page makes several blocking queries; against a hung PostgreSQL (connections accepted,
nothing answered) each would wait for ever, and a stopped one fails only query by query. A
``SELECT 1`` bounded by ``operator.health_timeout_seconds`` (:mod:`kms.service.single_flight`: one
probe in flight at most, so a hung database holds one thread, not one per request) lets the page
answer at once with the reason instead.
"""

from __future__ import annotations

from kms.service.single_flight import CallTimedOut, SingleFlight
from kms.storage import operator_queries
from kms.storage.database import Database


class DatabaseProbe:
    def __init__(self, db: Database, timeout: float) -> None:
        self.db = db
        self.timeout = timeout
        self._flight = SingleFlight("qkms-console-db", self._ping)

    def down(self) -> str | None:
        """None when the database answers in time; else why not, in words fit for an operator (the
        driver's own message may name hosts and users, so only the kind of failure is given)."""
        try:
            self._flight.run(self.timeout)
        except CallTimedOut:
            return f"the database did not answer within {self.timeout:g} s"
        except Exception as exc:
            return f"the database is unreachable ({type(exc).__name__})"
        return None

    def _ping(self) -> None:
        with self.db.read() as conn:
            operator_queries.ping(conn)
