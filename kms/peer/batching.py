"""Group commit for keys to an adjacent KME: concurrent requests share one ledger message.

Each request for a slave at an adjacent KME is queued; a collector thread per peer takes whatever is
queued (up to ``MAX_ENTRIES``) as one batch, which a sender thread cuts in one transaction, sends as
one ML-DSA-signed ledger message, and settles in one transaction when the peer's signed receipt (one
result per entry) comes back. Signatures and transactions are paid per batch, not per request, while
every request still gets its keys only after the peer has recorded them — or its own 503.

Pacing (DECISIONS.md D-20): with one batch out at a time, a request that arrives just after a batch
was collected waits for that batch's whole cycle (cut, sign, the peer's answer, settle) before its
own even starts. With ``IN_FLIGHT`` = 2 the next batch is collected while one is out — not at once,
which would only make batches small (more signatures per key), but when its cut and signature would
end just as the peer's answer to the one out is due (``Pacer``, from moving averages of both). The
peer then gets the next batch as it answers the last, and the cut and settle of this KME overlap the
peer's work instead of adding to it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import structlog
from structlog.contextvars import bound_contextvars, get_contextvars

from kms.domain.delivery import DeliveredKey, KeyOrder

log = structlog.get_logger(__name__)
MAX_ENTRIES = 64
IN_FLIGHT = 2
SMOOTHING = 0.2  # weight of the newest batch in the moving averages


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


class Pacer:
    """When the next batch should be collected while others are out (see the module docstring).

    A batch reports when it was sent (its cut and signature done) and when the peer answered. The
    next collection is due at ``last sent + peer's answer time - own preparation time`` (moving
    averages); with no batch out, or before any answer was timed, it is due at once."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._prepare = 0.0  # seconds from collection to sending
        self._answer = 0.0  # seconds from sending to the peer's answer
        self._out: dict[int, float | None] = {}  # batches out: their send time (None: preparing)
        self._next = 0

    def collected(self) -> tuple[int, float]:
        with self._changed:
            ticket, self._next = self._next, self._next + 1
            self._out[ticket] = None
            return ticket, time.monotonic()

    def sent(self, ticket: int, collected_at: float) -> float:
        now = time.monotonic()
        with self._changed:
            self._prepare = _average(self._prepare, now - collected_at)
            self._out[ticket] = now
            self._changed.notify_all()
        return now

    def finished(self, ticket: int, sent_at: float | None) -> None:
        with self._changed:
            if sent_at is not None:
                self._answer = _average(self._answer, time.monotonic() - sent_at)
            self._out.pop(ticket, None)
            self._changed.notify_all()

    def wait_until_due(self) -> None:
        """Block until the next collection is due; returns at once when nothing is out."""
        with self._changed:
            while self._out:
                sent = [t for t in self._out.values() if t is not None]
                if len(sent) < len(self._out):  # one is still being cut: wait for it to go out
                    self._changed.wait()
                    continue
                if not self._answer:
                    return
                remaining = max(sent) + self._answer - self._prepare - time.monotonic()
                if remaining <= 0:
                    return
                self._changed.wait(remaining)


def _average(old: float, new: float) -> float:
    return new if not old else old + SMOOTHING * (new - old)


class BatchTiming:
    """What ``deliver`` tells the pacer of one batch: when it went out (``sent``)."""

    def __init__(self, pacer: Pacer, ticket: int, collected_at: float) -> None:
        self._pacer = pacer
        self._ticket = ticket
        self._collected_at = collected_at
        self.sent_at: float | None = None

    def sent(self) -> None:
        self.sent_at = self._pacer.sent(self._ticket, self._collected_at)

    def finished(self) -> None:
        self._pacer.finished(self._ticket, self.sent_at)


DeliverBatch = Callable[[str, list[LedgerRequest], Callable[[], None]], None]
"""Cut, record at the peer and settle a batch; calls the third argument just before sending
(``kms.peer.ledger_master.LedgerMaster.deliver_batch``)."""


class LedgerBatcher:
    def __init__(self, deliver: DeliverBatch, peer_id: str) -> None:
        self.deliver = deliver
        self.peer_id = peer_id
        self._queue: queue.Queue[LedgerRequest] = queue.Queue()
        self._batches: queue.Queue[tuple[list[LedgerRequest], BatchTiming]] = queue.Queue()
        self._slots = threading.Semaphore(IN_FLIGHT)
        self._pacer = Pacer()
        threads = [threading.Thread(target=self._collect, name=f"qkms-ledger-{peer_id}", daemon=True)]
        threads += [
            threading.Thread(target=self._send, name=f"qkms-ledger-{peer_id}-{i}", daemon=True)
            for i in range(IN_FLIGHT)
        ]
        for thread in threads:
            thread.start()

    def submit(self, request: LedgerRequest) -> list[DeliveredKey]:
        self._queue.put(request)
        return request.future.result()

    def _collect(self) -> None:
        while True:
            first = self._queue.get()
            self._slots.acquire()
            self._pacer.wait_until_due()  # everything that arrives meanwhile joins this batch
            batch = [first]
            while len(batch) < MAX_ENTRIES:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._batches.put((batch, BatchTiming(self._pacer, *self._pacer.collected())))

    def _send(self) -> None:
        while True:
            batch, timing = self._batches.get()
            try:
                with bound_contextvars(**_batch_context(batch)):
                    self.deliver(self.peer_id, batch, timing.sent)
            except Exception as exc:  # never leave a request waiting
                log.error(
                    "ledger_batch_failed", peer=self.peer_id, error=type(exc).__name__, detail=str(exc)[:200]
                )
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
            finally:
                timing.finished()
                self._slots.release()


def _batch_context(batch: list[LedgerRequest]) -> dict[str, object]:
    """``request_id`` for a batch of one request, ``request_ids`` for several (none: background)."""
    ids = [r.request_id for r in batch if r.request_id is not None]
    if len(batch) == 1 and ids:
        return {"request_id": ids[0]}
    return {"request_ids": ids} if ids else {}
