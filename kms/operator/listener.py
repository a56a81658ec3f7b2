"""Runs the operator app on its own port in a thread of a KME process.

With ``qkms serve --workers N`` every worker starts one, but exactly one serves: the port is bound
without ``SO_REUSEPORT``, so the first worker to bind it serves and the others retry every
``RETRY_SECONDS`` (the next one takes over within seconds if that worker dies). Whichever process
serves, the figures are the same: instruments are summed over every process's files and pool
figures come from the database (``kms.operator.exposition``).
"""

from __future__ import annotations

import errno
import socket
import ssl
import threading

import structlog
import uvicorn
from fastapi import FastAPI

from kms.config import KmsSettings

log = structlog.get_logger(__name__)
RETRY_SECONDS = 2.0


class OperatorListener:
    def __init__(self, settings: KmsSettings, app: FastAPI, shared_port: bool) -> None:
        """``shared_port``: sibling worker processes contend for the port (a taken port means another
        worker serves it, not an error)."""
        self.settings = settings
        self.app = app
        self.shared_port = shared_port
        self._stop = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.serving = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qkms-operator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        cfg = self.settings.operator
        announced = False
        while not self._stop.is_set():
            try:
                sock = self._bind(cfg.host, cfg.port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    log.error("operator_listener_failed", host=cfg.host, port=cfg.port, error=exc.strerror)
                    return
                if not announced:
                    event = "operator_listener_standby" if self.shared_port else "operator_port_taken"
                    (log.info if self.shared_port else log.error)(event, port=cfg.port)
                    announced = True
                self._stop.wait(RETRY_SECONDS)
                continue
            log.info("operator_listener", host=cfg.host, port=cfg.port, tls=cfg.tls)
            self._server = uvicorn.Server(self._config())
            self.serving.set()
            try:
                self._server.run(sockets=[sock])
            finally:
                sock.close()
                self.serving.clear()
            return

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only, not a live listener
            sock.bind((host, port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        return sock

    def _config(self) -> uvicorn.Config:
        cfg, tls = self.settings.operator, self.settings.tls
        # Health needs no client certificate and metrics use a bearer token: the server's TLS only.
        certfile = str(tls.server_cert) if cfg.tls else None
        keyfile = str(tls.server_key) if cfg.tls else None
        return uvicorn.Config(
            self.app,
            host=cfg.host,
            port=cfg.port,
            lifespan="off",
            ws="none",
            proxy_headers=False,
            access_log=False,
            log_config=None,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=2,
            server_header=False,
            ssl_version=ssl.PROTOCOL_TLS_SERVER,
            ssl_cert_reqs=ssl.CERT_NONE,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
        )
