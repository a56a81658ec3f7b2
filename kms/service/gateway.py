"""The event loop's entry to the key-delivery use cases: the API's endpoints and its lean hot path
(``kms.api.hot_path``) both call these coroutines, so the two paths cannot drift.

The delivery service is synchronous. Get key and Get key with key IDs for this KME's own SAEs are
checked on the event loop; their database work is group-committed (``kms.service.batcher``): on the
loop (while it holds the write turn, on SQLite), except on PostgreSQL served by a single process,
where worker threads overlap the round trips. Keys for a slave at another KME wait on that KME in a
thread of their own; everything else that touches the database runs in a small thread pool.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import anyio

from kms.config import DatabaseSection
from kms.domain.delivery import DeliveredKey, Status
from kms.domain.errors import NotEntitled
from kms.domain.saes import SaeInfo
from kms.service.batcher import UnitBatcher
from kms.service.delivery import KeyDeliveryService
from kms.service.fair_share import FairShares, QuotaExceeded
from kms.storage.database import Database

T = TypeVar("T")

REMOTE_THREADS = 32  # requests that may wait on another KME at once


class DeliveryGateway:
    """One API process's way into the use cases (made per app, on the loop that serves it)."""

    def __init__(
        self,
        service: KeyDeliveryService,
        db: Database,
        cfg: DatabaseSection,
        api_processes: int = 1,
        fair_shares: FairShares | None = None,
    ) -> None:
        """``api_processes``: how many processes serve this KME (``qkms serve --workers``);
        ``fair_shares``: the quotas Get key requests must pass (None: no limit configured)."""
        self.service = service
        self.fair_shares = fair_shares
        self.batcher = UnitBatcher(
            db,
            in_flight=cfg.batches_in_flight,
            max_batch=cfg.max_batch,
            # PostgreSQL with several processes also runs batches on the loop: while one process waits
            # on its round trips the others serve, and no thread hops or GIL hand-offs are paid.
            inline=db.is_sqlite or api_processes > 1,
            shared_turn=api_processes > 1,
        )
        # A few database threads overlap PostgreSQL round trips; more only contend for the GIL. On
        # SQLite too, calls outside group commit run in a thread: one that writes may wait for the
        # write turn, which only the event loop can give back (``kms.service.batcher``).
        self._limiter = anyio.CapacityLimiter(cfg.max_concurrency)
        # A key for a slave at another KME waits on that KME: in a thread, never on the event loop.
        self._remote_limiter = anyio.CapacityLimiter(REMOTE_THREADS)

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a database thread (reads such as the audit API's)."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def get_keys(
        self,
        master: SaeInfo,
        slave_sae_id: str,
        number: int | None = None,
        size: int | None = None,
        additional_slave_sae_ids: Sequence[str] = (),
        extension_mandatory: Sequence[Mapping[str, Any]] = (),
    ) -> list[DeliveredKey]:
        """Get key: checked here, group-committed for a local slave, in a thread for a remote one."""
        use_case = self.service.keys
        order = use_case.check(
            master, slave_sae_id, number, size, additional_slave_sae_ids, extension_mandatory
        )
        if self.fair_shares is not None:
            try:
                self.fair_shares.admit(order)
            except QuotaExceeded as exc:
                if exc.records:
                    await self.in_thread(self.fair_shares.record, exc.records)
                raise
        if use_case.is_remote(order):
            return await anyio.to_thread.run_sync(use_case.remote, order, limiter=self._remote_limiter)
        return await self.batcher.run(use_case.unit(order))

    async def get_keys_with_ids(
        self, slave: SaeInfo, master_sae_id: str, key_ids: Sequence[str]
    ) -> list[DeliveredKey]:
        """Get key with key IDs: checked here, group-committed; a 401 is audited before it is raised."""
        use_case = self.service.keys_with_ids
        normalised = use_case.check(slave, master_sae_id, key_ids)
        try:
            return await self.batcher.run(use_case.unit(slave, master_sae_id, normalised))
        except NotEntitled:
            await self.in_thread(use_case.audit_denied, slave, master_sae_id, normalised)
            raise

    async def status(self, master: SaeInfo, slave_sae_id: str) -> Status:
        """Get status, in a thread (a remote slave's count waits on its KME)."""
        use_case = self.service.statuses
        if use_case.is_remote(slave_sae_id):
            return await anyio.to_thread.run_sync(
                use_case.run, master, slave_sae_id, limiter=self._remote_limiter
            )
        return await self.in_thread(use_case.run, master, slave_sae_id)
