"""The pool filler: pulls key blocks from each link's key source into the encrypted pool.

Adapter blocks are split into storage blocks of ``pool.storage_block_bits`` so that each cut only
decrypts and re-seals a few KiB. A link stops being pulled while its pool holds ``max_pool_bits``
(back-pressure, as a real device buffers or discards). Alarms are recorded as link events.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from kms.config import PoolSection
from kms.crypto.envelope import Envelope
from kms.domain.lifecycle import KeyState
from kms.storage import pool_repository as pool
from kms.storage.database import Database
from qkd_adapters.keyblock import KeyBlock, KeySource, LinkAlarm

log = structlog.get_logger(__name__)


def split_block(block: KeyBlock, storage_bits: int, min_bits: int) -> list[pool.StoragePiece]:
    """Cut an adapter block into byte-aligned storage pieces; a tail shorter than ``min_bits`` is dropped."""
    usable_bytes = block.bit_length // 8
    step = storage_bits // 8
    pieces = []
    for start in range(0, usable_bytes, step):
        chunk = block.material[start : min(start + step, usable_bytes)]
        if len(chunk) * 8 >= min_bits:
            pieces.append(pool.StoragePiece(block.block_id, start * 8, chunk))
    return pieces


class PoolFiller:
    """One background thread per KME process that keeps every link's pool topped up."""

    def __init__(
        self,
        kme_id: str,
        db: Database,
        envelope: Envelope,
        pool_cfg: PoolSection,
        sources: Sequence[tuple[KeySource, str]],
        poll_seconds: float = 0.2,
    ) -> None:
        self.kme_id = kme_id
        self.db = db
        self.envelope = envelope
        self.cfg = pool_cfg
        self.sources = list(sources)
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fill_once(self, max_events: int = 16) -> int:
        """Pull what every source has ready, up to the pool limit. Returns the pieces stored."""
        stored = 0
        with self.db.read() as conn:
            levels = pool.stored_bits_by_link(conn)
        for source, peer_kme_id in self.sources:
            if levels.get(source.link_id, 0) >= self.cfg.max_pool_bits:
                continue
            for event in source.pull(max_events=max_events, timeout=0.0):
                stored += self._store(event, peer_kme_id)
        return stored

    def _store(self, event: KeyBlock | LinkAlarm, peer_kme_id: str) -> int:
        now = datetime.now(UTC)
        events = pool.EventBatch(now)
        actor = f"adapter:{event.link_id}"
        if isinstance(event, LinkAlarm):
            log.warning("link_alarm", link_id=event.link_id, block_id=event.block_id, reason=event.reason)
            events.add(
                "link", event.link_id, KeyState.ACTIVE, KeyState.ACTIVE, actor, f"alarm: {event.reason}"[:500]
            )
            with self.db.write() as conn:
                events.flush(conn)
            return 0
        pieces = split_block(event, self.cfg.storage_block_bits, self.cfg.min_key_size)
        with self.db.write() as conn:
            n = pool.store_block_pieces(
                conn,
                self.envelope,
                event.link_id,
                pieces,
                event.provenance.to_json(),
                activate=(peer_kme_id == self.kme_id),
                events=events,
                actor=actor,
            )
            events.flush(conn)
        log.debug(
            "block_stored", link_id=event.link_id, block_id=event.block_id, pieces=n, bits=event.bit_length
        )
        return n

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qkms-pool-filler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.fill_once() == 0:
                    self._stop.wait(self.poll_seconds)
            except Exception as exc:  # keep filling after a transient failure
                log.error("pool_fill_failed", error=type(exc).__name__, detail=str(exc)[:200])
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        for source, _ in self.sources:
            source.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
