"""Keys for slaves at other KMEs, the master's side of the ledger (DECISIONS.md D-20): the messages.

The units of work are ``kms.service.peer_ledger``: cut the keys and record them ``pre_active``
without material (transaction 1), then ``consumed`` or ``destroyed`` (transaction 2). Between them
this module sends the signed ledger entry and waits for the peer's signed receipt. Requests to an
adjacent KME share one ``keys.record.batch`` (``batching``); a relayed request goes alone as
``keys.record`` to the first trusted node. Unreachable, late, refusing or failing peers leave the
keys ``destroyed`` and the master gets 503; a peer that may have acted is sent a ``keys.cancel``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from kms.domain.delivery import DeliveredKey, KeyOrder
from kms.domain.errors import DeliveryError, ServiceUnavailable
from kms.domain.ledger import kem_json
from kms.domain.policy import PairPolicy
from kms.domain.saes import SaeInfo
from kms.peer.batching import LedgerBatcher, LedgerRequest
from kms.peer.client import PeerClient, PeerError, PeerUnavailable, PeerUncertain
from kms.peer.directory import PeerDirectory
from kms.peer.messages import MessageRejected, PeerMessage
from kms.service.peer_ledger import PeerLedger, Prepared, Settlement

log = structlog.get_logger(__name__)
CANCEL_DELAYS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0)
MAX_ROUTES = 3  # routes tried for one relayed request when first hops do not answer


class NextHopUnreachable(ServiceUnavailable):
    """The first hop refused the connection: the entry never left this KME (its keys are destroyed
    here, audited), so another route may be tried within the same request."""


def entry_body(route: list[str], prepared: Prepared) -> dict[str, Any]:
    """The ledger entry for ``prepared``'s keys: what the next hop records or relays."""
    order, cut, exchange = prepared.order, prepared.cut, prepared.exchange
    return {
        "route": route,
        "hops": [{"from": route[0], "to": route[1], "links": sorted({c.link_id or "" for c in cut})}],
        "size": order.size,
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
        "master_SAE_ID": order.master.sae_id,
        "slave_SAE_IDs": order.recipients,
        "policy": prepared.policy_name,
        "suite": prepared.suite,
        "kem": kem_json(exchange, order.policy.kem) if exchange else None,
    }


