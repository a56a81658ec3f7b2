"""Runs a KME: uvicorn over TLS 1.2+ with client certificates required, plus its background work.

Background work per process: the pool filler (one process per KME fills: several API processes
elect one with a PostgreSQL advisory lock or, on SQLite, a file lock), and the sweeper that expires
reserved keys nobody fetched.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import ssl
import sys
import threading
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI
from sqlalchemy import text

from kms.api.app import create_app
from kms.api.http_limits import hardened_protocol
from kms.audit.integrity import AuditIntegrityError
from kms.config import KmsSettings, ServerSection
from kms.ingest import PoolFiller
from kms.logs import configure_logging
from kms.runtime import Runtime, build_runtime
from kms.service.audit_checkpoints import CheckpointWriter
from kms.service.audit_startup import EXIT_AUDIT_REFUSED, refuse_unless_audit_intact
from kms.service.expiry import close_redelivery_windows
from kms.service.peer_sweep import sweep_peer_state
from kms.storage.database import sqlite_lock_path
from kms.storage.durability import durability_problems

log = structlog.get_logger(__name__)
CONFIG_ENV = "QKMS_CONFIG"
PROCESSES_ENV = "QKMS_API_PROCESSES"  # set by the supervisor for its workers
EXIT_NOT_DURABLE = 4


def server_ssl_context(settings: KmsSettings) -> ssl.SSLContext:
    """TLS 1.2 or newer, the KME's certificate, and a client certificate from our CA required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls.server_cert), str(settings.tls.server_key))
    ctx.load_verify_locations(cafile=str(settings.tls.ca_cert))
    # Peer KMEs present client certificates from their own site's CA (pinned by fingerprint too).
    for peer in settings.peers:
        from kms.peer.bundle import load_bundle

        ctx.load_verify_locations(cadata=load_bundle(peer.bundle).ca_cert_pem)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Background:
    """The filler and sweeper threads of one server process."""

    def __init__(self, runtime: Runtime, fill: bool = True) -> None:
        self.runtime = runtime
        self.fill = fill
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._filler: PoolFiller | None = None

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
        """Confirm shared blocks with adjacent KMEs and forget peer nonces past the freshness window."""
        network = self.runtime.network
        assert network is not None
        interval = self.runtime.settings.peering.sync_seconds
        window = timedelta(seconds=2 * self.runtime.settings.peering.max_clock_skew_seconds)
        last_prune = 0.0
        while not self._stop.wait(interval):
            try:
                network.sync_once()
                network.rebalance_once()
                if time.monotonic() - last_prune > 30:
                    now = datetime.now(UTC)
                    stale = now - timedelta(seconds=10 * self.runtime.settings.peering.timeout_seconds)
                    actor = f"kme:{self.runtime.settings.kme.id}/peer-sync"
                    sweep_peer_state(self.runtime.db, actor, now, now - window, stale)
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
        if self.fill and self.runtime.settings.links:
            self._filler = self.runtime.make_filler()
            self._filler.start()
        if self.runtime.network is not None:
            self._peer_sync()
        else:
            self._stop.wait()


def build_app(settings: KmsSettings, fill: bool = True) -> FastAPI:
    # Background threads (filler, sweeper, signer) must not hold the GIL for the default 5 ms
    # while requests wait on the event loop.
    sys.setswitchinterval(0.001)
    runtime = build_runtime(settings, server=True)
    refuse_unless_durable(runtime)  # exits 4 on a PostgreSQL that may forget acknowledged commits
    refuse_unless_audit_intact(runtime.db, runtime.identity, settings)  # exits 3 on a rewritten audit
    refuse_unless_peers_agree(runtime)  # exits 3 when a peer holds checkpoints this database lost
    background = Background(runtime, fill=fill)
    processes = int(os.environ.get(PROCESSES_ENV, "1"))
    return create_app(runtime, lifespan_hooks=(background.start, background.stop), api_processes=processes)


def refuse_unless_durable(runtime: Runtime) -> None:
    """Log why and exit 4 when the database may forget commits it acknowledged (``kms.storage.durability``)."""
    problems = durability_problems(runtime.db)
    if problems and not runtime.settings.database.require_durable_commits:
        log.warning("database_not_durable_accepted", problems=problems)
        return
    if problems:
        log.error("database_not_durable", problems=problems)
        raise SystemExit(EXIT_NOT_DURABLE)


def refuse_unless_peers_agree(runtime: Runtime) -> None:
    """Compare the audit with the copies adjacent peers keep of it; log why and exit 3 if a peer holds
    a checkpoint this database lacks or holds differently. Unreachable peers are logged, not waited for."""
    if runtime.countersigner is None:
        return
    from kms.peer.countersign import peer_problems

    problems, unreachable = peer_problems(runtime.countersigner.ctx, runtime.countersigner.client)
    if unreachable:
        log.warning("audit_not_compared_with_peers", peers=unreachable)
    if problems:
        log.error(
            "audit_start_refused",
            reason="a peer KME holds audit checkpoints of this KME that the database no longer has",
            problems=problems,
        )
        raise SystemExit(EXIT_AUDIT_REFUSED)


