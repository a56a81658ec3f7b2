"""Starts ``qkms serve`` as a real child process and waits until it answers over mTLS.

Used by the demo, the integration tests and the benchmarks, so all of them exercise the same server
that operators run.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def client_ssl_context(ca_cert: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


@dataclass
class KmeProcess:
    config_path: Path
    port: int
    workers: int = 1
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> KmeProcess:
        self.spawn()
        self.wait_listening(timeout)
        return self

    def spawn(self) -> KmeProcess:
        """Start ``qkms serve`` without waiting for it (``wait_listening``): many KMEs start at once."""
        cmd = [sys.executable, "-m", "kms", "serve", "--config", str(self.config_path), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", str(self.workers)]
        log = self.log_path or self.config_path.parent / f"server-{self.port}.log"
        self.log_path = log
        # Owner-only like everything else in the KME's directory (``kms.storage.file_modes``).
        with os.fdopen(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"qkms serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"qkms serve did not listen on {self.port} within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def client(self, ca_cert: Path, cert: Path | None, key: Path | None, **kwargs: object) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            verify=client_ssl_context(ca_cert, cert, key),
            timeout=30.0,
            **kwargs,  # type: ignore[arg-type]
        )

    def wait_for_keys(
        self, client: httpx.Client, slave_sae_id: str, minimum: int, timeout: float = 60.0
    ) -> int:
        """Poll Get status until the pool holds ``minimum`` keys of the default size."""
        deadline = time.monotonic() + timeout
        stored = 0
        while time.monotonic() < deadline:
            resp = client.get(f"/api/v1/keys/{slave_sae_id}/status")
            if resp.status_code == 200:
                stored = int(resp.json()["stored_key_count"])
                if stored >= minimum:
                    return stored
            time.sleep(0.2)
        raise TimeoutError(f"pool reached only {stored} keys (wanted {minimum}):\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
