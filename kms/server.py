"""Runs a KME (``qkms serve``): uvicorn over TLS 1.2+ with client certificates required, the checks a
KME passes before it serves (durable database, audit intact, peers' copies agree), and with
``--workers N`` the supervisor of N processes. Each process's background work (pool filler, expiry
sweep, audit checkpoints) is ``kms.runtime.background``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI

from kms.api.app import create_app
from kms.api.http_limits import hardened_protocol
from kms.config import KmsSettings, ServerSection
from kms.runtime.assembly import Runtime, build_runtime
from kms.runtime.background import Background
from kms.runtime.logs import configure_logging
from kms.service.audit_startup import EXIT_AUDIT_REFUSED, refuse_unless_audit_intact
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
    # Enterprise CAs of pinned SAE certificates (`qkms sae add --ca`, D-29): OpenSSL looks the issuer
    # up in this directory at each handshake, so a CA added later is trusted without a restart.
    trusted = settings.sae_registry.trusted_ca_dir
    trusted.mkdir(mode=0o700, parents=True, exist_ok=True)
    ctx.load_verify_locations(capath=str(trusted))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


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
    hooks = (background.start, background.stop)
    if settings.operator.enabled:
        hooks = _with_operator_listener(runtime, background, processes)
    return create_app(runtime, lifespan_hooks=hooks, api_processes=processes)


def _with_operator_listener(
    runtime: Runtime, background: Background, processes: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    """Counting on (``kms.telemetry``), database transactions timed, and the operator listener
    started and stopped with the background work (``kms.operator``, D-11)."""
    from kms.operator.assembly import build_operator_listener
    from kms.telemetry import metrics
    from kms.telemetry.db_timing import time_transactions

    metrics.enable()
    counted = metrics.instruments()
    assert counted is not None
    time_transactions(runtime.db.engine, counted)
    listener = build_operator_listener(runtime, background.role, processes, counted)

    def start() -> None:
        background.start()
        listener.start()

    def stop() -> None:
        listener.stop()
        background.stop()
        metrics.flush()  # a worker that stops has written all it counted (dead workers' counts stay)

    return start, stop


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


def app_from_env() -> Any:
    """ASGI factory for worker processes: the config path comes from ``QKMS_CONFIG``. With the
    operator listener on, every request is counted and timed (``kms.telemetry.asgi``)."""
    settings = KmsSettings.load(Path(os.environ[CONFIG_ENV]))
    configure_logging(settings.logging.level, settings.logging.effective_format())
    app = build_app(settings)
    if not settings.operator.enabled:
        return app
    from kms.telemetry.asgi import RequestMetrics
    from kms.telemetry.metrics import instruments

    counted = instruments()
    assert counted is not None
    return RequestMetrics(app, counted)


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
    configure_logging(settings.logging.level, settings.logging.effective_format())
    if (
        workers > 1
        and settings.database.url.startswith("sqlite")
        and sqlite_lock_path(settings.database.url) is None
    ):
        raise SystemExit("several worker processes need a database file (an in-memory SQLite is per process)")
    os.environ[CONFIG_ENV] = str(config_path.resolve())
    host = host or settings.kme.host
    port = settings.kme.port if port is None else port
    if workers > 1 and port == 0:
        raise SystemExit("several worker processes need a fixed port (each binds it with SO_REUSEPORT)")
    with _metrics_directory(settings.operator.enabled):
        if workers <= 1:
            uvicorn.Server(_uvicorn_config(host, port, settings.server)).run()
        else:
            WorkerSupervisor(workers, host, port).run()


@contextlib.contextmanager
def _metrics_directory(enabled: bool) -> Iterator[None]:
    """With the operator listener on, a fresh owner-only directory for the instruments of this
    process and its workers (prometheus-client's multiprocess mode, ``kms.telemetry.metrics``),
    removed when ``qkms serve`` ends; counts start from zero with each ``qkms serve``."""
    if not enabled:
        yield
        return
    from kms.telemetry.metrics import MULTIPROC_ENV

    directory = tempfile.mkdtemp(prefix="qkms-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = directory
    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous


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
                if proc.pid is not None:
                    _forget_worker_gauges(proc.pid)
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


def _forget_worker_gauges(pid: int) -> None:
    from kms.telemetry.metrics import mark_process_dead

    mark_process_dead(pid)


def _worker_main(config_path: str, host: str, port: int, processes: int) -> None:
    os.environ[CONFIG_ENV] = config_path
    os.environ[PROCESSES_ENV] = str(processes)
    settings = KmsSettings.load(Path(config_path))
    configure_logging(settings.logging.level, settings.logging.effective_format())
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    uvicorn.Server(_uvicorn_config(host, port, settings.server)).run(sockets=[sock])
