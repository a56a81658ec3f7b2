"""Group commit: the write transactions of concurrent requests run as one database transaction
(docs/DECISIONS.md D-17). The one place where a group-committed use case's transaction is opened.

A request's database work is a *unit*: a function of the open connection that does its reads and
writes and returns its result with the audit entries it wants appended. Units that arrive together
share one BEGIN, one audit append (the chain head is locked once, not once per request) and one
COMMIT — on PostgreSQL that halves the round trips of a key request and removes the queue on the
audit head; on SQLite it turns many small commits into one.

Each request stays all-or-nothing: a unit that raises is rolled back with the whole transaction,
gets its own error, and the others are run again — each then under its own savepoint, so a batch
with a failing request costs at most one extra pass. A request's result is only handed back after
its batch has committed, so a key is never delivered whose reservation or audit record could still
be lost. A failed COMMIT fails every unit of the batch (nothing of it happened).

Units of one batch take row locks one after another, so two batches running at once can deadlock
where two single-request transactions would not (two slaves of a multicast key fetching the same
keys in different orders). PostgreSQL then aborts one transaction; its units are simply run again
(up to ``DEADLOCK_RETRIES`` times) instead of failing a request that did nothing wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection

from kms.service import audit_recorder
from kms.service.audit_recorder import AuditEntry as AuditEntry
from kms.storage.database import Database, savepoint

T = TypeVar("T")


class AfterCommit(Generic[T]):
    """A unit's result to be finished after its batch has committed (and, on SQLite, after the write
    turn is given back): work that needs no transaction — deriving hybrid keys, say — stays out of
    it. :meth:`Outcome.unwrap` runs ``finish``."""

    def __init__(self, finish: Callable[[], T]) -> None:
        self.finish = finish


Unit = Callable[[Connection], tuple[T | AfterCommit[T], list[AuditEntry]]]

DEADLOCK_RETRIES = 3
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock detected, serialization failure


def _retryable(exc: BaseException) -> bool:
    """A deadlock or serialization failure, raised by the driver or wrapped by SQLAlchemy."""
    driver_error = getattr(exc, "orig", None) or exc
    return getattr(driver_error, "sqlstate", None) in _RETRYABLE_SQLSTATES


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """What one unit of a batch came to: its result, or the exception it (or the commit) raised."""

    value: T | None = None
    error: BaseException | None = None

    def unwrap(self) -> T:
        """The unit's result (finished now if it was :class:`AfterCommit`), or its error raised."""
        if self.error is not None:
            raise self.error
        if isinstance(self.value, AfterCommit):
            return self.value.finish()  # type: ignore[no-any-return]
        return self.value  # type: ignore[return-value]


class _UnitFailed(Exception):
    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(index)
        self.index = index
        self.cause = cause


def execute_batch(db: Database, units: Sequence[Unit[Any]], turn_held: bool = False) -> list[Outcome[Any]]:
    """Run ``units`` in one write transaction (see the module docstring). Never raises for a unit.
    ``turn_held``: the caller holds SQLite's write turn (``Database.acquire_turn``)."""
    outcomes: list[Outcome[Any] | None] = [None] * len(units)
    remaining = list(range(len(units)))
    isolated = False  # units run under savepoints only once one of the batch has failed
    retries = 0
    while remaining:
        results: dict[int, Any] = {}
        failed: dict[int, BaseException] = {}
        try:
            with db.write(turn_held=turn_held) as conn:
                entries: list[AuditEntry] = []
                for index in remaining:
                    if isolated:
                        try:
                            with savepoint(conn, "qkms_unit"):
                                value, unit_entries = units[index](conn)
                        except Exception as exc:
                            if _retryable(exc) and retries < DEADLOCK_RETRIES:
                                raise _UnitFailed(index, exc) from exc
                            failed[index] = exc
                            continue
                    else:
                        try:
                            value, unit_entries = units[index](conn)
                        except Exception as exc:
                            raise _UnitFailed(index, exc) from exc
                    results[index] = value
                    entries.extend(unit_entries)
                audit_recorder.append(conn, entries)
        except _UnitFailed as failure:
            if _retryable(failure.cause) and retries < DEADLOCK_RETRIES:
                retries += 1  # the whole transaction was the victim: run every unit again
                continue
            outcomes[failure.index] = Outcome(error=failure.cause)
            remaining.remove(failure.index)
            isolated = True
            continue
        except Exception as exc:  # the audit append or the COMMIT: none of the batch happened
            if _retryable(exc) and retries < DEADLOCK_RETRIES:
                retries += 1
                continue
            for index in remaining:
                outcomes[index] = Outcome(error=failed.get(index, exc))
            break
        for index in remaining:
            outcomes[index] = Outcome(error=failed[index]) if index in failed else Outcome(results[index])
        break
    settled = [o for o in outcomes if o is not None]
    assert len(settled) == len(units)  # every unit got a result or an error above
    return settled


def run_unit(db: Database, unit: Unit[T]) -> T:
    """One unit in its own transaction (callers without a batcher: CLI, peers, tests)."""
    result: T = execute_batch(db, [unit])[0].unwrap()
    return result
