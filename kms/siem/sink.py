"""The interface between the shipper (``kms.service.audit_shipping``) and a destination.

A sink is handed batches of records in sequence order and says which of them it knows to be
delivered. Only a delivered record moves the shipped position kept on disk; after any
:class:`SinkError` the shipper drops the sink's connection and sends again from that position, so a
destination that fails loses nothing (at least once; the SIEM sees duplicates as repeated seqs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kms.domain.audit_chain import AuditRecord


class SinkError(RuntimeError):
    """The destination did not take the records (or may not have); a one-line reason, no content."""


class Sink(Protocol):
    name: str

    def send(self, records: Sequence[AuditRecord]) -> None:
        """Send ``records`` (contiguous, after everything sent before); raise :class:`SinkError`."""
        ...

    def delivered(self) -> tuple[int, str] | None:
        """(seq, hash) of the newest record now known to be delivered, if any became so since the
        last call; raise :class:`SinkError` if the destination was lost."""
        ...

    def in_flight(self) -> int:
        """Batches sent whose delivery is not known yet."""
        ...

    def reset(self) -> None:
        """Forget what is in flight and drop the connection (the next send starts afresh)."""
        ...