def app_from_env() -> FastAPI:
    """ASGI factory for worker processes: the config path comes from ``QKMS_CONFIG``."""
    settings = KmsSettings.load(Path(os.environ[CONFIG_ENV]))
    configure_logging(settings.logging.level, settings.logging.json_logs)
    return build_app(settings)


def _ssl_factory_from_env(_config: Any, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    return server_ssl_context(KmsSettings.load(Path(os.environ[CONFIG_ENV])))


def _uvicorn_config(host: str, port: int, limits: ServerSection) -> uvicorn.Config:
    """uvicorn with the hardened protocol (``kms.api.http_limits``); no proxy headers (an SAE could
    otherwise claim another client address or scheme with ``X-Forwarded-*``) and no WebSocket
    upgrades: the ETSI API is plain HTTPS."""
    return uvicorn.Config(
        "kms.server:app_from_env",
        factory=True,
        host=host,
        port=port,
        http=hardened_protocol(limits),
        ws="none",
        proxy_headers=False,
        ssl_context_factory=_ssl_factory_from_env,
        access_log=False,
        log_config=None,
        timeout_keep_alive=max(1, round(limits.idle_timeout_seconds)),
        timeout_graceful_shutdown=3,
        server_header=False,
    )


def serve(config_path: Path, host: str | None = None, port: int | None = None, workers: int = 1) -> None:
    """Run the KME in the foreground until interrupted."""
    settings = KmsSettings.load(config_path)
    configure_logging(settings.logging.level, settings.logging.json_logs)
    if (
        workers > 1
        and settings.database.url.startswith("sqlite")
        and sqlite_lock_path(settings.database.url) is None
    ):
        raise SystemExit("several worker processes need a database file (an in-memory SQLite is per process)")
    os.environ[CONFIG_ENV] = str(config_path.resolve())
    host = host or settings.kme.host
    port = settings.kme.port if port is None else port
    if workers <= 1:
        uvicorn.Server(_uvicorn_config(host, port, settings.server)).run()
        return
    if port == 0:
        raise SystemExit("several worker processes need a fixed port (each binds it with SO_REUSEPORT)")
    WorkerSupervisor(workers, host, port).run()


class WorkerSupervisor:
    """``qkms serve --workers N``: N API processes, each with its own listening socket on the same
    port (``SO_REUSEPORT``), so the kernel spreads new connections evenly over them. (One shared
    socket lets whichever process wakes first accept a whole burst: with keep-alive clients one
    process ended up serving three quarters of them while the other idled.) A worker that dies is
    started again; SIGTERM or SIGINT stops them all."""

    MAX_QUICK_FAILURES = 5

    def __init__(self, workers: int, host: str, port: int) -> None:
        self.workers = workers
        self.host = host
        self.port = port
        self._stop = threading.Event()
        self._context = multiprocessing.get_context("spawn")

    def _start(self) -> multiprocessing.process.BaseProcess:
        proc = self._context.Process(
            target=_worker_main,
            args=(os.environ[CONFIG_ENV], self.host, self.port, self.workers),
            name="qkms-worker",
        )
        proc.start()
        return proc

    def run(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self._stop.set())
        procs = [self._start() for _ in range(self.workers)]
        started = [time.monotonic()] * self.workers
        quick_failures = 0
        log.info("workers_started", workers=self.workers, pids=[p.pid for p in procs])
        while not self._stop.wait(0.5):
            for i, proc in enumerate(procs):
                if proc.is_alive() or self._stop.is_set():
                    continue
                log.error("worker_exited", pid=proc.pid, exitcode=proc.exitcode)
                # A worker that cannot even start (config gone, port taken) would otherwise be
                # restarted forever: give up after a few that die within seconds of starting.
                quick_failures = quick_failures + 1 if time.monotonic() - started[i] < 10 else 0
                if quick_failures >= self.MAX_QUICK_FAILURES:
                    log.error("workers_keep_failing", failures=quick_failures)
                    self._stop.set()
                    break
                procs[i] = self._start()
                started[i] = time.monotonic()
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        if quick_failures >= self.MAX_QUICK_FAILURES:
            raise SystemExit("qkms serve: the worker processes keep failing at start; see the log above")


def _worker_main(config_path: str, host: str, port: int, processes: int) -> None:
    os.environ[CONFIG_ENV] = config_path
    os.environ[PROCESSES_ENV] = str(processes)
    settings = KmsSettings.load(Path(config_path))
    configure_logging(settings.logging.level, settings.logging.json_logs)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    uvicorn.Server(_uvicorn_config(host, port, settings.server)).run(sockets=[sock])
