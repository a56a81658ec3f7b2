"""What every key-delivery use case works with, and the port to other KMEs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kms.config import PoolSection
from kms.crypto.envelope import Envelope
from kms.crypto.identity import KmeIdentity
from kms.domain.delivery import DeliveredKey
from kms.domain.policy import PairPolicy, PolicyBook
from kms.domain.saes import SaeInfo, SaeRegistry
from kms.storage.database import Database


class RemoteDelivery(Protocol):
    """Keys for slaves at other KMEs (``kms.peer``): the use cases only know this interface."""

    def get_keys(
        self,
        master: SaeInfo,
        slave: SaeInfo,
        recipients: list[str],
        number: int,
        size: int,
        policy: PairPolicy,
    ) -> list[DeliveredKey]: ...

    def available_keys(self, target_kme_id: str, key_size: int) -> int: ...


@dataclass
class DeliveryContext:
    """One KME as the use cases see it: its ID and pool limits, the database, the KEK envelope, the
    SAE registry and pair policies, its PQC identity and, with peers, the network to other KMEs
    (set after the network is built, hence mutable)."""

    kme_id: str
    cfg: PoolSection
    db: Database
    envelope: Envelope
    registry: SaeRegistry
    policies: PolicyBook
    identity: KmeIdentity
    remote: RemoteDelivery | None = None

    def is_local(self, kme_id: str) -> bool:
        return kme_id == self.kme_id
