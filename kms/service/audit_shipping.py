"""Audit to SIEM: the use case that moves audit records from the database to a sink, at least once.

The database is the source of truth. Each sink (``kms.siem``) has a shipped position (the newest
record it is known to have delivered) kept durably (``kms.storage.siem_positions``); the shipper
reads the records after what it has sent, in bounded batches, and moves the position only past what
the sink reports delivered. After a failure, or a restart of the KME, it sends again from the
position: nothing is lost, and the SIEM sees what was in doubt twice (same seq, same hash).

The lag (:func:`shipping_lag`) is read from the database head and the position files, so any
process of the KME reports the same figure (for ``/metrics``: docs/OPERATIONS.md, "Audit to SIEM").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from kms.config import KmsSettings
from kms.siem.sink import Sink
from kms.storage import audit_repository as audit
from kms.storage.database import Database
from kms.storage.siem_positions import PositionError, PositionStore, ShippedPosition

log = structlog.get_logger(__name__)


class AuditShipper:
    """One sink's shipping: :meth:`step` sends the next batch and records what was delivered; the
    caller (``kms.runtime.shipping``) calls :meth:`failed` on a ``SinkError`` and backs off."""

    def __init__(
        self, db: Database, sink: Sink, positions: PositionStore, batch_records: int, max_in_flight: int
    ) -> None:
        self.db = db
        self.sink = sink
        self.positions = positions
        self.batch_records = batch_records
        self.max_in_flight = max_in_flight
        self.shipped: ShippedPosition | None = None
        self._sent: int | None = None  # seq of the newest record sent; None: resume from the position

    def step(self) -> int:
        """Record newly delivered records, then send the next batch if the sink has room; returns the
        number of records sent (0: nothing new or the sink is full). Raises ``SinkError``."""
        if self._sent is None:
            self._sent = self._resume_point()
        self._record_delivered()
        if self.sink.in_flight() >= self.max_in_flight:
            return 0
        with self.db.read() as conn:
            records = audit.read_records(conn, since_seq=self._sent, limit=self.batch_records)
        if not records:
            return 0
        if records[0].seq != self._sent + 1:
            log.warning("siem_audit_gap", sink=self.sink.name, after_seq=self._sent, next_seq=records[0].seq)
        self.sink.send(records)
        self._sent = records[-1].seq
        self._record_delivered()
        return len(records)

    def failed(self) -> None:
        """Drop what is in flight; the next step sends again from the shipped position."""
        self.sink.reset()
        self._sent = None

    def pending(self) -> bool:
        """Whether records are sent but not yet known delivered."""
        return self.sink.in_flight() > 0

    def _record_delivered(self) -> None:
        done = self.sink.delivered()
        if done is not None and (self.shipped is None or done[0] > self.shipped.seq):
            self.shipped = self.positions.save(self.sink.name, done[0], done[1])

    def _resume_point(self) -> int:
        """The shipped position, checked against the database: a store restored to an earlier state
        holds fewer records (resume at its head; the SIEM sees later seqs again, with other hashes),
        and a different record at the position means an unknown earlier fork (resume from the start)."""
        position = self.positions.load(self.sink.name)
        self.shipped = position
        if position is None:
            return 0
        with self.db.read() as conn:
            record = audit.record_at(conn, position.seq)
            head, head_hash = audit.head(conn)
        if record is not None and record.hash == position.hash:
            return position.seq
        if record is None and head < position.seq:
            log.warning("siem_position_beyond_head", sink=self.sink.name, shipped=position.seq, head=head)
            self.shipped = self.positions.save(self.sink.name, head, head_hash)  # the next start agrees
            return head
        log.warning("siem_position_diverged", sink=self.sink.name, shipped=position.seq)
        return 0


@dataclass(frozen=True)
class ShippingLag:
    sink: str
    head_seq: int
    shipped_seq: int
    records_behind: int
    seconds_behind: float  # age of the oldest record not yet shipped (0 when none)


def sink_names(settings: KmsSettings) -> list[str]:
    """The sinks ``[siem]`` configures, by the names their positions are kept under."""
    names = []
    if settings.siem.file is not None:
        names.append("file")
    if settings.siem.syslog is not None:
        names.append("syslog")
    return names


def shipping_lag(db: Database, settings: KmsSettings) -> list[ShippingLag]:
    """Per configured sink: the audit head, the shipped seq, and how far and how long behind (an
    unreadable position file counts as nothing shipped)."""
    positions = PositionStore(settings.siem.state_dir, settings.kme.id)
    now = datetime.now(UTC)
    lags = []
    for name in sink_names(settings):
        try:
            position = positions.load(name)
        except PositionError:  # the shipper cannot resume this sink either (siem_sink_down): all waits
            position = None
        shipped = position.seq if position is not None else 0
        with db.read() as conn:
            head, _ = audit.head(conn)
            oldest = audit.record_at(conn, shipped + 1) if head > shipped else None
        behind = 0.0
        if oldest is not None:
            at = datetime.fromisoformat(oldest.at)
            at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
            behind = max(0.0, (now - at).total_seconds())
        lags.append(ShippingLag(name, head, shipped, max(0, head - shipped), behind))
    return lags
