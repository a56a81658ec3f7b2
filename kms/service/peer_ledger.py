"""Keys for a slave at another KME, the master's side (DECISIONS.md D-20): the units around the ledger
message that ``kms.peer.ledger_master`` sends.

``prepare`` (transaction 1) cuts a request's keys from this KME's pieces of the link toward the
first hop and records them ``pre_active`` without material; ``settle`` (transaction 2) makes them
``consumed`` once the peer's signed receipt says it recorded them — the master gets them, the slave
fetches them at its own KME — or ``destroyed`` if it did not: their bits are discarded, never served.
Either way the settlement is audited in its transaction (``keys.reserved`` / ``keys.discarded``). No
key reaches the master before the peer has recorded it, and a lost answer can never leave bits that
two KMEs use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Connection

from kms.domain.delivery import DeliveredKey, KemExchange, KeyOrder
from kms.domain.errors import DeliveryError, ServiceUnavailable
from kms.domain.keys import CutKey
from kms.domain.lifecycle import KeyState
from kms.domain.policy import POLICY_FALLBACK, PairPolicy
from kms.service import audit_recorder
from kms.service.delivery import KeyDeliveryService
from kms.service.peer_context import PeerSite
from kms.storage import peer_repository as peers
from kms.storage import pool_repository as pool
from kms.storage.database import savepoint


class KemPublicKey(Protocol):
    """Another KME's ML-KEM public key (``kms.peer.bundle.PublicKey``)."""

    @property
    def algorithm(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def public_key(self) -> bytes: ...


@dataclass
class Prepared:
    """A request's keys, cut and recorded ``pre_active`` here, waiting for the peer's receipt."""

    order: KeyOrder
    cut: list[CutKey]
    exchange: KemExchange | None
    suite: str | None
    fallback: bool  # the link was short and the pair's policy allows PQC fallback

    @property
    def policy_name(self) -> str:
        return POLICY_FALLBACK if self.fallback else self.order.policy.mode.value

    @property
    def key_ids(self) -> list[str]:
        return [c.key_id for c in self.cut]

    @property
    def actor(self) -> str:
        return f"sae:{self.order.master.sae_id}"

    @property
    def subject(self) -> str:
        return f"{self.order.master.sae_id}->{self.order.slave.sae_id}"


Settlement = tuple[str, str, list[str], bool, dict[str, Any]]
"""(actor, subject, key_IDs, recorded by the peer, what the audit record adds)."""


class PeerLedger:
    """The master side's units of work. ``delivery`` (the KME's key-delivery service: cutting,
    ML-KEM encapsulation, hybrid derivation) is set once both exist."""

    def __init__(self, site: PeerSite, kem_key: Callable[[str], KemPublicKey | None]) -> None:
        self.site = site
        self.kem_key = kem_key
        self.delivery: KeyDeliveryService | None = None

    def prepare_all(self, orders: Sequence[KeyOrder], peer_id: str) -> list[Prepared | DeliveryError]:
        """Transaction 1 for a batch toward ``peer_id``: each order on its own savepoint, so one that
        cannot be served (its error in its place) does not fail the others."""
        at = datetime.now(UTC)
        events = pool.EventBatch(at)
        out: list[Prepared | DeliveryError] = []
        with self.site.db.write() as conn:
            for order in orders:
                mark = len(events.rows)
                try:
                    with savepoint(conn):
                        out.append(self.prepare(conn, order, peer_id, events, at))
                except DeliveryError as exc:
                    del events.rows[mark:]
                    out.append(exc)
            events.flush(conn)
        return out

    def prepare_one(self, order: KeyOrder, first_hop: str) -> Prepared:
        """Transaction 1 for one relayed request."""
        at = datetime.now(UTC)
        events = pool.EventBatch(at)
        with self.site.db.write() as conn:
            prepared = self.prepare(conn, order, first_hop, events, at)
            events.flush(conn)
        return prepared

    def prepare(
        self, conn: Connection, order: KeyOrder, peer_id: str, events: pool.EventBatch, at: datetime
    ) -> Prepared:
        """Cut ``order``'s keys toward ``peer_id`` and record them ``pre_active`` without material,
        in the caller's transaction."""
        assert self.delivery is not None
        cut = self.delivery.keys.cut(
            conn, peer_id, order.number, order.size, order.policy, events, f"sae:{order.master.sae_id}"
        )
        # Short or suspended link and a pair that allows it: ML-KEM-only keys, made for the slave's
        # KME (it decapsulates with its own key), recorded there like any other.
        fallback = cut[0].material is None
        suite = order.policy.suite(fallback)
        exchange = self._encapsulate_to(conn, order.policy, order.slave.kme_id, at) if suite else None
        prepared = Prepared(order, cut, exchange, suite, fallback)
        pool.insert_reserved_keys(
            conn,
            self.site.envelope,
            cut,
            size_bits=order.size,
            master_sae_id=order.master.sae_id,
            slave_sae_ids=order.recipients,
            target_kme_id=order.slave.kme_id,
            ttl=timedelta(seconds=self.site.cfg.reserved_ttl_seconds),
            policy=prepared.policy_name,
            suite=suite,
            kem_exchange_id=exchange.exchange_id if exchange else None,
            at=at,
            state=KeyState.PRE_ACTIVE,
            keep_material=False,
        )
        return prepared

    def settle(self, items: Sequence[Settlement]) -> None:
        """Transaction 2: recorded keys become ``consumed`` here, the others ``destroyed``; audited."""
        at = datetime.now(UTC)
        with self.site.db.write() as conn:
            entries: list[audit_recorder.AuditEntry] = []
            for actor, subject, key_ids, ok, record in items:
                target = KeyState.CONSUMED if ok else KeyState.DESTROYED
                reason = "recorded by the slave's KME" if ok else f"peer failed: {record.get('reason')}"
                peers.close_pending_keys(conn, key_ids, target, actor, reason, at)
                action = "keys.reserved" if ok else "keys.discarded"
                entries.append((actor, action, subject, {"key_IDs": key_ids, **record}))
            audit_recorder.append(conn, entries, at)

    def delivered(self, prepared: Prepared) -> list[DeliveredKey]:
        """The master's keys once the peer recorded them (hybrid keys derived now, outside any
        transaction)."""
        assert self.delivery is not None
        order = prepared.order
        return self.delivery.hybrid.delivered(
            prepared.cut, prepared.exchange, prepared.suite, order.master.sae_id, order.slave, order.size
        )

    def _encapsulate_to(self, conn: Connection, policy: PairPolicy, target: str, at: datetime) -> KemExchange:
        assert self.delivery is not None
        key = self.kem_key(target)
        if key is None:
            raise ServiceUnavailable(
                f"no ML-KEM public key is known for KME {target}; import its peer bundle"
            )
        return self.delivery.hybrid.encapsulate_to(
            conn, policy, target, key.algorithm, key.version, key.public_key, at
        )
