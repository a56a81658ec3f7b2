"""Starts a real ``qkms sim device serve`` process on free 127.0.0.1 ports and waits for its keys."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from kms.cli.device import init_device_dir
from kms.lab.launcher import client_ssl_context, free_port
from qkd_adapters.simdevice.serve import DeviceDir

# A fast link for tests: GYS detectors over 5 km, 2e8-pulse blocks (~50 kbit each, ~0.3 s of CPU),
# no pacing, a small buffer so the link soon pauses instead of burning CPU.
FAST_LINK = (
    "--preset", "gys", "--distance", "5", "--clock-rate", "1e9", "--pulses-per-block", "200000000",
    "--pacing", "fast", "--seed", "7", "--max-stored-bits", "262144",
)  # fmt: skip


@dataclass
class SimDevice:
    device: DeviceDir
    ports: dict[str, int]
    proc: subprocess.Popen[bytes]
    log_path: Path

    def url(self, site: str) -> str:
        return f"https://127.0.0.1:{self.ports[site]}"

    def credentials(self, client: str) -> dict[str, Any]:
        """The upstream adapter's TLS options for the KME whose device SAE ID is ``client``."""
        clients = self.device.directory / "clients"
        return {
            "ca_cert": self.device.ca_cert,
            "client_cert": clients / f"{client}.pem",
            "client_key": clients / f"{client}.key",
        }

    def client(self, site: str, as_client: str) -> httpx.Client:
        creds = self.credentials(as_client)
        ctx = client_ssl_context(creds["ca_cert"], creds["client_cert"], creds["client_key"])
        return httpx.Client(base_url=self.url(site), verify=ctx, timeout=10.0)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_for_keys(self, minimum: int, timeout: float = 90.0) -> int:
        stored = 0
        deadline = time.monotonic() + timeout
        with self.client("A", "kme-a") as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"device process exited:\n{self.log_tail()}")
                resp = c.get("/api/v1/keys/kme-b/status")
                if resp.status_code == 200:
                    stored = int(resp.json()["stored_key_count"])
                    if stored >= minimum:
                        return stored
                time.sleep(0.2)
        raise TimeoutError(f"device buffer reached {stored} keys (wanted {minimum}):\n{self.log_tail()}")


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"device process exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"device did not listen on {port}:\n{log_path.read_text()}")


@contextmanager
def sim_device(directory: Path, *extra: str, min_keys: int = 256) -> Iterator[SimDevice]:
    device = init_device_dir(directory / "device", "kme-a", "kme-b")
    ports = {"A": free_port(), "B": free_port()}
    log_path = directory / "device.log"
    cmd = [sys.executable, "-m", "kms", "sim", "device", "serve", "--dir", str(device.directory)]
    cmd += ["--port-a", str(ports["A"]), "--port-b", str(ports["B"]), *FAST_LINK, *extra]
    with log_path.open("ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    running = SimDevice(device, ports, proc, log_path)
    try:
        for port in ports.values():
            _wait_listening(proc, port, log_path)
        if min_keys:
            running.wait_for_keys(min_keys)
        yield running
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
