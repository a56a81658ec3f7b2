"""This KME in the network: keys for slaves at other KMEs, the ledger it records for peers, relay,
block confirmation and link-state exchange.

Master side (``get_keys``): cut the keys from this KME's pieces of the link toward the first hop and
record them ``pre_active`` without material (transaction 1); send the signed ledger entry and wait
for the peer's signed receipt; then, in transaction 2, the keys become ``consumed`` here (the master
gets them; the slave fetches them at its own KME) — or, if the peer did not record them,
``destroyed``: their bits are discarded, never served, and the master gets a 503. No key reaches the
master before the peer has recorded it, and a lost answer can never leave bits that two KMEs use.

Peer side (``handle``): a ledger entry names, for each key_ID, bits of a piece the sender cuts; this
KME takes exactly those bits from its mirror of the piece (refusing any range already taken) and
records the keys for its slaves. At a trusted node the entry is not for a local slave: the node
one-time-pad encrypts the key with as many bits of its link to the next hop and forwards it.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from kms.config import PeeringSection, PoolSection
from kms.crypto.envelope import Envelope
from kms.crypto.identity import KmeIdentity
from kms.domain.delivery import DeliveredKey, KemExchange, KeyDeliveryService
from kms.domain.errors import DeliveryError, ServiceUnavailable
from kms.domain.lifecycle import KeyState
from kms.domain.policy import POLICY_FALLBACK, PairPolicy
from kms.domain.saes import SaeInfo, SaeRegistry
from kms.ingest import store_block
from kms.peer.batching import KeyRequest, LedgerBatcher
from kms.peer.client import PeerClient, PeerError, PeerUncertain
from kms.peer.directory import PeerDirectory
from kms.peer.messages import MessageRejected, PeerMessage
from kms.peer.routing import Edge, Topology
from kms.storage import audit_repository as audit
from kms.storage import peer_repository as peers
from kms.storage import pool_repository as pool
from kms.storage.database import Database, savepoint
from kms.storage.peer_repository import BitRange, LedgerConflict
from qkd_adapters.keyblock import FollowerKeySource, KeyBlock, KeySourceError

log = structlog.get_logger(__name__)
OWN_EDGES_MAX_AGE = 0.5
# Requests that record keys at the peer: the ones a ``keys.cancel`` may void.
LEDGER_REQUESTS = frozenset({"keys.record", "keys.record.batch"})


class PeerNetwork:
    def __init__(
        self,
        kme_id: str,
        pool_cfg: PoolSection,
        peering: PeeringSection,
        db: Database,
        envelope: Envelope,
        identity: KmeIdentity,
        registry: SaeRegistry,
        directory: PeerDirectory,
        followers: Mapping[str, FollowerKeySource] | None = None,
    ) -> None:
        self.kme_id = kme_id
        self.cfg = pool_cfg
        self.peering = peering
        self.db = db
        self.envelope = envelope
        self.identity = identity
        self.registry = registry
        self.directory = directory
        self.followers = dict(followers or {})
        self.client = PeerClient(kme_id, peering, directory, identity)
        self.topology = Topology(kme_id)
        self.service: KeyDeliveryService | None = None
        self._batchers: dict[str, LedgerBatcher] = {}
        self._batchers_lock = threading.Lock()
        self._own_edges_cache: tuple[float, list[Edge]] | None = None
        # Handlers of other peer services (audit copies: ``kms.peer.countersign``), by message type.
        self.extra_handlers: dict[str, Callable[[PeerMessage], dict[str, Any]]] = {}

    def _batcher(self, peer_id: str) -> LedgerBatcher:
        with self._batchers_lock:
            batcher = self._batchers.get(peer_id)
            if batcher is None:
                batcher = self._batchers[peer_id] = LedgerBatcher(self, peer_id)
            return batcher

    def deliver_batch(self, peer_id: str, batch: list[KeyRequest]) -> None:
        """Cut, record at ``peer_id`` and settle a batch of requests (see ``kms.peer.batching``)."""
        assert self.service is not None
        at = datetime.now(UTC)
        events = pool.EventBatch(at)
        prepared: list[tuple[KeyRequest, list[pool.CutKey], KemExchange | None, str | None]] = []
        with self.db.write() as conn:
            for req in batch:
                mark = len(events.rows)
                try:
                    with savepoint(conn):
                        prepared.append((req, *self._prepare(conn, req, peer_id, events, at)))
                except DeliveryError as exc:
                    del events.rows[mark:]
                    req.future.set_exception(exc)
            events.flush(conn)
        if not prepared:
            return
        entries = [
            self._entry_body([self.kme_id, peer_id], req, cut, exchange, suite)
            for req, cut, exchange, suite in prepared
        ]
        try:
            reply = self.client.call(peer_id, "keys.record.batch", {"entries": entries})
            results = list(reply.body["results"])
            if len(results) != len(prepared):
                raise PeerUncertain(peer_id, "its receipt does not cover every entry")
        except PeerError as exc:
            failure = self._peer_failed(
                peer_id,
                exc,
                [
                    (
                        f"sae:{r.master.sae_id}",
                        f"{r.master.sae_id}->{r.slave.sae_id}",
                        [c.key_id for c in cut],
                    )
                    for r, cut, _, _ in prepared
                ],
                self.kme_id,
            )
            for req, _, _, _ in prepared:
                req.future.set_exception(failure)
            return
        settle = []
        for (r, cut, _, suite), res in zip(prepared, results, strict=True):
            ok = bool(res.get("ok"))
            record: dict[str, Any] = (
                {
                    "peer": peer_id,
                    "receipt_nonce": reply.nonce,
                    "size": r.size,
                    "slaves": r.recipients,
                    "policy": r.policy_name,
                    "suite": suite,
                }
                if ok
                else {"peer": peer_id, "reason": str(res.get("error"))[:300]}
            )
            settle.append(
                (
                    f"sae:{r.master.sae_id}",
                    f"{r.master.sae_id}->{r.slave.sae_id}",
                    [c.key_id for c in cut],
                    ok,
                    record,
                )
            )
        self._settle_many(settle)
        for (req, cut, exchange, suite), res in zip(prepared, results, strict=True):
            if not res.get("ok"):
                req.future.set_exception(
                    ServiceUnavailable(
                        f"KME {peer_id} refused the keys: {str(res.get('error'))[:200]}; retry later"
                    )
                )
                continue
            req.future.set_result(self._delivered(req, cut, exchange, suite))

    def _prepare(
        self, conn: Any, req: KeyRequest, peer_id: str, events: pool.EventBatch, at: datetime
    ) -> tuple[list[pool.CutKey], KemExchange | None, str | None]:
        assert self.service is not None
        cut = self.service.cut(
            conn, peer_id, req.number, req.size, req.policy, events, f"sae:{req.master.sae_id}"
        )
        # Short or suspended link and a pair that allows it: ML-KEM-only keys, made for the slave's
        # KME (it decapsulates with its own key), recorded there like any other.
        req.fallback = cut[0].material is None
        suite = req.policy.suite(req.fallback)
        exchange = self._encapsulate_to(conn, req.policy, req.slave.kme_id, at) if suite else None
        pool.insert_reserved_keys(
            conn,
            self.envelope,
            cut,
            size_bits=req.size,
            master_sae_id=req.master.sae_id,
            slave_sae_ids=req.recipients,
            target_kme_id=req.slave.kme_id,
            ttl=timedelta(seconds=self.cfg.reserved_ttl_seconds),
            policy=req.policy_name,
            suite=suite,
            kem_exchange_id=exchange.exchange_id if exchange else None,
            at=at,
            state=KeyState.PRE_ACTIVE,
            keep_material=False,
        )
        return cut, exchange, suite

    def _entry_body(
        self,
        route: list[str],
        req: KeyRequest,
        cut: list[pool.CutKey],
        exchange: KemExchange | None,
        suite: str | None,
    ) -> dict[str, Any]:
        return {
            "route": route,
            "hops": [{"from": route[0], "to": route[1], "links": sorted({c.link_id or "" for c in cut})}],
            "size": req.size,
            "keys": [
                {
                    "key_ID": c.key_id,
                    "link_id": c.link_id,
                    "block_id": c.source_block_id,
                    "offset": c.source_bit,
                }
                for c in cut
            ],
            "ciphertext": None,
            "master_SAE_ID": req.master.sae_id,
            "slave_SAE_IDs": req.recipients,
            "policy": req.policy_name,
            "suite": suite,
            "kem": _kem_json(exchange, req.policy.kem) if exchange else None,
        }

    def _settle_many(self, items: list[tuple[str, str, list[str], bool, dict[str, Any]]]) -> None:
        at = datetime.now(UTC)
        with self.db.write() as conn:
            entries: list[tuple[str, str, str, dict[str, Any]]] = []
            for actor, subject, key_ids, ok, record in items:
                target = KeyState.CONSUMED if ok else KeyState.DESTROYED
                reason = "recorded by the slave's KME" if ok else f"peer failed: {record.get('reason')}"
                peers.close_pending_keys(conn, key_ids, target, actor, reason, at)
                action = "keys.reserved" if ok else "keys.discarded"
                entries.append((actor, action, subject, {"key_IDs": key_ids, **record}))
            audit.append(conn, at, entries)

    # -- routing -------------------------------------------------------------------------------
    def own_edges(self) -> list[Edge]:
        with self.db.read() as conn:
            levels = peers.link_levels(conn)
        now = datetime.now(UTC).timestamp()
        return [
            Edge(self.kme_id, lv.peer_kme_id, lv.link_id, lv.state, lv.own_bits, now)
            for lv in levels
            if lv.peer_kme_id != self.kme_id
        ]

    def refresh_topology(self) -> None:
        """Ask every adjacent KME for the links it knows (its own and what it learned)."""
        for peer in self.directory.adjacent():
            try:
                reply = self.client.call(peer.kme_id, "topology", {})
                self.topology.learn(Edge.from_json(e) for e in reply.body.get("edges", []))
            except (PeerError, KeyError, TypeError, ValueError) as exc:
                log.info("topology_refresh_failed", peer=peer.kme_id, error=str(exc)[:200])
        self.topology.mark_refreshed()

    def _cached_own_edges(self) -> list[Edge]:
        """Own link levels, re-read at most every ``OWN_EDGES_MAX_AGE`` s: routing runs per request, and
        a stale stock figure only makes the cut itself answer 503."""
        now = time.monotonic()
        with self._batchers_lock:
            cached = self._own_edges_cache
        if cached is not None and now - cached[0] < OWN_EDGES_MAX_AGE:
            return cached[1]
        edges = self.own_edges()
        with self._batchers_lock:
            self._own_edges_cache = (now, edges)
        return edges

    def route_to(self, target_kme_id: str, needed_bits: int) -> list[str] | None:
        own = self._cached_own_edges()
        if any(e.dst == target_kme_id and e.state == "active" and e.bits >= needed_bits for e in own):
            return [self.kme_id, target_kme_id]
        return self.topology.route(own, target_kme_id, needed_bits, refresh=self.refresh_topology)

    def available_keys(self, target_kme_id: str, key_size: int) -> int:
        """Keys of ``key_size`` the network could deliver to ``target_kme_id`` now (the route's narrowest hop)."""
        route = self.route_to(target_kme_id, key_size)
        if route is None:
            return 0
        # Get status reports this KME's own stock as it is now (routing may use the 0.5 s cache).
        edges = {(e.src, e.dst): e for e in [*self.topology.learned(), *self.own_edges()]}
        hops = [edges.get((a, b)) for a, b in itertools.pairwise(route)]
        return min((e.bits if e else 0) for e in hops) // key_size

    # -- master side ---------------------------------------------------------------------------
    def get_keys(
        self,
        master: SaeInfo,
        slave: SaeInfo,
        recipients: list[str],
        number: int,
        size: int,
        policy: PairPolicy,
    ) -> list[DeliveredKey]:
        assert self.service is not None
        target = slave.kme_id
        route = self.route_to(target, number * size)
        peer = self.directory.get(target)
        if route is None and policy.pqc_fallback and peer is not None and peer.url:
            route = [self.kme_id, target]  # the link cannot carry it; PQC fallback to the adjacent KME may
        if route is None:
            raise ServiceUnavailable(
                f"no route to KME {target} with {number * size} bits of key on every hop; retry later",
                [{"target_KME_ID": target}],
            )
        if self.client.recently_unreachable(route[1]):
            raise ServiceUnavailable(
                f"KME {route[1]} is unreachable; no key bits were used, retry later",
                [{"peer_KME_ID": route[1]}],
            )
        if len(route) == 2:
            return self._batcher(target).submit(KeyRequest(master, slave, recipients, number, size, policy))
        # Relayed: one request at a time through the trusted nodes (each hop waits on the next).
        request = KeyRequest(master, slave, recipients, number, size, policy)
        at = datetime.now(UTC)
        events = pool.EventBatch(at)
        with self.db.write() as conn:
            cut, exchange, suite = self._prepare(conn, request, route[1], events, at)
            events.flush(conn)
        body = self._entry_body(route, request, cut, exchange, suite)
        self._send_and_settle(
            route[1],
            body,
            [c.key_id for c in cut],
            f"sae:{master.sae_id}",
            f"{master.sae_id}->{slave.sae_id}",
        )
        return self._delivered(request, cut, exchange, suite)

    def _delivered(
        self, req: KeyRequest, cut: list[pool.CutKey], exchange: KemExchange | None, suite: str | None
    ) -> list[DeliveredKey]:
        assert self.service is not None
        return self.service.delivered(cut, exchange, suite, req.master.sae_id, req.slave, req.size)

    def _send_and_settle(
        self, peer_id: str, body: dict[str, Any], key_ids: list[str], actor: str, subject: str
    ) -> None:
        """Send a ledger entry; settle the pending keys as the peer's answer says. Raises 503 on failure."""
        try:
            reply = self.client.call(peer_id, "keys.record", body)
        except PeerError as exc:
            raise self._peer_failed(peer_id, exc, [(actor, subject, key_ids)], body["route"][0]) from None
        record = {
            "peer": peer_id,
            "receipt_nonce": reply.nonce,
            "route": body["route"],
            "size": body["size"],
            "slaves": body["slave_SAE_IDs"],
            "policy": body["policy"],
            "suite": body["suite"],
        }
        self._settle_many([(actor, subject, key_ids, True, record)])

    def _peer_failed(
        self, peer_id: str, exc: PeerError, requests: list[tuple[str, str, list[str]]], origin: str
    ) -> ServiceUnavailable:
        """The peer did not (or may not have) recorded these requests' keys: destroy them here, ask the
        peer to withdraw them if it may have acted, and give the 503 the masters get."""
        record = {"peer": peer_id, "reason": exc.reason}
        self._settle_many([(actor, subject, key_ids, False, record) for actor, subject, key_ids in requests])
        if isinstance(exc, PeerUncertain):
            self._cancel_later(peer_id, origin, [k for _, _, key_ids in requests for k in key_ids], exc.sent)
        return ServiceUnavailable(
            f"KME {peer_id} did not record the keys ({exc.reason}); no key was delivered and their bits"
            " were discarded; retry later",
            [{"peer_KME_ID": peer_id}],
        )

    def _cancel_later(
        self, peer_id: str, origin: str, key_ids: list[str], sent: PeerMessage | None = None
    ) -> None:
        """The peer may have recorded keys we discarded: ask it to withdraw them (best effort; its
        reserved-key TTL zeroises them anyway). The cancel names the unanswered request (``sent``):
        it may still be on its way — queued in a frozen peer's socket, or waiting there for the write
        turn — and reach the peer after the cancel, which then makes the peer refuse it."""
        body: dict[str, Any] = {"origin": origin, "key_IDs": key_ids}
        if sent is not None:
            body["message"] = {
                "nonce": sent.nonce,
                "session": sent.session,
                "seq": sent.seq,
                "type": sent.type,
            }

        def cancel() -> None:
            for delay in (0.0, 1.0, 2.0, 4.0, 8.0, 16.0):
                time.sleep(delay)
                try:
                    self.client.call(peer_id, "keys.cancel", body)
                    return
                except PeerError as exc:
                    log.info("peer_cancel_failed", peer=peer_id, error=exc.reason)

        threading.Thread(target=cancel, name="qkms-peer-cancel", daemon=True).start()

    def _encapsulate_to(self, conn: Any, policy: PairPolicy, target: str, at: datetime) -> KemExchange:
        assert self.service is not None
        key = self.directory.kem_key(target)
        if key is None:
            raise ServiceUnavailable(
                f"no ML-KEM public key is known for KME {target}; import its peer bundle"
            )
        return self.service.encapsulate_to(
            conn, policy, target, key.algorithm, key.version, key.public_key, at
        )

    # -- peer side -----------------------------------------------------------------------------
    def handle(self, message: PeerMessage) -> dict[str, Any]:
        """Act on a verified message; the reply body. Raises ``MessageRejected`` (answered as a signed
        error) when it must not be acted on."""
        handlers = {
            "keys.record": self._on_record,
            "keys.record.batch": self._on_record_batch,
            "keys.cancel": self._on_cancel,
            "blocks.announce": self._on_announce,
            "topology": self._on_topology,
            "pieces.claim": self._on_claim,
            **self.extra_handlers,
        }
        handler = handlers.get(message.type)
        if handler is None:
            raise MessageRejected(f"unknown message type {message.type!r}")
        try:
            return handler(message)
        except (LedgerConflict, ValueError, KeyError, TypeError) as exc:
            raise MessageRejected(f"cannot act on {message.type}: {exc}"[:300]) from exc

    def _remember(self, conn: Any, message: PeerMessage) -> None:
        if not peers.remember_message(
            conn, message.sender, message.nonce, message.session, message.seq, message.type, datetime.now(UTC)
        ):
            raise MessageRejected("replayed message (nonce or sequence number seen before)")

    def _on_topology(self, message: PeerMessage) -> dict[str, Any]:
        with self.db.write() as conn:
            self._remember(conn, message)
        return {"edges": [e.to_json() for e in [*self.own_edges(), *self.topology.learned()]]}

    def _on_cancel(self, message: PeerMessage) -> dict[str, Any]:
        """Withdraw keys the sender discarded. If the cancel names the request that carried them and
        that request has not arrived yet, it is voided: remembered as seen, so that when it does
        arrive it is refused as a replay instead of recording keys its sender already discarded."""
        key_ids = [str(uuid.UUID(str(k))) for k in message.body["key_IDs"]][: self.cfg.max_key_per_request]
        voided = _voided_request(message.body.get("message"))
        at = datetime.now(UTC)
        actor = f"kme:{message.sender}"
        with self.db.write() as conn:
            self._remember(conn, message)
            overtook = voided is not None and peers.void_message(conn, message.sender, *voided, at)
            gone = peers.destroy_recorded(
                conn, str(message.body["origin"]), message.sender, key_ids, actor, at
            )
            if gone or overtook:
                detail: dict[str, Any] = {"key_IDs": gone}
                if overtook:
                    detail["never_recorded"] = key_ids
                audit.append(conn, at, [(actor, "keys.withdrawn", "peer", detail)])
        return {"withdrawn": len(gone), "voided": overtook}

    def _on_record(self, message: PeerMessage) -> dict[str, Any]:
        b = message.body
        route = [str(k) for k in b["route"]]
        if self.kme_id not in route[1:] or route[route.index(self.kme_id) - 1] != message.sender:
            raise MessageRejected("this KME is not the next hop after the sender on the message's route")
        here = route.index(self.kme_id)
        origin, target = route[0], route[-1]
        key_ids, slaves, size = self._check_entry(b)
        master_id = str(b["master_SAE_ID"])
        entries = b["keys"]
        ciphertexts = b.get("ciphertext")
        if ciphertexts is not None and len(ciphertexts) != len(entries):
            raise MessageRejected("one ciphertext per key is required on a relayed hop")
        at = datetime.now(UTC)
        actor = f"kme:{message.sender}"
        events = pool.EventBatch(at)
        hops = list(b.get("hops") or [])
        final = here == len(route) - 1
        with self.db.write() as conn:
            self._remember(conn, message)
            bits = self._take(conn, message.sender, entries, size, events, actor)
            if ciphertexts is not None:
                bits = [_xor(k, base64.b64decode(c)) for k, c in zip(bits, ciphertexts, strict=True)]
            if final:
                self._record_final(conn, b, key_ids, bits, size, origin, slaves, hops, at)
                events.flush(conn)
                audit.append(
                    conn,
                    at,
                    [
                        (
                            actor,
                            "keys.recorded",
                            f"{master_id}->{slaves[0]}",
                            {"key_IDs": key_ids, "origin": origin, "route": route, "slaves": slaves},
                        )
                    ],
                )
                return {"recorded": len(key_ids)}
            nxt = route[here + 1]
            cut = pool.cut_keys(
                conn,
                self.envelope,
                target_kme_id=nxt,
                number=len(key_ids),
                size_bits=size,
                min_key_size=self.cfg.min_key_size,
                events=events,
                actor=actor,
            )
            if cut is None:
                raise MessageRejected(f"not enough key on the link from {self.kme_id} to {nxt} to relay")
            hops.append({"from": self.kme_id, "to": nxt, "links": sorted({c.link_id or "" for c in cut})})
            pool.insert_reserved_keys(
                conn,
                self.envelope,
                [pool.CutKey(k, None, c.block_id, c.bit_offset) for k, c in zip(key_ids, cut, strict=True)],
                size_bits=size,
                master_sae_id=master_id,
                slave_sae_ids=slaves,
                target_kme_id=target,
                ttl=timedelta(seconds=self.cfg.reserved_ttl_seconds),
                policy=str(b["policy"]),
                suite=b.get("suite"),
                kem_exchange_id=None,
                at=at,
                state=KeyState.PRE_ACTIVE,
                keep_material=False,
                source_kme_id=origin,
                route=json.dumps(hops),
            )
            events.flush(conn)
            forward = {
                **b,
                "hops": hops,
                "keys": _key_refs(key_ids, cut),
                "ciphertext": [
                    base64.b64encode(_xor(k_bits, c.material or b"")).decode()
                    for k_bits, c in zip(bits, cut, strict=True)
                ],
            }
        try:
            self._send_and_settle(nxt, forward, key_ids, actor, f"relay {origin}->{target}")
        except ServiceUnavailable as exc:
            raise MessageRejected(f"relay to {nxt} failed: {exc.message}") from None
        return {"recorded": len(key_ids), "relayed_to": nxt}

    def _on_record_batch(self, message: PeerMessage) -> dict[str, Any]:
        """Entries for slaves here, from the adjacent master KME: one transaction, each entry on its own
        savepoint so that one refused entry does not refuse the others."""
        entries = list(message.body["entries"])
        if not entries or len(entries) > 256:
            raise MessageRejected("a batch holds 1 to 256 entries")
        at = datetime.now(UTC)
        actor = f"kme:{message.sender}"
        events = pool.EventBatch(at)
        results: list[dict[str, Any]] = []
        records: list[tuple[str, str, str, dict[str, Any]]] = []
        with self.db.write() as conn:
            self._remember(conn, message)
            for b in entries:
                mark = len(events.rows)
                try:
                    with savepoint(conn):
                        if [str(k) for k in b["route"]] != [message.sender, self.kme_id]:
                            raise MessageRejected(
                                "a batched entry must go from the sender straight to this KME"
                            )
                        key_ids, slaves, size = self._check_entry(b)
                        if b.get("policy") == POLICY_FALLBACK:
                            if not b.get("kem"):
                                raise MessageRejected("a PQC-fallback entry needs an ML-KEM ciphertext")
                            bits: list[bytes | None] = [None] * len(key_ids)
                        else:
                            bits = list(
                                self._take(conn, message.sender, list(b["keys"]), size, events, actor)
                            )
                        self._record_final(conn, b, key_ids, bits, size, message.sender, slaves, [], at)
                    results.append({"ok": True})
                    subject = f"{b['master_SAE_ID']}->{slaves[0]}"
                    records.append(
                        (actor, "keys.recorded", subject, {"key_IDs": key_ids, "origin": message.sender})
                    )
                except (MessageRejected, LedgerConflict, ValueError, KeyError, TypeError) as exc:
                    del events.rows[mark:]
                    reason = exc.reason if isinstance(exc, MessageRejected) else str(exc)
                    results.append({"ok": False, "error": reason[:300]})
            events.flush(conn)
            if records:
                audit.append(conn, at, records)
        return {"results": results}

    def _check_entry(self, b: dict[str, Any]) -> tuple[list[str], list[str], int]:
        """Validate a ledger entry's SAEs and keys: (key_IDs, slaves, size)."""
        route = [str(k) for k in b["route"]]
        origin, target = route[0], route[-1]
        size = int(b["size"])
        if size <= 0 or size % 8 or size > 65536:
            raise MessageRejected("key size must be a positive multiple of 8 bits")
        master_id = str(b["master_SAE_ID"])
        slaves = [str(s) for s in b["slave_SAE_IDs"]]
        master = self.registry.get(master_id)
        if master is None or master.kme_id != origin:
            raise MessageRejected(f"SAE {master_id} is not served by the route's origin {origin}")
        if not slaves:
            raise MessageRejected("a ledger entry names at least one slave")
        for sae_id in slaves:
            info = self.registry.get(sae_id)
            if info is None or info.kme_id != target or info.role != "sae":
                raise MessageRejected(f"SAE {sae_id} is not served by the route's target {target}")
        entries = b["keys"]
        if not entries or len(entries) > self.cfg.max_key_per_request:
            raise MessageRejected("a ledger entry names 1 to max_key_per_request keys")
        return [str(uuid.UUID(str(e["key_ID"]))) for e in entries], slaves, size

    def _take(
        self,
        conn: Any,
        sender: str,
        entries: list[dict[str, Any]],
        size: int,
        events: pool.EventBatch,
        actor: str,
    ) -> list[bytes]:
        by_link: dict[str, list[int]] = {}
        for i, e in enumerate(entries):
            by_link.setdefault(str(e["link_id"]), []).append(i)
        out: list[bytes] = [b""] * len(entries)
        for link_id, idx in by_link.items():
            link = peers.peer_link(conn, link_id)
            if link is None or link[0] != sender:
                raise MessageRejected(f"link {link_id} is not a link with {sender}")
            if link[1] != "active":
                raise MessageRejected(f"link {link_id} is {link[1]} here")
            got = peers.take_mirrored(
                conn,
                self.envelope,
                link_id,
                sender,
                [BitRange(str(entries[i]["block_id"]), int(entries[i]["offset"]), size) for i in idx],
                self.cfg.min_key_size,
                events,
                actor,
            )
            for i, (bits, _, _) in zip(idx, got, strict=True):
                out[i] = bits
        return out

    def _record_final(
        self,
        conn: Any,
        b: dict[str, Any],
        key_ids: list[str],
        bits: Sequence[bytes | None],
        size: int,
        origin: str,
        slaves: list[str],
        hops: list[Any],
        at: datetime,
    ) -> None:
        exchange_id = None
        kem = b.get("kem")
        if kem:
            own = self.identity.public_key("kem", int(kem["key_version"]))
            if hashlib.sha384(own.public_key).hexdigest() != kem["public_key_sha384"]:
                raise MessageRejected("the ML-KEM ciphertext was made for another public key of this KME")
            exchange_id = pool.insert_kem_exchange(
                conn,
                own.algorithm,
                self.kme_id,
                own.version,
                kem["public_key_sha384"],
                base64.b64decode(kem["ciphertext"]),
                at,
            )
        pool.insert_reserved_keys(
            conn,
            self.envelope,
            [pool.CutKey(k, m) for k, m in zip(key_ids, bits, strict=True)],
            size_bits=size,
            master_sae_id=str(b["master_SAE_ID"]),
            slave_sae_ids=slaves,
            target_kme_id=self.kme_id,
            ttl=timedelta(seconds=self.cfg.reserved_ttl_seconds),
            policy=str(b["policy"]),
            suite=b.get("suite"),
            kem_exchange_id=exchange_id,
            at=at,
            source_kme_id=origin,
            route=json.dumps(hops) if len(hops) > 1 else None,
        )

    # -- block confirmation ---------------------------------------------------------------------
    def sync_once(self) -> int:
        """Announce this KME's unconfirmed blocks to each adjacent peer; activate what it confirms."""
        confirmed_total = 0
        with self.db.read() as conn:
            levels = [lv for lv in peers.link_levels(conn) if lv.peer_kme_id != self.kme_id]
        for lv in levels:
            peer = self.directory.get(lv.peer_kme_id)
            if peer is None or not peer.url or lv.state != "active":
                continue
            with self.db.read() as conn:
                pending = peers.pending_blocks(conn, lv.link_id)
            if not pending:
                continue
            body = {
                "link_id": lv.link_id,
                "storage_block_bits": self.cfg.storage_block_bits,
                "blocks": [
                    {"block_id": p.block_id, "pieces": p.pieces, "sync": dict(p.sync)} for p in pending
                ],
            }
            try:
                reply = self.client.call(peer.kme_id, "blocks.announce", body)
            except PeerError as exc:
                log.info("block_announce_failed", peer=peer.kme_id, error=exc.reason)
                continue
            confirmed = [str(x) for x in reply.body.get("confirmed", [])]
            at = datetime.now(UTC)
            events = pool.EventBatch(at)
            with self.db.write() as conn:
                n = peers.activate_blocks(conn, lv.link_id, confirmed, f"kme:{peer.kme_id}", events)
                events.flush(conn)
                entries: list[tuple[str, str, str, dict[str, Any]]] = []
                if n:
                    entries.append(
                        (f"kme:{peer.kme_id}", "blocks.confirmed", lv.link_id, {"block_ids": confirmed})
                    )
                if reply.body.get("mismatched"):
                    entries.append(
                        (
                            f"kme:{peer.kme_id}",
                            "blocks.mismatched",
                            lv.link_id,
                            {"block_ids": reply.body["mismatched"]},
                        )
                    )
                if entries:
                    audit.append(conn, at, entries)
            confirmed_total += len(confirmed)
        return confirmed_total

    def rebalance_once(self) -> int:
        """Ask each adjacent peer for untouched pieces when this end runs short.

        Shared blocks start split half and half; with traffic mostly one way, the busy end would run
        dry while the other end's half sits idle (and the device's key would be wasted). When this
        end's own stock on a link falls below a quarter of its mirror of the peer's pieces, it asks
        for untouched pieces worth half the difference; the peer grants only pieces it has not cut
        from, under a row lock, so no bit is ever cut by both. Returns the bits taken over.
        """
        gained = 0
        with self.db.read() as conn:
            levels = [lv for lv in peers.link_levels(conn) if lv.peer_kme_id != self.kme_id]
        for lv in levels:
            peer = self.directory.get(lv.peer_kme_id)
            if peer is None or not peer.url or lv.state != "active" or lv.own_bits * 4 >= lv.mirror_bits:
                continue
            with self.db.read() as conn:
                wanted = peers.claimable_pieces(
                    conn, lv.link_id, peer.kme_id, (lv.mirror_bits - lv.own_bits) // 2
                )
            if not wanted:
                continue
            try:
                reply = self.client.call(
                    peer.kme_id, "pieces.claim", {"link_id": lv.link_id, "pieces": [list(w) for w in wanted]}
                )
            except PeerError as exc:
                log.info("piece_claim_failed", peer=peer.kme_id, error=exc.reason)
                continue
            granted = [(str(b), int(o)) for b, o in reply.body.get("granted", [])]
            at = datetime.now(UTC)
            events = pool.EventBatch(at)
            with self.db.write() as conn:
                n = peers.take_over_pieces(
                    conn, lv.link_id, peer.kme_id, granted, f"kme:{peer.kme_id}", events
                )
                events.flush(conn)
                if n:
                    audit.append(
                        conn,
                        at,
                        [
                            (
                                f"kme:{peer.kme_id}",
                                "pieces.granted",
                                lv.link_id,
                                {"pieces": n, "to": self.kme_id},
                            )
                        ],
                    )
            gained += n
        return gained

    def _on_claim(self, message: PeerMessage) -> dict[str, Any]:
        link_id = str(message.body["link_id"])
        wanted = [(str(b), int(o)) for b, o in message.body["pieces"]][:256]
        at = datetime.now(UTC)
        events = pool.EventBatch(at)
        with self.db.write() as conn:
            self._remember(conn, message)
            link = peers.peer_link(conn, link_id)
            if link is None or link[0] != message.sender:
                raise MessageRejected(f"link {link_id} is not a link with {message.sender}")
            granted = peers.grant_pieces(conn, link_id, message.sender, wanted, f"kme:{self.kme_id}", events)
            events.flush(conn)
            if granted:
                audit.append(
                    conn,
                    at,
                    [
                        (
                            f"kme:{message.sender}",
                            "pieces.granted",
                            link_id,
                            {"pieces": len(granted), "to": message.sender},
                        )
                    ],
                )
        return {"granted": [list(g) for g in granted]}

    def _on_announce(self, message: PeerMessage) -> dict[str, Any]:
        b = message.body
        link_id = str(b["link_id"])
        if int(b["storage_block_bits"]) != self.cfg.storage_block_bits:
            raise MessageRejected(
                f"pool.storage_block_bits differs ({message.sender}: {b['storage_block_bits']}, "
                f"{self.kme_id}: {self.cfg.storage_block_bits}); both ends must split blocks alike"
            )
        announced = {str(x["block_id"]): x for x in b["blocks"]}
        with self.db.write() as conn:
            self._remember(conn, message)
            link = peers.peer_link(conn, link_id)
            if link is None or link[0] != message.sender:
                raise MessageRejected(f"link {link_id} is not a link with {message.sender}")
            mine = peers.blocks_by_id(conn, link_id, list(announced))
        follower = self.followers.get(link_id)
        if follower is not None:
            for block_id in [k for k in announced if k not in mine]:
                self._fetch_from_device(follower, message.sender, announced[block_id])
            with self.db.read() as conn:
                mine = peers.blocks_by_id(conn, link_id, list(announced))
        confirmed, pending, mismatched = [], [], []
        for block_id, entry in announced.items():
            held = mine.get(block_id)
            if held is None:
                pending.append(block_id)
            elif [list(p) for p in held.pieces] == [list(p) for p in entry["pieces"]]:
                confirmed.append(block_id)
            else:
                mismatched.append(block_id)
        at = datetime.now(UTC)
        events = pool.EventBatch(at)
        with self.db.write() as conn:
            peers.activate_blocks(conn, link_id, confirmed, f"kme:{message.sender}", events)
            events.flush(conn)
            if mismatched:
                audit.append(
                    conn,
                    at,
                    [(f"kme:{message.sender}", "blocks.mismatched", link_id, {"block_ids": mismatched})],
                )
        return {"confirmed": confirmed, "pending": pending, "mismatched": mismatched}

    def _fetch_from_device(
        self, follower: FollowerKeySource, peer_kme_id: str, entry: dict[str, Any]
    ) -> None:
        bit_length = sum(int(p[1]) for p in entry["pieces"])
        try:
            got = follower.fetch_announced(str(entry["block_id"]), bit_length, dict(entry.get("sync") or {}))
        except KeySourceError as exc:
            log.warning("follower_fetch_failed", link_id=follower.link_id, error=str(exc)[:200])
            return
        if isinstance(got, KeyBlock):
            store_block(self.db, self.envelope, self.cfg, self.kme_id, got, peer_kme_id, confirmed=True)
        else:
            log.warning("follower_fetch_alarm", link_id=got.link_id, reason=got.reason[:200])

    def close(self) -> None:
        self.client.close()


def _key_refs(key_ids: list[str], cut: list[pool.CutKey]) -> list[dict[str, Any]]:
    """Where each key's bits sit in the block both ends of the link hold: what the peer's ledger needs."""
    return [
        {"key_ID": k, "link_id": c.link_id, "block_id": c.source_block_id, "offset": c.source_bit}
        for k, c in zip(key_ids, cut, strict=True)
    ]


def _kem_json(exchange: KemExchange, algorithm: str) -> dict[str, Any]:
    return {
        "algorithm": algorithm,
        "key_version": exchange.key_version,
        "public_key_sha384": hashlib.sha384(exchange.public_key).hexdigest(),
        "ciphertext": base64.b64encode(exchange.ciphertext).decode(),
    }


def _voided_request(descriptor: Any) -> tuple[str, str, int, str] | None:
    """(nonce, session, seq, type) of the request a ``keys.cancel`` names, or None if it names none."""
    if descriptor is None:
        return None
    if not isinstance(descriptor, dict):
        raise MessageRejected("keys.cancel: 'message' must name the cancelled request")
    nonce, session, seq = str(descriptor["nonce"]), str(descriptor["session"]), int(descriptor["seq"])
    msg_type = str(descriptor["type"])
    if len(nonce) != 32 or not 0 < len(session) <= 64 or seq < 0 or msg_type not in LEDGER_REQUESTS:
        raise MessageRejected("keys.cancel: 'message' does not name a ledger request")
    return nonce, session, seq, msg_type


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise MessageRejected("one-time pad and key differ in length")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")
