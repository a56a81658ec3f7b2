"""One KME's key-delivery use cases behind one object, for callers that run them synchronously
(the runtime, the CLI, the peer network, tests) and for the API's gateway (``kms.service.gateway``).

Each use case lives in its own module and is one unit of work: ``get_keys`` (Get key),
``get_keys_with_ids`` (Get key with key IDs), ``status`` (Get status), ``expiry`` (the sweep). This
class only wires them to one :class:`~kms.service.context.DeliveryContext`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kms.config import PoolSection
from kms.crypto.envelope import Envelope
from kms.crypto.hybrid import KeyDeriver
from kms.crypto.identity import KmeIdentity
from kms.domain.delivery import DeliveredKey, KemExchange, KeyOrder, Status
from kms.domain.policy import PolicyBook
from kms.domain.saes import SaeInfo, SaeRegistry
from kms.service.context import DeliveryContext, RemoteDelivery
from kms.service.expiry import sweep_expired
from kms.service.get_keys import GetKeys
from kms.service.get_keys_with_ids import GetKeysWithIds
from kms.service.group_commit import Unit
from kms.service.hybrid_keys import HybridKeys
from kms.service.status import GetStatus
from kms.storage.database import Database


class KeyDeliveryService:
    """Get status, Get key, Get key with key IDs and the expiry sweep of one KME."""

    def __init__(
        self,
        kme_id: str,
        pool_cfg: PoolSection,
        db: Database,
        envelope: Envelope,
        registry: SaeRegistry,
        policies: PolicyBook,
        identity: KmeIdentity,
        remote: RemoteDelivery | None = None,
    ) -> None:
        self.ctx = DeliveryContext(kme_id, pool_cfg, db, envelope, registry, policies, identity, remote)
        self.hybrid = HybridKeys(self.ctx)
        self.keys = GetKeys(self.ctx, self.hybrid)
        self.keys_with_ids = GetKeysWithIds(self.ctx, self.hybrid)
        self.statuses = GetStatus(self.ctx)

    @property
    def remote(self) -> RemoteDelivery | None:
        return self.ctx.remote

    @remote.setter
    def remote(self, value: RemoteDelivery | None) -> None:
        """Set once the peer network exists (it needs this service in turn)."""
        self.ctx.remote = value

    # -- Get status ----------------------------------------------------------------------------
    def status(self, master: SaeInfo, slave_sae_id: str) -> Status:
        return self.statuses.run(master, slave_sae_id)

    # -- Get key -------------------------------------------------------------------------------
    def get_keys(
        self,
        master: SaeInfo,
        slave_sae_id: str,
        number: int | None = None,
        size: int | None = None,
        additional_slave_sae_ids: Sequence[str] = (),
        extension_mandatory: Sequence[Mapping[str, Any]] = (),
    ) -> list[DeliveredKey]:
        """Get key, in a transaction of its own (the API group-commits :meth:`get_keys_unit`)."""
        order = self.keys.check(
            master, slave_sae_id, number, size, additional_slave_sae_ids, extension_mandatory
        )
        return self.keys.run(order)

    def get_keys_unit(
        self,
        master: SaeInfo,
        slave_sae_id: str,
        number: int | None = None,
        size: int | None = None,
        additional_slave_sae_ids: Sequence[str] = (),
        extension_mandatory: Sequence[Mapping[str, Any]] = (),
    ) -> Unit[list[DeliveredKey]] | None:
        """Check a Get key request and return its database work as a group-commit unit; None if the
        slave is at another KME (then :meth:`get_keys` goes through the peer network)."""
        order = self.keys.check(
            master, slave_sae_id, number, size, additional_slave_sae_ids, extension_mandatory
        )
        return None if self.keys.is_remote(order) else self.keys.unit(order)

    def _key_request(
        self,
        master: SaeInfo,
        slave_sae_id: str,
        number: int | None,
        size: int | None,
        additional_slave_sae_ids: Sequence[str],
        extension_mandatory: Sequence[Mapping[str, Any]],
    ) -> KeyOrder:
        """The checked request (tests build peer ledger entries from it)."""
        return self.keys.check(
            master, slave_sae_id, number, size, additional_slave_sae_ids, extension_mandatory
        )

    # -- Get key with key IDs ------------------------------------------------------------------
    def get_keys_with_ids(
        self, slave: SaeInfo, master_sae_id: str, key_ids: Sequence[str]
    ) -> list[DeliveredKey]:
        """Get key with key IDs, in a transaction of its own (the API group-commits the unit)."""
        return self.keys_with_ids.run(slave, master_sae_id, key_ids)

    def get_keys_with_ids_unit(
        self, slave: SaeInfo, master_sae_id: str, key_ids: Sequence[str]
    ) -> tuple[Unit[list[DeliveredKey]], list[str]]:
        """Check a Get key with key IDs request; its database work as a unit, and the canonical
        key_IDs (for :meth:`audit_denied` if the unit raises NotEntitled)."""
        normalised = self.keys_with_ids.check(slave, master_sae_id, key_ids)
        return self.keys_with_ids.unit(slave, master_sae_id, normalised), normalised

    def audit_denied(self, slave: SaeInfo, master_sae_id: str, key_ids: list[str]) -> None:
        """Record a refused Get key with key IDs (401): its own transaction, after the refusal."""
        self.keys_with_ids.audit_denied(slave, master_sae_id, key_ids)

    # -- housekeeping --------------------------------------------------------------------------
    def expire_reserved(self) -> int:
        """One expiry sweep (``kms.service.expiry``); how many reserved keys expired."""
        return sweep_expired(self.ctx.db, self.ctx.kme_id)

    # -- for the peer network (kms.peer) --------------------------------------------------------
    def key_deriver(
        self,
        exchange: KemExchange,
        suite: str,
        master_sae_id: str,
        slave: SaeInfo,
        master_kme_id: str | None = None,
    ) -> KeyDeriver:
        return self.hybrid.key_deriver(exchange, suite, master_sae_id, slave, master_kme_id)
