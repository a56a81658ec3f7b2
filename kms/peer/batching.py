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
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from kms.domain.delivery import DeliveredKey
from kms.domain.policy import POLICY_FALLBACK, PairPolicy
from kms.domain.saes import SaeInfo

if TYPE_CHECKING:
    from kms.peer.network import PeerNetwork

log = structlog.get_logger(__name__)
MAX_ENTRIES = 64
IN_FLIGHT = 1


@dataclass
class KeyRequest:
    master: SaeInfo
    slave: SaeInfo
    recipients: list[str]
    number: int
    size: int
    policy: PairPolicy
    future: Future[list[DeliveredKey]] = field(default_factory=Future)
    fallback: bool = False  # set when the link was short and the pair's policy allows PQC fallback

    @property
    def policy_name(self) -> str:
        return POLICY_FALLBACK if self.fallback else self.policy.mode.value


class LedgerBatcher:
    def __init__(self, network: PeerNetwork, peer_id: str) -> None:
        self.network = network
        self.peer_id = peer_id
        self._queue: queue.Queue[KeyRequest] = queue.Queue()
        # One batch in flight per peer: on a small machine larger batches beat overlap (fewer ML-DSA
        # signatures per key); raise IN_FLIGHT where cores are plenty and the peer link is slow.
        self._threads = [
            threading.Thread(target=self._run, name=f"qkms-ledger-{peer_id}-{i}", daemon=True)
            for i in range(IN_FLIGHT)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, request: KeyRequest) -> list[DeliveredKey]:
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
                self.network.deliver_batch(self.peer_id, batch)
            except Exception as exc:  # never leave a request waiting
                log.error(
                    "ledger_batch_failed", peer=self.peer_id, error=type(exc).__name__, detail=str(exc)[:200]
                )
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
