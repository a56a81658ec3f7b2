"""Group commit for keys to an adjacent KME: concurrent requests share one ledger message.

Each request for a slave at an adjacent KME is queued; a sender thread per peer takes whatever is queued
(up to ``MAX_ENTRIES``), cuts every request's keys in one transaction, sends them as one ML-DSA-signed
ledger message, and settles them in one transaction when the peer's signed receipt (one result per
entry) comes back; ``IN_FLIGHT`` sender threads keep that many batches going at once. Signatures and
transactions are paid per batch, not per request, while every
request still gets its keys only after the peer has recorded them — or its own 503.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import structlog
from structlog.contextvars import bound_contextvars, get_contextvars

from kms.domain.delivery import DeliveredKey, KeyOrder

log = structlog.get_logger(__name__)
MAX_ENTRIES = 64
IN_FLIGHT = 1


@dataclass
class LedgerRequest:
    """A checked Get key request (``order``) for a slave at an adjacent KME, waiting for its batch."""

    order: KeyOrder
    future: Future[list[DeliveredKey]] = field(default_factory=Future)
    # The API request it serves (``kms.api.request_log``), for the batch's log lines; a batch that
    # serves one request alone carries its ID to the peer KME too (``kms.peer.client``).
    request_id: str | None = field(default_factory=lambda: _current_request_id())


def _current_request_id() -> str | None:
    value = get_contextvars().get("request_id")
    return None if value is None else str(value)


DeliverBatch = Callable[[str, list[LedgerRequest]], None]
"""Cut, record at the peer and settle a batch (``kms.peer.ledger_master.LedgerMaster.deliver_batch``)."""


class LedgerBatcher:
    def __init__(self, deliver: DeliverBatch, peer_id: str) -> None:
        self.deliver = deliver
        self.peer_id = peer_id
        self._queue: queue.Queue[LedgerRequest] = queue.Queue()
        # One batch in flight per peer: on a small machine larger batches beat overlap (fewer ML-DSA
        # signatures per key); raise IN_FLIGHT where cores are plenty and the peer link is slow.
        self._threads = [
            threading.Thread(target=self._run, name=f"qkms-ledger-{peer_id}-{i}", daemon=True)
            for i in range(IN_FLIGHT)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, request: LedgerRequest) -> list[DeliveredKey]:
        self._queue.put(request)
        return request.future.result()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_ENTRIES:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                with bound_contextvars(**_batch_context(batch)):
                    self.deliver(self.peer_id, batch)
            except Exception as exc:  # never leave a request waiting
                log.error(
                    "ledger_batch_failed", peer=self.peer_id, error=type(exc).__name__, detail=str(exc)[:200]
                )
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)


def _batch_context(batch: list[LedgerRequest]) -> dict[str, object]:
    """``request_id`` for a batch of one request, ``request_ids`` for several (none: background)."""
    ids = [r.request_id for r in batch if r.request_id is not None]
    if len(batch) == 1 and ids:
        return {"request_id": ids[0]}
    return {"request_ids": ids} if ids else {}
