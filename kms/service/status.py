"""Get status (ETSI GS QKD 014 ``status``): the pair's limits and how many keys the pool could serve.

Read only: no transaction, nothing audited. The count for a slave at another KME comes from the peer
network (``RemoteDelivery.available_keys``).
"""

from __future__ import annotations

from kms.domain.delivery import Status, counterpart, status_document
from kms.domain.saes import SaeInfo
from kms.service.context import DeliveryContext
from kms.storage import pool_repository as pool


class GetStatus:
    """Get status for one KME."""

    def __init__(self, ctx: DeliveryContext) -> None:
        self.ctx = ctx

    def is_remote(self, slave_sae_id: str) -> bool:
        """Whether answering may wait on another KME (then the API runs it in its own threads)."""
        slave = self.ctx.registry.get(slave_sae_id)
        return slave is not None and not self.ctx.is_local(slave.kme_id)

    def run(self, master: SaeInfo, slave_sae_id: str) -> Status:
        ctx = self.ctx
        slave = counterpart(ctx.registry, master, slave_sae_id, "slave")
        policy = ctx.policies.for_pair(master.sae_id, slave.sae_id)
        if not ctx.is_local(slave.kme_id) and ctx.remote is not None:
            stored = ctx.remote.available_keys(slave.kme_id, ctx.cfg.key_size)
        else:
            with ctx.db.read() as conn:
                stored = pool.count_available_keys(conn, slave.kme_id, ctx.cfg.key_size)
        return status_document(ctx.kme_id, ctx.cfg, master, slave, policy, stored)
