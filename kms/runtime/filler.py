"""The pool filler: pulls key blocks from each link's key source into the encrypted pool.

Adapter blocks are split into storage blocks of ``pool.storage_block_bits`` so that each cut only
decrypts and re-seals a few KiB. A link stops being pulled while its pool holds ``max_pool_bits``
(back-pressure, as a real device buffers or discards), counting blocks not yet confirmed by the
peer and blocks of a suspended link as held. Alarms are recorded as link events. The
filler is a background loop; what it stores and records is done by the ingest use case
(``kms.service.ingest``), and how blocks are split is a domain rule (``kms.domain.blocks``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import structlog

from kms.config import PoolSection
from kms.crypto.envelope import Envelope
from kms.domain.blocks import alarm_code as alarm_code
from kms.domain.blocks import piece_parity as piece_parity
from kms.domain.blocks import split_block as split_block
from kms.service.ingest import record_alarm, stored_bits_by_link
from kms.service.ingest import store_block as store_block
from kms.service.ingest import store_blocks as store_blocks
from kms.storage.database import Database
from kms.telemetry.metrics import instruments
from qkd_adapters.keyblock import KeyBlock, KeySource, LinkAlarm

log = structlog.get_logger(__name__)

IDLE_MAX_SECONDS = 1.0  # longest wait between two rounds that found nothing to store


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
        self._waiting: dict[str, list[KeyBlock | LinkAlarm]] = {}  # pulled, not yet room for
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fill_once(self, max_events: int = 16) -> int:
        """Pull what every source has ready, up to the pool limit. Returns the pieces stored.

        The limit is never passed (issue 18: "no link's stored material exceeds its limit"): a block
        that does not fit waits here, with the events after it, in pulling order, until the link
        has room; the source is not pulled meanwhile, so what waits is at most ``max_events``
        events per link (lost if the KME stops first: the peer's copy is then never confirmed and
        is destroyed after ``peering.unconfirmed_block_seconds``, D-25). A block larger than the
        whole limit is stored alone whenever the link is under its limit (``_fits``)."""
        stored = 0
        levels = stored_bits_by_link(self.db)
        for source, peer_kme_id in self.sources:
            level = levels.get(source.link_id, 0)
            if level >= self.cfg.max_pool_bits:
                continue
            events = self._waiting.pop(source.link_id, None) or source.pull(
                max_events=max_events, timeout=0.0
            )
            # Blocks are stored a run at a time (one transaction each run); an alarm is handled in
            # its place in the stream, so blocks after a suspending alarm are stored suspended.
            run: list[KeyBlock] = []
            for i, event in enumerate([*events, None]):
                if isinstance(event, KeyBlock):
                    if not self._fits(level, run, event):
                        stored += self._store_run(source.link_id, run, peer_kme_id)
                        self._waiting[source.link_id] = list(events[i:])
                        break
                    run.append(event)
                    continue
                if run:
                    stored += self._store_run(source.link_id, run, peer_kme_id)
                    level += sum(b.bit_length for b in run)
                    run = []
                    time.sleep(0)  # let request threads and the event loop have the GIL
                if isinstance(event, LinkAlarm):
                    self.handle_alarm(event)
        return stored

    def _store_run(self, link_id: str, run: list[KeyBlock], peer_kme_id: str) -> int:
        if not run:
            return 0
        stored = store_blocks(self.db, self.envelope, self.cfg, self.kme_id, run, peer_kme_id)
        if (counted := instruments()) is not None:
            counted.link_blocks.labels(link_id, "delivered", "").inc(len(run))
        return stored

    def _fits(self, level: int, run: list[KeyBlock], block: KeyBlock) -> bool:
        """Whether ``block`` may be stored after ``run``. A block larger than the whole limit can
        never fit: it is stored alone whenever the link is under its limit (waiting for an empty
        pool stalled the link for good, since the bits left over after cutting keys never reach
        zero), so the limit is passed by less than one block, and only with such a small limit."""
        limit = self.cfg.max_pool_bits
        if level + sum(b.bit_length for b in run) + block.bit_length <= limit:
            return True
        return block.bit_length > limit and not run and level < limit

    def handle_alarm(self, alarm: LinkAlarm) -> bool:
        """Record an alarm; suspend the link if its code calls for it. Returns True if suspended."""
        code = alarm_code(alarm)
        suspend = any(trigger in code for trigger in self.suspend_on)
        log.warning("link_alarm", link_id=alarm.link_id, block_id=alarm.block_id, code=code, suspend=suspend)
        record_alarm(self.db, alarm, code, suspend)
        if (counted := instruments()) is not None:
            kind = counted.alarm_kind(code)
            counted.link_alarms.labels(alarm.link_id, kind).inc()
            if alarm.block_id is not None:  # a block that produced no key
                counted.link_blocks.labels(alarm.link_id, "aborted", kind).inc()
        return suspend

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qkms-pool-filler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Fill, and after rounds that stored nothing wait twice as long each time, up to
        ``IDLE_MAX_SECONDS``: a KME whose pools are full summed its pool five times a second for
        nothing, the largest part of an idle trusted node's CPU (issue 18)."""
        idle = self.poll_seconds
        while not self._stop.is_set():
            try:
                if self.fill_once() == 0:
                    self._stop.wait(idle)
                    idle = min(2 * idle, max(self.poll_seconds, IDLE_MAX_SECONDS))
                else:
                    idle = self.poll_seconds
            except Exception as exc:  # keep filling after a transient failure
                log.error("pool_fill_failed", error=type(exc).__name__, detail=str(exc)[:200])
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        for source, _ in self.sources:
            source.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
