"""Get key (ETSI GS QKD 014 ``enc_keys``, the master's call) as one unit of work.

The request is checked by the domain rules (``kms.domain.delivery.key_order``) before any database
work. For a slave of this KME the work is a group-commit unit (``kms.service.group_commit``): cut the
keys from the pool (or, if the pool is short and the pair's policy allows it, make PQC-fallback key
IDs), encapsulate once per request for hybrid keys, insert the reserved keys and their lifecycle
events, and return the audit entry ``keys.reserved``. Hybrid keys are derived after the commit
(``AfterCommit``). For a slave at another KME the peer network (``RemoteDelivery``) does the work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection

from kms.domain.delivery import DeliveredKey, KeyOrder, key_order
from kms.domain.errors import ServiceUnavailable
from kms.domain.keys import CutKey
from kms.domain.policy import POLICY_FALLBACK, PairPolicy
from kms.domain.saes import SaeInfo
from kms.service.audit_recorder import AuditEntry
from kms.service.context import DeliveryContext
from kms.service.group_commit import AfterCommit, Unit, run_unit
from kms.service.hybrid_keys import HybridKeys
from kms.storage import pool_repository as pool
from kms.storage.database import savepoint

Reserved = tuple[list[DeliveredKey] | AfterCommit[list[DeliveredKey]], list[AuditEntry]]


class GetKeys:
    """Get key for one KME."""

    def __init__(self, ctx: DeliveryContext, hybrid: HybridKeys) -> None:
        self.ctx = ctx
        self.hybrid = hybrid

    def check(
        self,
        master: SaeInfo,
        slave_sae_id: str,
        number: int | None = None,
        size: int | None = None,
        additional_slave_sae_ids: Sequence[str] = (),
        extension_mandatory: Sequence[Mapping[str, Any]] = (),
    ) -> KeyOrder:
        """The request checked against the limits, the registry and the pair's policy (400 if not)."""
        ctx = self.ctx
        return key_order(
            ctx.cfg,
            ctx.registry,
            ctx.policies,
            master,
            slave_sae_id,
            number,
            size,
            additional_slave_sae_ids,
            extension_mandatory,
        )

    def is_remote(self, order: KeyOrder) -> bool:
        """Whether the slave is at another KME (then :meth:`remote` serves it, off the event loop)."""
        return order.slave.kme_id != self.ctx.kme_id

    def unit(self, order: KeyOrder) -> Unit[list[DeliveredKey]]:
        """A local slave's database work, for the group commit (the API's batcher)."""
        return lambda conn: self._reserve(conn, order)

    def run(self, order: KeyOrder) -> list[DeliveredKey]:
        """The whole request in a transaction of its own (callers without a batcher)."""
        if self.is_remote(order):
            return self.remote(order)
        return run_unit(self.ctx.db, self.unit(order))

    def remote(self, order: KeyOrder) -> list[DeliveredKey]:
        """Keys for a slave at another KME: cut here, recorded there (``kms.peer``)."""
        if self.ctx.remote is None:
            raise ServiceUnavailable(f"the slave's KME {order.slave.kme_id} is not a configured peer")
        return self.ctx.remote.get_keys(
            order.master, order.slave, order.recipients, order.number, order.size, order.policy
        )

    def _reserve(self, conn: Connection, order: KeyOrder) -> Reserved:
        master, slave, size, policy = order.master, order.slave, order.size, order.policy
        events = pool.EventBatch(datetime.now(UTC))
        actor = f"sae:{master.sae_id}"
        cut = self.cut(conn, slave.kme_id, order.number, size, policy, events, actor)
        fallback = cut[0].material is None
        policy_name = POLICY_FALLBACK if fallback else policy.mode.value
        suite = policy.suite(fallback)
        exchange = None
        if suite is not None:
            exchange = self.hybrid.encapsulate_local(conn, policy, slave.kme_id, events.at)
        pool.insert_reserved_keys(
            conn,
            self.ctx.envelope,
            cut,
            size_bits=size,
            master_sae_id=master.sae_id,
            slave_sae_ids=order.recipients,
            target_kme_id=slave.kme_id,
            ttl=timedelta(seconds=self.ctx.cfg.reserved_ttl_seconds),
            policy=policy_name,
            suite=suite,
            kem_exchange_id=exchange.exchange_id if exchange else None,
            at=events.at,
        )
        events.flush(conn)
        result: list[DeliveredKey] | AfterCommit[list[DeliveredKey]]
        if exchange is not None:
            # Deriving a hybrid key per key_ID needs no transaction: done once the batch committed.
            result = AfterCommit(
                lambda: self.hybrid.delivered(cut, exchange, suite, master.sae_id, slave, size)
            )
        else:
            result = self.hybrid.delivered(cut, None, None, master.sae_id, slave, size)
        record: dict[str, Any] = {
            "key_IDs": [c.key_id for c in cut],
            "size": size,
            "slaves": order.recipients,
            "policy": policy_name,
            "suite": suite,
        }
        if exchange:
            record["kem_ciphertext_sha384"] = hashlib.sha384(exchange.ciphertext).hexdigest()
        return result, [(actor, "keys.reserved", f"{master.sae_id}->{slave.sae_id}", record)]

    def cut(
        self,
        conn: Connection,
        target: str,
        number: int,
        size: int,
        policy: PairPolicy,
        events: pool.EventBatch,
        actor: str,
    ) -> list[CutKey]:
        """QKD bits from the pool toward ``target``; PQC-fallback key IDs (no material) if the pool is
        short and the policy allows it; else 503. Used for local slaves and by ``kms.peer``."""
        kwargs: dict[str, Any] = {
            "target_kme_id": target,
            "number": number,
            "size_bits": size,
            "min_key_size": self.ctx.cfg.min_key_size,
            "events": events,
            "actor": actor,
        }
        if not policy.pqc_fallback:
            cut = pool.cut_keys(conn, self.ctx.envelope, **kwargs)
        else:
            mark = len(events.rows)
            try:
                with savepoint(conn, "qkms_cut"):
                    cut = pool.cut_keys(conn, self.ctx.envelope, **kwargs)
                    if cut is None:
                        raise _PoolShort
            except _PoolShort:
                del events.rows[mark:]  # the rolled-back cut's block events
                return pool.fallback_keys(number)
        if cut is None:
            raise ServiceUnavailable(
                f"not enough key material in the pool toward KME {target} for this request; retry later",
                [{"requested_bits": number * size}],
            )
        return cut


class _PoolShort(Exception):
    """Internal: unwinds the savepoint when the pool cannot serve and the fallback may."""
