"""The pool filler: pulls key blocks from each link's key source into the encrypted pool.

Adapter blocks are split into storage blocks of ``pool.storage_block_bits`` so that each cut only
decrypts and re-seals a few KiB. A link stops being pulled while its pool holds ``max_pool_bits``
(back-pressure, as a real device buffers or discards). Alarms are recorded as link events.
"""

from __future__ import annotations

import hashlib
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


def split_block(
    block: KeyBlock,
    storage_bits: int,
    min_bits: int,
    kme_id: str | None = None,
    peer_kme_id: str | None = None,
) -> list[pool.StoragePiece]:
    """Cut an adapter block into byte-aligned storage pieces; a tail shorter than ``min_bits`` is dropped.

    For a block shared with another KME, pieces are shared out between the two ends so that each cuts
    keys from its own pieces only and no bit can be reserved by both: a piece belongs to one of the two
    KME IDs (sorted) by the parity of a hash of its block ID and offset — balanced over many pieces,
    even when every block is a single piece. Both ends split identically (same
    ``storage_block_bits``, checked when they confirm blocks), so they agree on every piece's owner.
    """
    usable_bytes = block.bit_length // 8
    step = storage_bits // 8
    shared = kme_id is not None and peer_kme_id is not None and peer_kme_id != kme_id
    pieces = []
    for start in range(0, usable_bytes, step):
        chunk = block.material[start : min(start + step, usable_bytes)]
        if len(chunk) * 8 >= min_bits:
            owner = None
            if shared:
                assert kme_id is not None and peer_kme_id is not None
                cutter = sorted((kme_id, peer_kme_id))[piece_parity(block.block_id, start * 8)]
                owner = None if cutter == kme_id else peer_kme_id
            pieces.append(pool.StoragePiece(block.block_id, start * 8, chunk, owner))
    return pieces


def piece_parity(block_id: str, offset_bits: int) -> int:
    """0 or 1: which of two KMEs (IDs sorted) cuts the piece of ``block_id`` at ``offset_bits``."""
    return hashlib.sha256(f"qkms/piece-owner/{block_id}/{offset_bits}".encode()).digest()[0] & 1


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
            # Blocks are stored a run at a time (one transaction each run); an alarm is handled in
            # its place in the stream, so blocks after a suspending alarm are stored suspended.
            run: list[KeyBlock] = []
            for event in [*source.pull(max_events=max_events, timeout=0.0), None]:
                if isinstance(event, KeyBlock):
                    run.append(event)
                    continue
                if run:
                    stored += store_blocks(self.db, self.envelope, self.cfg, self.kme_id, run, peer_kme_id)
                    run = []
                    time.sleep(0)  # let request threads and the event loop have the GIL
                if isinstance(event, LinkAlarm):
                    self.handle_alarm(event)
        return stored

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


def store_block(
    db: Database,
    envelope: Envelope,
    cfg: PoolSection,
    kme_id: str,
    block: KeyBlock,
    peer_kme_id: str,
    confirmed: bool = False,
) -> int:
    """Store one adapter block in the encrypted pool; returns the pieces stored.

    A local link's block is ``active`` at once; a block shared with another KME stays ``pre_active``
    until the peer confirms it holds the same block (``confirmed``: it already has). The block's
    ``sync`` metadata is kept with its provenance, for the peer's adapter.
    """
    return store_blocks(db, envelope, cfg, kme_id, [block], peer_kme_id, confirmed)


def store_blocks(
    db: Database,
    envelope: Envelope,
    cfg: PoolSection,
    kme_id: str,
    blocks: Sequence[KeyBlock],
    peer_kme_id: str,
    confirmed: bool = False,
) -> int:
    """:func:`store_block` for several blocks of one link in one transaction (one BEGIN, one audit
    append, one COMMIT for all of them: the filler then holds SQLite's write turn far less)."""
    if not blocks:
        return 0
    link_id = blocks[0].link_id
    if any(b.link_id != link_id for b in blocks):
        raise ValueError("store_blocks takes the blocks of one link")
    events = pool.EventBatch(datetime.now(UTC))
    actor = f"adapter:{link_id}"
    prepared = []
    for block in blocks:
        pieces = split_block(block, cfg.storage_block_bits, cfg.min_key_size, kme_id, peer_kme_id)
        provenance = block.provenance.to_json()
        if block.sync:
            provenance["sync"] = dict(block.sync)
        prepared.append((block, pieces, provenance))
    stored = 0
    with db.write() as conn:
        if links.link_state(conn, link_id) == "suspended":
            state = KeyState.SUSPENDED
        elif peer_kme_id == kme_id or confirmed:
            state = KeyState.ACTIVE
        else:
            state = KeyState.PRE_ACTIVE
        reason = "peer already holds it" if confirmed else "local link"
        entries: list[tuple[str, str, str, dict[str, object]]] = []
        for block, pieces, provenance in prepared:
            n = pool.store_block_pieces(
                conn, envelope, link_id, pieces, provenance, state, events, actor, reason
            )
            stored += n
            prov = block.provenance
            record: dict[str, object] = {
                "block_id": block.block_id,
                "bits": block.bit_length,
                "storage_blocks": n,
                "state": state.value,
                "protocol": prov.protocol,
                "is_qkd": prov.is_qkd,
                "simulated": prov.simulated,
                "qber": prov.qber,
            }
            entries.append((actor, "block.received", link_id, record))
        events.flush(conn)
        audit.append(conn, events.at, entries)
    log.debug("blocks_stored", link_id=link_id, blocks=len(blocks), pieces=stored)
    return stored