class LedgerMaster:
    def __init__(
        self,
        kme_id: str,
        client: PeerClient,
        directory: PeerDirectory,
        ledger: PeerLedger,
        route_to: Callable[[str, int, frozenset[str]], list[str] | None],
        send_routed: Callable[[str, str, dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.kme_id = kme_id
        self.client = client
        self.directory = directory
        self.ledger = ledger
        self.route_to = route_to
        self.send_routed = send_routed
        self._batchers: dict[str, LedgerBatcher] = {}
        self._batchers_lock = threading.Lock()

    def _batcher(self, peer_id: str) -> LedgerBatcher:
        with self._batchers_lock:
            batcher = self._batchers.get(peer_id)
            if batcher is None:
                batcher = self._batchers[peer_id] = LedgerBatcher(self.deliver_batch, peer_id)
            return batcher

    def get_keys(
        self,
        master: SaeInfo,
        slave: SaeInfo,
        recipients: list[str],
        number: int,
        size: int,
        policy: PairPolicy,
    ) -> list[DeliveredKey]:
        """Deliver over the best route; if its first hop turns out unreachable (the entry never left
        this KME), try the next-best route avoiding it, up to ``MAX_ROUTES`` routes in all."""
        order = KeyOrder(master, slave, recipients, number, size, policy)
        avoid: frozenset[str] = frozenset()
        for attempt in range(MAX_ROUTES):
            route = self._route(order, avoid)
            if len(route) == 2:
                return self._batcher(slave.kme_id).submit(LedgerRequest(order))
            # Relayed: one request at a time through the trusted nodes (each hop waits on the next).
            prepared = self.ledger.prepare_one(order, route[1])
            try:
                self.send_and_settle(
                    route[1], entry_body(route, prepared), prepared.key_ids, prepared.actor, prepared.subject
                )
            except NextHopUnreachable:
                if attempt + 1 == MAX_ROUTES:
                    raise
                avoid = avoid | {route[1]}
                log.info("relay_rerouted", avoiding=sorted(avoid), target=slave.kme_id)
                continue
            except ServiceUnavailable:
                # Some KME of the route may have recorded the keys before another failed.
                self._withdraw_along(route, prepared.key_ids)
                raise
            return self.ledger.delivered(prepared)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _route(self, order: KeyOrder, avoid: frozenset[str]) -> list[str]:
        target = order.slave.kme_id
        route = self.route_to(target, order.number * order.size, avoid)
        peer = self.directory.get(target)
        if (
            route is None
            and order.policy.pqc_fallback
            and peer is not None
            and peer.url
            and target not in avoid
        ):
            route = [self.kme_id, target]  # the link cannot carry it; PQC fallback to the adjacent KME may
        if route is None:
            raise ServiceUnavailable(
                f"no route to KME {target} with {order.number * order.size} bits of key on every hop"
                + (f" avoiding {', '.join(sorted(avoid))}, which did not answer" if avoid else "")
                + "; retry later",
                [{"target_KME_ID": target}],
            )
        if self.client.recently_unreachable(route[1]):
            raise ServiceUnavailable(
                f"KME {route[1]} is unreachable; no key bits were used, retry later",
                [{"peer_KME_ID": route[1]}],
            )
        return route

    def deliver_batch(
        self, peer_id: str, batch: list[LedgerRequest], sending: Callable[[], None] = lambda: None
    ) -> None:
        """Cut, record at ``peer_id`` and settle a batch of requests (see ``kms.peer.batching``);
        ``sending`` is told when the cut is done and the message goes out (the batcher's pacing)."""
        prepared: list[tuple[LedgerRequest, Prepared]] = []
        for req, outcome in zip(
            batch, self.ledger.prepare_all([r.order for r in batch], peer_id), strict=True
        ):
            if isinstance(outcome, DeliveryError):
                req.future.set_exception(outcome)
            else:
                prepared.append((req, outcome))
        if not prepared:
            return
        entries = [entry_body([self.kme_id, peer_id], p) for _, p in prepared]
        sending()
        try:
            reply = self.client.call(peer_id, "keys.record.batch", {"entries": entries})
            results = list(reply.body["results"])
            if len(results) != len(prepared):
                raise PeerUncertain(peer_id, "its receipt does not cover every entry")
        except PeerError as exc:
            failure = self._peer_failed(
                peer_id, exc, [(p.actor, p.subject, p.key_ids) for _, p in prepared], self.kme_id
            )
            for req, _ in prepared:
                req.future.set_exception(failure)
            return
        self.ledger.settle(
            [_settlement(peer_id, reply.nonce, p, res) for (_, p), res in zip(prepared, results, strict=True)]
        )
        for (req, p), res in zip(prepared, results, strict=True):
            if not res.get("ok"):
                req.future.set_exception(
                    ServiceUnavailable(
                        f"KME {peer_id} refused the keys: {str(res.get('error'))[:200]}; retry later"
                    )
                )
                continue
            req.future.set_result(self.ledger.delivered(p))

    def send_and_settle(
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
        self.ledger.settle([(actor, subject, key_ids, True, record)])

    def _peer_failed(
        self, peer_id: str, exc: PeerError, requests: list[tuple[str, str, list[str]]], origin: str
    ) -> ServiceUnavailable:
        """The peer did not (or may not have) recorded these requests' keys: destroy them here, ask the
        peer to withdraw them if it may have acted, and give the 503 the masters get."""
        record = {"peer": peer_id, "reason": exc.reason}
        self.ledger.settle([(actor, subject, key_ids, False, record) for actor, subject, key_ids in requests])
        if isinstance(exc, PeerUncertain):
            self._cancel_later(peer_id, origin, [k for _, _, key_ids in requests for k in key_ids], exc.sent)
        error = NextHopUnreachable if isinstance(exc, PeerUnavailable) else ServiceUnavailable
        return error(
            f"KME {peer_id} did not record the keys ({exc.reason}); no key was delivered and their bits"
            " were discarded; retry later",
            [{"peer_KME_ID": peer_id}],
        )

    def _withdraw_along(self, route: list[str], key_ids: list[str]) -> None:
        """A relayed request failed: ask every KME of its route to withdraw its keys, end to end and
        signed by this KME, around a dead node if need be (``kms.peer.routed``); in the background,
        retried like ``_cancel_later``."""
        if self.send_routed is None:
            return
        send = self.send_routed
        body: dict[str, Any] = {"origin": self.kme_id, "key_IDs": key_ids}

        def withdraw(node: str) -> None:
            for delay in CANCEL_DELAYS:
                time.sleep(delay)
                try:
                    send(node, "keys.cancel", body)
                    return
                except (PeerError, MessageRejected) as exc:
                    log.info("relay_withdraw_failed", node=node, error=str(exc)[:200])

        for node in route[1:]:
            threading.Thread(target=withdraw, args=(node,), name="qkms-relay-withdraw", daemon=True).start()

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
            for delay in CANCEL_DELAYS:
                time.sleep(delay)
                try:
                    self.client.call(peer_id, "keys.cancel", body)
                    return
                except PeerError as exc:
                    log.info("peer_cancel_failed", peer=peer_id, error=exc.reason)

        threading.Thread(target=cancel, name="qkms-peer-cancel", daemon=True).start()


def _settlement(peer_id: str, receipt_nonce: str, p: Prepared, res: dict[str, Any]) -> Settlement:
    """How one entry of a batch settles, as the peer's result for it says."""
    ok = bool(res.get("ok"))
    record: dict[str, Any] = (
        {
            "peer": peer_id,
            "receipt_nonce": receipt_nonce,
            "size": p.order.size,
            "slaves": p.order.recipients,
            "policy": p.policy_name,
            "suite": p.suite,
        }
        if ok
        else {"peer": peer_id, "reason": str(res.get("error"))[:300]}
    )
    return (p.actor, p.subject, p.key_ids, ok, record)
