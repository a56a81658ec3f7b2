"""This KME in the network: one object that the runtime, the peer endpoint and the background jobs
hold, and the dispatcher of received peer messages.

Each responsibility lives in its own module, over the units of work in ``kms.service``:

- ``ledger_master``: keys for slaves at other KMEs (``get_keys``; ``kms.service.peer_ledger``);
- ``ledger_peer``: the ledger kept for peers and relay at a trusted node (``keys.record``,
  ``keys.record.batch``, ``keys.cancel``; ``kms.service.peer_records``, ``peer_relay``);
- ``mirror``: block confirmation and rebalancing of pieces (``blocks.announce``, ``pieces.claim``;
  ``kms.service.peer_mirror``);
- ``topology``: own links, every KME's links from its signed link-state record, and routes;
- ``flooding``: this KME's link-state record issued, others' kept and passed on (``topology``,
  ``topology.flood``);
- ``routed``: signed control messages to non-adjacent KMEs, carried by the trusted nodes
  (``relay.forward``: a failed relay's withdrawals);
- ``sae_notices``: an SAE of this KME suspended, resumed or revoked, told to every KME (``sae.state``);
- ``restore_notices``: an adjacent KME restored from a backup (``store.restored``).

Other peer services add handlers by message type to ``extra_handlers`` (the audit copies:
``kms.peer.countersign``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from kms.config import PeeringSection, PoolSection
from kms.crypto.envelope import Envelope
from kms.crypto.identity import KmeIdentity
from kms.crypto.peer_mac import derive_mac_key
from kms.crypto.pqc.base import PqcError
from kms.domain.delivery import DeliveredKey
from kms.domain.errors import PeerRequestRefused
from kms.domain.policy import PairPolicy
from kms.domain.saes import SaeInfo, SaeRegistry
from kms.peer.client import PeerClient
from kms.peer.directory import PeerDirectory
from kms.peer.flooding import LinkStateFlood
from kms.peer.ledger_master import LedgerMaster
from kms.peer.ledger_peer import LedgerPeer
from kms.peer.messages import MessageRejected, PeerMessage
from kms.peer.mirror import Mirror
from kms.peer.restore_notices import RestoredPeers
from kms.peer.routed import RoutedMessages
from kms.peer.routing import Edge
from kms.peer.sae_notices import SaeNotices
from kms.peer.topology import Router
from kms.service.delivery import KeyDeliveryService
from kms.service.group_commit import Unit
from kms.service.link_state_store import LinkStateStore
from kms.service.link_stock import LinkStock
from kms.service.peer_context import PeerSite
from kms.service.peer_ledger import PeerLedger
from kms.service.peer_mac_keys import PeerMacKeys
from kms.service.peer_records import PeerRecords
from kms.service.peer_relay import PeerRelay
from kms.storage.database import Database
from qkd_adapters.keyblock import FollowerKeySource

Handler = Callable[[PeerMessage], dict[str, Any]]
T = TypeVar("T")


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
        site = PeerSite(kme_id, pool_cfg, db, envelope, identity, registry)
        stock = LinkStock(site)
        store = LinkStateStore(db)
        self.router = Router(stock, self.client, store, peering.link_state_max_age_seconds)
        self.flood = LinkStateFlood(stock, self.client, directory, identity, store, peering)
        self.ledger = PeerLedger(site, directory.kem_key)
        self.routed = RoutedMessages(
            self.client, directory, identity, peering, self.router.route_to, lambda m: self.handle(m)
        )
        self.master = LedgerMaster(
            kme_id, self.client, directory, self.ledger, self.router.route_to, self.routed.send
        )
        records = PeerRecords(site)
        self.receiver = LedgerPeer(
            records, PeerRelay(site, records), self.master.send_and_settle, pool_cfg.max_key_per_request
        )
        self.mirror = Mirror(stock, self.client, directory, self.followers)
        self.mac_keys = PeerMacKeys(db, envelope)
        self.sae_notices = SaeNotices(db, directory, self.routed)
        self._handlers: dict[str, Handler] = {
            "keys.record": self.receiver.on_record,
            "keys.record.batch": self.receiver.on_record_batch,
            "keys.cancel": self.receiver.on_cancel,
            "blocks.announce": self.mirror.on_announce,
            "topology": self.flood.on_sync,
            "topology.flood": self.flood.on_flood,
            "relay.forward": self.routed.on_forward,
            "session.key": self.on_session_key,
            "pieces.claim": self.mirror.on_claim,
            "sae.state": self.sae_notices.on_state,
            "store.restored": RestoredPeers(db).on_restored,
        }
        # Handlers of other peer services (audit copies: ``kms.peer.countersign``), by message type.
        self.extra_handlers: dict[str, Handler] = {}

    @property
    def service(self) -> KeyDeliveryService | None:
        """The KME's key-delivery service (cutting, ML-KEM, hybrid keys); set once both exist."""
        return self.ledger.delivery

    @service.setter
    def service(self, value: KeyDeliveryService | None) -> None:
        self.ledger.delivery = value

    # -- master side -----------------------------------------------------------------------------
    def get_keys(
        self,
        master: SaeInfo,
        slave: SaeInfo,
        recipients: list[str],
        number: int,
        size: int,
        policy: PairPolicy,
    ) -> list[DeliveredKey]:
        return self.master.get_keys(master, slave, recipients, number, size, policy)

    # -- routing ---------------------------------------------------------------------------------
    def own_edges(self) -> list[Edge]:
        return self.router.own_edges()

    def topology_tick(self) -> None:
        """The leader's link-state work (``kms.peer.flooding``): issue this KME's record when due."""
        self.flood.tick()

    def route_to(
        self, target_kme_id: str, needed_bits: int, avoid: frozenset[str] = frozenset()
    ) -> list[str] | None:
        return self.router.route_to(target_kme_id, needed_bits, avoid)

    def available_keys(self, target_kme_id: str, key_size: int) -> int:
        return self.router.available_keys(target_kme_id, key_size)

    # -- shared blocks ---------------------------------------------------------------------------
    def sync_once(self) -> int:
        return self.mirror.sync_once()

    def rebalance_once(self) -> int:
        return self.mirror.rebalance_once()

    # -- received messages -----------------------------------------------------------------------
    def handle(self, message: PeerMessage) -> dict[str, Any]:
        """Act on a verified message; the reply body. Raises ``MessageRejected`` (answered as a signed
        error) when it must not be acted on."""
        self.client.heard_from(message.sender)
        handler = self.extra_handlers.get(message.type) or self._handlers.get(message.type)
        if handler is None:
            raise MessageRejected(f"unknown message type {message.type!r}")
        return self._refusing(message, lambda: handler(message))

    def group_unit(self, message: PeerMessage) -> Unit[list[dict[str, Any]]] | None:
        """A verified message whose work is a unit the API's group commit can run with the SAEs' own
        requests (``keys.record.batch``), or None: :meth:`handle` it. Raises ``MessageRejected``."""
        if message.type != "keys.record.batch" or message.type in self.extra_handlers:
            return None
        self.client.heard_from(message.sender)
        return self._refusing(message, lambda: self.receiver.record_batch_unit(message))

    def _refusing(self, message: PeerMessage, act: Callable[[], T]) -> T:
        """``act()``, its refusals raised as :meth:`refusal` says (anything else as it was)."""
        try:
            return act()
        except Exception as exc:
            refused = self.refusal(message, exc)
            if refused is None or refused is exc:
                raise
            raise refused from exc

    @staticmethod
    def refusal(message: PeerMessage, exc: Exception) -> MessageRejected | None:
        """The signed error that acting on ``message`` answers when it raised ``exc``: a refusal or a
        malformed body; None for anything else (a fault of this KME, not of the message)."""
        if isinstance(exc, MessageRejected):
            return exc
        if isinstance(exc, PeerRequestRefused):
            return MessageRejected(exc.reason)
        if isinstance(exc, (ValueError, KeyError, TypeError)):  # a storage LedgerConflict is a ValueError
            return MessageRejected(f"cannot act on {message.type}: {exc}"[:300])
        return None

    def on_session_key(self, message: PeerMessage) -> dict[str, Any]:
        """``session.key`` (signed): a neighbour's MAC key for its next messages (``mac_sessions``)."""
        if not self.client.cfg.hop_macs:
            raise MessageRejected("MAC keys are off at this KME (peering.hop_macs = false); sign instead")
        body = message.body
        key_id = str(body["key_id"])
        if not 8 <= len(key_id) <= 32 or not all(c in "0123456789abcdef" for c in key_id):
            raise MessageRejected("a MAC key ID is 8 to 32 lowercase hex digits")
        try:
            shared = self.identity.decapsulate(
                int(body["kem_version"]), base64.b64decode(str(body["ciphertext"]))
            )
        except (PqcError, RuntimeError, binascii.Error) as exc:
            raise MessageRejected(f"the MAC key's ciphertext does not decapsulate here: {exc}"[:200]) from exc
        self.mac_keys.accept(message, key_id, derive_mac_key(shared, message.sender, self.kme_id, key_id))
        return {"accepted": key_id}

    def close(self) -> None:
        self.client.close()
