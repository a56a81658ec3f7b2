"""Get key with key IDs (ETSI GS QKD 014 ``dec_keys``, the slave's call) as one unit of work.

The key_IDs are checked by the domain rules first. The unit locks the named keys and judges them
(400 unknown or gone, 401 not a slave of them — the denial audited in a transaction of its own once
the request's was rolled back), decrypts them (re-deriving hybrid and fallback keys from the
request's ML-KEM exchange), marks this slave served and returns the audit entry ``keys.delivered``;
a retry inside the redelivery window gets the same keys again (``keys.redelivered``,
docs/DECISIONS.md D-14).

On SQLite, where one writer at a time is the limit, the plain case is prepared *before* the write
turn (:meth:`GetKeysWithIds._prepare_serve`), so that the turn only covers one guarded UPDATE.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from kms.crypto.hybrid import KeyDeriver
from kms.domain import errors
from kms.domain.delivery import (
    DeliveredKey,
    KemExchange,
    checked_key_ids,
    counterpart,
    plainly_servable,
    redeliver_until,
    redeliverable,
    why_unavailable,
)
from kms.domain.errors import InvalidRequest, NotEntitled
from kms.domain.keys import StoredExchange, StoredKey
from kms.domain.saes import SaeInfo
from kms.service import audit_recorder
from kms.service.audit_recorder import AuditEntry
from kms.service.context import DeliveryContext
from kms.service.group_commit import Unit, run_unit
from kms.service.hybrid_keys import HybridKeys, derived
from kms.storage import pool_repository as pool
from kms.storage.database import savepoint

Served = tuple[list[DeliveredKey], list[AuditEntry]]


class GetKeysWithIds:
    """Get key with key IDs for one KME."""

    def __init__(self, ctx: DeliveryContext, hybrid: HybridKeys) -> None:
        self.ctx = ctx
        self.hybrid = hybrid

    def check(self, slave: SaeInfo, master_sae_id: str, key_ids: Sequence[str]) -> list[str]:
        """The canonical key_IDs of a well-formed request from a known pair (400 if not)."""
        counterpart(self.ctx.registry, slave, master_sae_id, "master")
        return checked_key_ids(self.ctx.cfg, key_ids)

    def unit(self, slave: SaeInfo, master_sae_id: str, key_ids: list[str]) -> Unit[list[DeliveredKey]]:
        """The request's database work for the group commit; ``key_ids`` as :meth:`check` returned
        them. On SQLite the plain case comes prepared (see the module docstring)."""
        if self.ctx.db.is_sqlite:
            prepared = self._prepare_serve(slave, master_sae_id, key_ids)
            if prepared is not None:
                return prepared
        return lambda conn: self._serve(conn, slave, master_sae_id, key_ids, datetime.now(UTC))

    def run(self, slave: SaeInfo, master_sae_id: str, key_ids: Sequence[str]) -> list[DeliveredKey]:
        """The whole request in a transaction of its own (callers without a batcher)."""
        normalised = self.check(slave, master_sae_id, key_ids)
        try:
            return run_unit(self.ctx.db, self.unit(slave, master_sae_id, normalised))
        except NotEntitled:
            self.audit_denied(slave, master_sae_id, normalised)
            raise

    def audit_denied(self, slave: SaeInfo, master_sae_id: str, key_ids: list[str]) -> None:
        """Record a refused request (401): its own transaction, after the refusal."""
        entry = (
            f"sae:{slave.sae_id}",
            "access.denied",
            f"{master_sae_id}->{slave.sae_id}",
            {"key_IDs": key_ids},
        )
        audit_recorder.append_alone(self.ctx.db, [entry])

    def _prepare_serve(
        self, slave: SaeInfo, master_sae_id: str, key_ids: list[str]
    ) -> Unit[list[DeliveredKey]] | None:
        """SQLite: read, check and decrypt the keys *before* taking the write turn, so that the turn
        only covers one guarded UPDATE — it consumes the keys only if every one of them is still
        reserved for this slave and unexpired. If anything is not as expected (an error to report, a
        multicast key, a key that changed in between), the unit is the ordinary one, which re-reads
        under the turn and decides: errors and races are always judged under the write turn."""
        try:
            with self.ctx.db.read() as conn:
                stored = pool.load_keys_for_update(conn, key_ids)
                if not plainly_servable(stored, key_ids, master_sae_id, slave.sae_id, datetime.now(UTC)):
                    return None
                rows = pool.whole_rows(stored.values())
                if rows is None:  # part of a run: split under the write turn by the ordinary unit
                    return None
                delivered = self._recover_all(conn, stored, key_ids)
        except Exception:  # let the ordinary unit meet (and report) it under the write turn
            return None

        def serve(conn: Connection) -> Served:
            at = datetime.now(UTC)
            until = redeliver_until(self.ctx.cfg, at)
            try:
                with savepoint(conn, "qkms_prepared"):
                    if not pool.consume_if_unchanged(conn, rows, slave.sae_id, at, until):
                        raise _Changed
            except _Changed:
                return self._serve(conn, slave, master_sae_id, key_ids, at)
            return delivered, [_delivered_entry(slave, master_sae_id, key_ids, key_ids)]

        return serve

    def _serve(
        self, conn: Connection, slave: SaeInfo, master_sae_id: str, key_ids: list[str], now: datetime
    ) -> Served:
        stored = pool.load_keys_for_update(conn, key_ids)
        missing = [k for k in key_ids if k not in stored or stored[k].master_sae_id != master_sae_id]
        if missing:
            raise InvalidRequest(errors.MSG_KEYS_NOT_FOUND, [{"key_ID": k} for k in missing])
        if any(slave.sae_id not in stored[k].recipients for k in key_ids):
            raise NotEntitled("the requesting SAE is not a slave of one or more of the requested keys")
        reasons = {k: why_unavailable(stored[k], slave.sae_id, now) for k in key_ids}
        gone = [{"key_ID": k, "reason": r} for k, r in reasons.items() if r]
        if gone:
            if redeliverable(self.ctx.cfg, stored, key_ids, slave.sae_id, now):
                return self._redeliver(conn, stored, slave, master_sae_id, key_ids)
            raise InvalidRequest(errors.MSG_KEYS_NOT_FOUND, gone)
        delivered = self._recover_all(conn, stored, key_ids)
        until = redeliver_until(self.ctx.cfg, now)
        consumed = pool.mark_served(conn, (stored[k] for k in key_ids), slave.sae_id, now, until)
        return delivered, [_delivered_entry(slave, master_sae_id, key_ids, consumed)]

    def _redeliver(
        self,
        conn: Connection,
        stored: Mapping[str, StoredKey],
        slave: SaeInfo,
        master_sae_id: str,
        key_ids: list[str],
    ) -> Served:
        """The same keys again, identical bytes, changing no key row: audited as its own action."""
        delivered = self._recover_all(conn, stored, key_ids)
        entry: AuditEntry = (
            f"sae:{slave.sae_id}",
            "keys.redelivered",
            f"{master_sae_id}->{slave.sae_id}",
            {"key_IDs": key_ids},
        )
        return delivered, [entry]

    def _recover_all(
        self, conn: Connection, stored: Mapping[str, StoredKey], key_ids: list[str]
    ) -> list[DeliveredKey]:
        """The named keys as the slave receives them: decrypted and, for hybrid or fallback keys,
        re-derived with the request's ML-KEM secret (decapsulated once per exchange)."""
        exchange_ids = [e for e in (stored[k].kem_exchange_id for k in key_ids) if e is not None]
        exchanges = pool.load_exchanges(conn, exchange_ids)
        secrets = {ex_id: self._decapsulated(ex) for ex_id, ex in exchanges.items()}
        derivers: dict[tuple[Any, ...], KeyDeriver] = {}
        return [self._recover(stored[k], secrets, derivers) for k in key_ids]

    def _decapsulated(self, exchange: StoredExchange) -> KemExchange:
        identity = self.ctx.identity
        public = identity.public_key("kem", exchange.kem_key_version)
        secret = identity.decapsulate(exchange.kem_key_version, exchange.ciphertext)
        return KemExchange(0, exchange.kem_key_version, public.public_key, exchange.ciphertext, secret)

    def _recover(
        self,
        key: StoredKey,
        secrets: Mapping[int, KemExchange],
        derivers: dict[tuple[Any, ...], KeyDeriver],
    ) -> DeliveredKey:
        material = key.material
        qkd = self.ctx.envelope.open(material, pool.key_aad(key.key_id)) if material is not None else None
        if key.kem_exchange_id is None or key.suite is None:
            assert qkd is not None  # a plain QKD key always has material while deliverable
            return DeliveredKey(key.key_id, qkd)
        # One deriver per request's context (the keys of one request share it).
        shared = (key.kem_exchange_id, key.suite, key.master_sae_id, key.slave_sae_id, key.source_kme_id)
        deriver = derivers.get(shared)
        if deriver is None:
            slave = self.ctx.registry.get(key.slave_sae_id) or SaeInfo(
                key.slave_sae_id, key.target_kme_id, ""
            )
            deriver = derivers[shared] = self.hybrid.key_deriver(
                secrets[key.kem_exchange_id], key.suite, key.master_sae_id, slave, key.source_kme_id
            )
        return DeliveredKey(key.key_id, derived(deriver, qkd, key.key_id, key.size_bits))


def _delivered_entry(
    slave: SaeInfo, master_sae_id: str, key_ids: list[str], consumed: list[str]
) -> AuditEntry:
    """The audit entry of keys served to ``slave`` (``consumed``: those no slave still awaits)."""
    return (
        f"sae:{slave.sae_id}",
        "keys.delivered",
        f"{master_sae_id}->{slave.sae_id}",
        {"key_IDs": key_ids, "consumed": consumed},
    )


class _Changed(Exception):
    """Internal: a prepared request found its keys changed; the ordinary unit decides."""
