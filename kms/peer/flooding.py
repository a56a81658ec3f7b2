"""Link-state flooding (DECISIONS.md D-26): this KME's own record, and every other KME's passed on.

The leader process (``kms.runtime.background``) calls ``tick`` every ``sync_seconds``. It issues a
new record of this KME's links when they change — a link's state, a neighbour that stopped or
started answering, a stock that moved by more than a quarter — and at least every
``topology_heartbeat_seconds``, so that a KME that stops renewing its record is known gone. A
neighbour that answers again (or for the first time) exchanges whole databases with this KME
(``topology``), so a KME that starts or comes back learns the network at once.

Any process that receives a ``topology.flood`` or ``topology`` message checks each record's
signature against its origin's key, keeps those newer than what it holds (in the database, for all
processes), and sends those on to every other answering neighbour from one sender thread, batched.
Flooding stops by itself: a record already held is not sent on.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import Any

import structlog

from kms.config import PeeringSection
from kms.crypto.identity import KmeIdentity
from kms.peer.client import PeerClient, PeerError
from kms.peer.directory import PeerDirectory
from kms.peer.link_state import LinkAdvert, LinkStateRecord, RecordRejected, sign_record, verify_record
from kms.peer.messages import MessageRejected, PeerMessage
from kms.service.link_state_store import LinkStateStore
from kms.service.link_stock import LinkStock
from kms.storage.link_state_repository import StoredRecord

log = structlog.get_logger(__name__)
MAX_RECORDS_PER_MESSAGE = 512
STOCK_CHANGE = 0.25  # re-issue when a link's stock moved by more than this fraction...
STOCK_REISSUE_SECONDS = 2.0  # ...but not more often than this for stock alone
PROBE_SECONDS = 2.0  # how often a neighbour that does not answer is tried again
FLOOD_GATHER_SECONDS = 0.05


class LinkStateFlood:
    def __init__(
        self,
        stock: LinkStock,
        client: PeerClient,
        directory: PeerDirectory,
        identity: KmeIdentity,
        store: LinkStateStore,
        cfg: PeeringSection,
    ) -> None:
        self.kme_id = stock.site.kme_id
        self.stock = stock
        self.client = client
        self.directory = directory
        self.identity = identity
        self.store = store
        self.cfg = cfg
        self._own: LinkStateRecord | None = None
        self._synced: set[str] = set()
        self._probed: dict[str, float] = {}
        self._last_forget = 0.0
        self._outbox: queue.Queue[tuple[list[dict[str, Any]], str | None]] = queue.Queue()
        self._sender: threading.Thread | None = None
        self._sender_lock = threading.Lock()

    # -- the leader's tick -------------------------------------------------------------------------
    def tick(self) -> None:
        """Exchange databases with neighbours not yet in step, then issue this KME's record if due."""
        now = time.monotonic()
        for peer in self.directory.adjacent():
            down = peer.kme_id in self.client.down_peers()
            if down:
                self._synced.discard(peer.kme_id)
            if peer.kme_id in self._synced:
                continue
            if down and now - self._probed.get(peer.kme_id, 0.0) < PROBE_SECONDS:
                continue
            self._probed[peer.kme_id] = now
            self.sync_with(peer.kme_id)
        adverts = self._adverts()
        if self._due(adverts, time.time()):
            self._issue(adverts)
        if now - self._last_forget > self.cfg.topology_heartbeat_seconds:
            self._last_forget = now
            self.store.forget_issued_before(time.time() - 3 * self.cfg.link_state_max_age_seconds)

    def _adverts(self) -> tuple[LinkAdvert, ...]:
        down = self.client.down_peers()
        return tuple(
            sorted(
                (
                    LinkAdvert(
                        lv.peer_kme_id,
                        lv.link_id,
                        "down" if lv.state == "active" and lv.peer_kme_id in down else lv.state,
                        lv.own_bits,
                        lv.rate,
                    )
                    for lv in self.stock.levels()
                ),
                key=lambda a: (a.peer, a.link_id),
            )
        )

    def _due(self, adverts: tuple[LinkAdvert, ...], now: float) -> bool:
        own = self._own
        if own is None or now - own.issued_at >= self.cfg.topology_heartbeat_seconds:
            return True
        if [(a.peer, a.link_id, a.state) for a in adverts] != [
            (a.peer, a.link_id, a.state) for a in own.links
        ]:
            return True
        if now - own.issued_at < STOCK_REISSUE_SECONDS:
            return False
        return any(
            (old.bits == 0) != (new.bits == 0)
            or abs(new.bits - old.bits) > STOCK_CHANGE * max(old.bits, new.bits)
            for old, new in zip(own.links, adverts, strict=True)
        )

    def _issue(self, adverts: tuple[LinkAdvert, ...]) -> None:
        now = time.time()
        seq = max((self._own.seq + 1) if self._own else 0, int(now * 1000))
        record = sign_record(self.identity, LinkStateRecord(self.kme_id, seq, now, adverts))
        self._own = record
        self.store.store([_stored(record)])
        self._send_on([record.to_json()], None)

    # -- receiving ---------------------------------------------------------------------------------
    def on_flood(self, message: PeerMessage) -> dict[str, Any]:
        """``topology.flood``: records a neighbour passes on."""
        return {"stored": self._take(message.body.get("records"), message.sender, message)}

    def on_sync(self, message: PeerMessage) -> dict[str, Any]:
        """``topology``: a neighbour's whole database (possibly none) for ours."""
        self._take(message.body.get("records") or [], message.sender, message)
        return {"records": self._database()}

    def sync_with(self, peer_id: str) -> bool:
        """Exchange whole databases with a neighbour; True once done."""
        try:
            reply = self.client.call(peer_id, "topology", {"records": self._database()})
            self._take(reply.body.get("records") or [], peer_id)
        except (PeerError, MessageRejected) as exc:
            log.info("link_state_sync_failed", peer=peer_id, error=str(exc)[:200])
            return False
        self._synced.add(peer_id)
        return True

    def _database(self) -> list[dict[str, Any]]:
        return [json.loads(r.record) for r in self.store.records()]

    def _take(self, raw: Any, sender: str, message: PeerMessage | None = None) -> int:
        """Check, keep and pass on what is newer; the number kept. ``message``: the request that
        carried the records (remembered against replay with them)."""
        if not isinstance(raw, list) or len(raw) > MAX_RECORDS_PER_MESSAGE:
            raise MessageRejected(f"a link-state message holds at most {MAX_RECORDS_PER_MESSAGE} records")
        now = time.time()
        fresh: list[LinkStateRecord] = []
        for item in raw:
            try:
                record = LinkStateRecord.from_json(item)
                if record.origin == self.kme_id:
                    continue  # this KME's own record is issued here, never taken from others
                if record.issued_at > now + self.cfg.max_clock_skew_seconds:
                    raise RecordRejected(f"the record of {record.origin} is issued in the future")
                if record.issued_at < now - self.cfg.link_state_max_age_seconds:
                    continue  # too old to route on; its origin will issue a new one
                verify_record(record, self.directory, self.identity)
            except RecordRejected as exc:
                log.warning("link_state_rejected", sender=sender, error=str(exc)[:200])
                continue
            fresh.append(record)
        newer = [
            r
            for r, kept in zip(fresh, self.store.store([_stored(r) for r in fresh], message), strict=True)
            if kept
        ]
        if newer:
            self._send_on([r.to_json() for r in newer], sender)
        return len(newer)

    # -- sending on --------------------------------------------------------------------------------
    def _send_on(self, records: list[dict[str, Any]], exclude: str | None) -> None:
        self._outbox.put((records, exclude))
        with self._sender_lock:
            if self._sender is None or not self._sender.is_alive():
                self._sender = threading.Thread(target=self._send_loop, name="qkms-link-state", daemon=True)
                self._sender.start()

    def _send_loop(self) -> None:
        """Batch what is waiting per neighbour and send it; a neighbour that does not answer gets the
        whole database when it does (``tick``)."""
        while True:
            batches = [self._outbox.get()]
            time.sleep(FLOOD_GATHER_SECONDS)  # records arriving together go in one message
            while True:
                try:
                    batches.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            down = self.client.down_peers()
            for peer in self.directory.adjacent():
                if peer.kme_id in down:
                    continue
                records = [r for recs, exclude in batches if exclude != peer.kme_id for r in recs]
                for start in range(0, len(records), MAX_RECORDS_PER_MESSAGE):
                    try:
                        self.client.call(
                            peer.kme_id,
                            "topology.flood",
                            {"records": records[start : start + MAX_RECORDS_PER_MESSAGE]},
                        )
                    except PeerError as exc:
                        log.info("link_state_flood_failed", peer=peer.kme_id, error=str(exc)[:200])
                        break


def _stored(record: LinkStateRecord) -> StoredRecord:
    return StoredRecord(record.origin, record.seq, record.issued_at, json.dumps(record.to_json()))
