"""The pool filler: pulls key blocks from each link's key source into the encrypted pool.

Adapter blocks are split into storage blocks of ``pool.storage_block_bits`` so that each cut only
decrypts and re-seals a few KiB. A link stops being pulled while its pool holds ``max_pool_bits``
(back-pressure, as a real device buffers or discards). Alarms are recorded as link events.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import structlog

from kms.config import PoolSection
from kms.crypto.envelope import Envelope
from kms.domain.lifecycle import KeyState
from kms.storage import audit_repository as audit
from kms.storage import link_repository as links
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


def alarm_code(alarm: LinkAlarm) -> str:
    """The alarm's machine-readable code (``details["code"]``), or its reason text."""
    return str(alarm.details.get("code") or alarm.reason)


class PoolFiller:
    """One background thread per KME process that keeps every link's pool topped up.

    An alarm whose code is in ``suspend_on`` suspends the link: its blocks and the reserved keys cut
    from them stop being served, and new blocks are stored suspended until an operator resumes it.
    """

    def __init__(
        self,
        kme_id: str,
        db: Database,
        envelope: Envelope,
        pool_cfg: PoolSection,
        sources: Sequence[tuple[KeySource, str]],
        poll_seconds: float = 0.2,
        suspend_on: Sequence[str] = (),
    ) -> None:
        self.kme_id = kme_id
        self.db = db
        self.envelope = envelope
        self.cfg = pool_cfg
        self.sources = list(sources)
        self.poll_seconds = poll_seconds
        self.suspend_on = list(suspend_on)
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
                time.sleep(0)  # let request threads and the event loop have the GIL between blocks
        return stored

    def _store(self, event: KeyBlock | LinkAlarm, peer_kme_id: str) -> int:
        if isinstance(event, LinkAlarm):
            self.handle_alarm(event)
            return 0
        events = pool.EventBatch(datetime.now(UTC))
        actor = f"adapter:{event.link_id}"
        pieces = split_block(event, self.cfg.storage_block_bits, self.cfg.min_key_size)
        with self.db.write() as conn:
            suspended = links.link_state(conn, event.link_id) == "suspended"
            if suspended:
                state = KeyState.SUSPENDED
            else:
                state = KeyState.ACTIVE if peer_kme_id == self.kme_id else KeyState.PRE_ACTIVE
            n = pool.store_block_pieces(
                conn, self.envelope, event.link_id, pieces, event.provenance.to_json(), state, events, actor
            )
            events.flush(conn)
            prov = event.provenance
            record = {
                "block_id": event.block_id,
                "bits": event.bit_length,
                "storage_blocks": n,
                "state": state.value,
                "protocol": prov.protocol,
                "is_qkd": prov.is_qkd,
                "simulated": prov.simulated,
                "qber": prov.qber,
            }
            audit.append(conn, events.at, [(actor, "block.received", event.link_id, record)])
        log.debug(
            "block_stored", link_id=event.link_id, block_id=event.block_id, pieces=n, bits=event.bit_length
        )
        return n

    def handle_alarm(self, alarm: LinkAlarm) -> bool:
        """Record an alarm; suspend the link if its code calls for it. Returns True if suspended."""
        code = alarm_code(alarm)
        suspend = any(trigger in code for trigger in self.suspend_on)
        log.warning("link_alarm", link_id=alarm.link_id, block_id=alarm.block_id, code=code, suspend=suspend)
        events = pool.EventBatch(datetime.now(UTC))
        actor = f"adapter:{alarm.link_id}"
        with self.db.write() as conn:
            entries: list[tuple[str, str, str, dict[str, object]]] = [
                (
                    actor,
                    "link.alarm",
                    alarm.link_id,
                    {"block_id": alarm.block_id, "code": code, "reason": alarm.reason[:300]},
                )
            ]
            if suspend and links.link_state(conn, alarm.link_id) == "active":
                change = links.suspend_link(conn, alarm.link_id, actor, f"alarm: {code}", events)
                entries.append(
                    (
                        actor,
                        "link.suspended",
                        alarm.link_id,
                        {"code": code, "blocks": change.blocks, "keys": change.keys},
                    )
                )
            events.flush(conn)
            audit.append(conn, events.at, entries)
        return suspend

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
