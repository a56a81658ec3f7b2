"""The background work of one server process: the expiry sweep, audit checkpoints and their peer
countersigning, SQLite WAL checkpoints, and — in the one process that leads — the pool filler and
the peer block confirmation. Each loop calls the service layer (``kms.service``) for its units of work.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from sqlalchemy import text

from kms.audit.integrity import AuditIntegrityError
from kms.runtime.assembly import Runtime
from kms.runtime.filler import PoolFiller
from kms.runtime.shipping import ship_audit
from kms.service.audit_checkpoints import CheckpointWriter
from kms.service.expiry import close_redelivery_windows
from kms.service.peer_sweep import sweep_peer_state

log = structlog.get_logger(__name__)


class Background:
    """The filler and sweeper threads of one server process."""

    def __init__(self, runtime: Runtime, fill: bool = True) -> None:
        self.runtime = runtime
        self.fill = fill
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._filler: PoolFiller | None = None
        self._leading = threading.Event()

    def role(self) -> str:
        """``leader`` while this process holds the leader lock (fills the pool), else ``standby``."""
        return "leader" if self._leading.is_set() else "standby"

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._sweep, name="qkms-expiry", daemon=True),
            threading.Thread(target=self._checkpoint, name="qkms-audit-checkpoint", daemon=True),
        ]
        if self.runtime.db.is_sqlite:
            self._threads.append(threading.Thread(target=self._wal_checkpoint, name="qkms-wal", daemon=True))
        if self.runtime.countersigner is not None:
            self._threads.append(
                threading.Thread(target=self._countersign, name="qkms-audit-countersign", daemon=True)
            )
        if self.runtime.settings.siem.active:  # audit to SIEM: one process per KME ships (its own lock)
            self._threads.append(
                threading.Thread(
                    target=ship_audit, args=(self.runtime, self._stop), name="qkms-siem", daemon=True
                )
            )
        if (self.fill and self.runtime.settings.links) or self.runtime.network is not None:
            self._threads.append(
                threading.Thread(target=self._lead_and_fill, name="qkms-filler", daemon=True)
            )
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        # Before the final checkpoint (written when the threads stop), so that it signs this too.
        try:
            n = close_redelivery_windows(self.runtime.db, self.runtime.settings.kme.id)
            if n:
                log.info("redelivery_windows_closed", rows=n)
        except Exception as exc:
            log.error("redelivery_close_failed", error=type(exc).__name__)
        self._stop.set()
        if self._filler is not None:
            self._filler.stop()
        for t in self._threads:
            t.join(timeout=5)

    def _sweep(self) -> None:
        """Expire reserved keys past their TTL and end redelivery windows; the first pass at start,
        for what ended while the KME was down (after a crash: a clean stop ends every window)."""
        interval = self.runtime.settings.pool.expiry_sweep_seconds
        while True:
            try:
                n = self.runtime.service.expire_reserved()
                if n:
                    log.info("keys_expired", count=n)
            except Exception as exc:
                log.error("expiry_sweep_failed", error=type(exc).__name__)
            if self._stop.wait(interval):
                return

    def _checkpoint(self) -> None:
        """Sign and anchor the audit head every ``audit.checkpoint_records`` records or
        ``audit.checkpoint_seconds``, and once more on shutdown; never over a rewritten database."""
        rt, cfg = self.runtime, self.runtime.settings.audit
        writer = CheckpointWriter.for_settings(rt.db, rt.identity, rt.settings)
        pause = min(0.5, cfg.checkpoint_seconds)
        while True:
            stopping = self._stop.wait(pause)
            try:
                if stopping or writer.due(cfg.checkpoint_records, cfg.checkpoint_seconds):
                    writer.write()
                pause = min(0.5, cfg.checkpoint_seconds)
            except AuditIntegrityError as exc:
                log.error("audit_checkpoint_refused", problems=exc.problems)
                pause = 30.0
            except Exception as exc:
                log.error("audit_checkpoint_failed", error=type(exc).__name__)
            if stopping:
                return

    def _countersign(self) -> None:
        """Send new audit checkpoints to the adjacent peers, who keep copies and countersign them
        (``kms.peer.countersign``); a peer that is down gets them when it is back."""
        countersigner = self.runtime.countersigner
        assert countersigner is not None
        interval = max(1.0, self.runtime.settings.audit.checkpoint_seconds)
        while not self._stop.wait(interval):
            try:
                countersigner.push()
            except Exception as exc:
                log.error("audit_countersign_failed", error=type(exc).__name__)

    def _peer_sync(self) -> None:
        """Issue and flood this KME's link-state record when due (``kms.peer.flooding``), confirm
        shared blocks with adjacent KMEs, and forget peer nonces past the freshness window."""
        network = self.runtime.network
        assert network is not None
        interval = self.runtime.settings.peering.sync_seconds
        window = timedelta(seconds=2 * self.runtime.settings.peering.max_clock_skew_seconds)
        last_prune, last_resend = 0.0, float("-inf")
        while not self._stop.wait(interval):
            try:
                network.topology_tick()
            except Exception as exc:
                log.error("link_state_tick_failed", error=type(exc).__name__, detail=str(exc)[:200])
            if time.monotonic() - last_resend > self.runtime.settings.peering.sae_resend_seconds:
                last_resend = time.monotonic()
                try:  # SAE states told again to every KME (DECISIONS.md D-39)
                    network.sae_notices.resend(self.runtime.settings.kme.id)
                except Exception as exc:
                    log.error("sae_resend_failed", error=type(exc).__name__, detail=str(exc)[:200])
            try:
                network.sync_once()
                network.rebalance_once()
                if time.monotonic() - last_prune > 30:
                    now = datetime.now(UTC)
                    stale = now - timedelta(seconds=10 * self.runtime.settings.peering.timeout_seconds)
                    actor = f"kme:{self.runtime.settings.kme.id}/peer-sync"
                    unconfirmed = now - timedelta(
                        seconds=self.runtime.settings.peering.unconfirmed_block_seconds
                    )
                    sweep_peer_state(self.runtime.db, actor, now, now - window, stale, unconfirmed)
                    last_prune = time.monotonic()
            except Exception as exc:
                log.error("peer_sync_failed", error=type(exc).__name__, detail=str(exc)[:200])

    def _wal_checkpoint(self) -> None:
        """SQLite: fold the WAL into the database file off the request path, once a second; truncate
        it when nobody wrote for a second or it passed its limit (``Database.truncate_wal``), and
        once more on a clean stop, after the other background threads (whose last act may be a
        write: the audit checkpoint's) have finished, so that a stopped KME leaves an empty WAL."""
        db = self.runtime.db
        frames = 0
        while not self._stop.wait(1.0):
            try:
                previous, frames = frames, db.checkpoint()
                idle = frames > 0 and frames == previous
                if idle or db.wal_bytes() > db.wal_limit_bytes:
                    db.truncate_wal(blocking=False)
            except Exception as exc:
                log.error("wal_checkpoint_failed", error=type(exc).__name__)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout=5)
        try:
            if not db.truncate_wal():
                log.warning("wal_not_truncated_at_stop", wal_bytes=db.wal_bytes())
        except Exception as exc:
            log.error("wal_checkpoint_failed", error=type(exc).__name__)

    def _lead_and_fill(self) -> None:
        """Do the leader's work only while holding the KME's leader lock, so that one process of
        several fills the pool and talks block confirmation with peers: a PostgreSQL advisory lock,
        or on SQLite an ``flock`` on ``<database file>.leader``. The lock dies with its process, so
        another one takes over within seconds."""
        db = self.runtime.db
        if db.is_sqlite:
            self._lead_sqlite(db.lock_path)
            return
        lock_key = zlib.crc32(f"qkms-filler/{self.runtime.settings.kme.id}".encode())
        while not self._stop.is_set():
            with db.engine.connect() as conn:
                got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": lock_key}).scalar()
                conn.commit()
                if got:
                    log.info("filler_leader", pid=os.getpid())
                    try:
                        self._fill_until_stopped()
                    finally:
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock_key})
                        conn.commit()
                    return
            self._stop.wait(2.0)

    def _lead_sqlite(self, write_lock: Path | None) -> None:
        if write_lock is None:  # in-memory database: one process by construction
            self._fill_until_stopped()
            return
        fd = os.open(write_lock.with_suffix(".leader"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while not self._stop.is_set():
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._stop.wait(2.0)
                    continue
                log.info("filler_leader", pid=os.getpid())
                self._fill_until_stopped()
                return
        finally:
            os.close(fd)  # releases the lock

    def _fill_until_stopped(self) -> None:
        """The leader's work: fill the pool and, with peers, confirm blocks and sweep peer state."""
        self._leading.set()
        if self.fill and self.runtime.settings.links:
            self._filler = self.runtime.make_filler()
            self._filler.start()
        if self.runtime.network is not None:
            self._peer_sync()
        else:
            self._stop.wait()
