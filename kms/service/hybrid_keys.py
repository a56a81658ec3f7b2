"""Hybrid and PQC-fallback keys (docs/DECISIONS.md D-4): one ML-KEM encapsulation per request,
recorded for the keys it protects, and each key derived from it with its own key_ID bound in.
Shared by Get key, Get key with key IDs and the peer ledger (``kms.peer``)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection

from kms.crypto.hybrid import HybridContext, KeyDeriver
from kms.crypto.pqc.base import KemAlgorithm
from kms.domain.delivery import DeliveredKey, KemExchange
from kms.domain.errors import ServiceUnavailable
from kms.domain.keys import CutKey
from kms.domain.policy import PairPolicy
from kms.domain.saes import SaeInfo
from kms.service.context import DeliveryContext
from kms.storage import pool_repository as pool


class HybridKeys:
    """Encapsulation to a KME's ML-KEM key and derivation of the keys an SAE receives."""

    def __init__(self, ctx: DeliveryContext) -> None:
        self.ctx = ctx

    def encapsulate_local(
        self, conn: Connection, policy: PairPolicy, target_kme_id: str, at: datetime
    ) -> KemExchange:
        """To this KME's own active ML-KEM key (a local slave); keys for another KME go through
        ``kms.peer``, which knows that KME's public key."""
        if not self.ctx.is_local(target_kme_id):
            raise ServiceUnavailable(f"no ML-KEM public key is known for KME {target_kme_id}")
        info = self.ctx.identity.active_public("kem")
        return self.encapsulate_to(
            conn, policy, target_kme_id, info.algorithm, info.version, info.public_key, at
        )

    def encapsulate_to(
        self,
        conn: Connection,
        policy: PairPolicy,
        target_kme_id: str,
        algorithm: str,
        version: int,
        public_key: bytes,
        at: datetime,
    ) -> KemExchange:
        """One ML-KEM encapsulation to ``target_kme_id``'s public key, recorded for the keys it protects."""
        if algorithm != policy.kem:
            raise ServiceUnavailable(
                f"KME {target_kme_id}'s ML-KEM key is {algorithm}, the policy asks for {policy.kem}"
            )
        ciphertext, secret = self.ctx.identity.kem.encapsulate(KemAlgorithm(algorithm), public_key)
        exchange_id = pool.insert_kem_exchange(
            conn, algorithm, target_kme_id, version, hashlib.sha384(public_key).hexdigest(), ciphertext, at
        )
        return KemExchange(exchange_id, version, public_key, ciphertext, secret)

    def delivered(
        self,
        cut: Sequence[CutKey],
        exchange: KemExchange | None,
        suite: str | None,
        master_sae_id: str,
        slave: SaeInfo,
        size: int,
    ) -> list[DeliveredKey]:
        """What the master receives: the QKD bits, or the hybrid / fallback keys derived with ML-KEM."""
        if not (exchange and suite):
            return [DeliveredKey(c.key_id, c.material or b"") for c in cut]
        deriver = self.key_deriver(exchange, suite, master_sae_id, slave)
        return [DeliveredKey(c.key_id, derived(deriver, c.material, c.key_id, size)) for c in cut]

    def key_deriver(
        self,
        exchange: KemExchange,
        suite: str,
        master_sae_id: str,
        slave: SaeInfo,
        master_kme_id: str | None = None,
    ) -> KeyDeriver:
        """How a request's keys are derived: QKD bits and the ML-KEM secret combined, or ML-KEM
        alone; each key binds its own key_ID."""
        shared = HybridContext(
            suite=suite,
            key_id="",
            master_kme_id=master_kme_id or self.ctx.kme_id,
            slave_kme_id=slave.kme_id,
            master_sae_id=master_sae_id,
            slave_sae_id=slave.sae_id,
            kem_public_key=exchange.public_key,
            kem_ciphertext=exchange.ciphertext,
        )
        return KeyDeriver(exchange.secret, shared)


def derived(deriver: KeyDeriver, qkd: bytes | None, key_id: str, size_bits: int) -> bytes:
    """A hybrid key from the QKD bits, or a PQC-fallback key where there are none."""
    return deriver.fallback(key_id, size_bits // 8) if qkd is None else deriver.hybrid(qkd, key_id)
