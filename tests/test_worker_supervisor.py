"""``qkms serve --workers N``: the supervisor keeps N API processes on one port (SO_REUSEPORT), starts
a worker again when one dies, and gives up — exiting with an error — when workers cannot start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kms.lab.launcher import KmeProcess, free_port
from kms.provision.workdir import init_workdir, sae_credential_paths
from tests.conftest import database_url
from tests.support.procfs import worker_pids

M, S = "SAE-M", "SAE-S"


def _n_workers(supervisor: int, n: int, without: int | None = None) -> set[int] | None:
    """The supervisor's worker PIDs once there are ``n`` of them (and ``without`` is not one)."""
    pids = worker_pids(supervisor)
    return pids if len(pids) == n and without not in pids else None


def _wait_for(predicate, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_killed_worker_is_replaced_and_the_kme_keeps_serving(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    res = init_workdir(
        tmp_path / "kme",
        "KME-T",
        [M, S],
        port=free_port(),
        link_source="random",
        database_url=database_url(backend, request),
    )
    kme = KmeProcess(res.config_path, free_port(), workers=2).start()
    try:
        assert kme.proc is not None
        supervisor = kme.proc.pid
        first = _wait_for(lambda: _n_workers(supervisor, 2))
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        second = _wait_for(lambda: _n_workers(supervisor, 2, without=victim))
        assert len(second - first) == 1
        cert, key = sae_credential_paths(tmp_path / "kme", M)
        slave_cert, slave_key = sae_credential_paths(tmp_path / "kme", S)
        ca = tmp_path / "kme" / "pki" / "ca.pem"
        with kme.client(ca, cert, key) as c, kme.client(ca, slave_cert, slave_key) as sc:
            kme.wait_for_keys(c, S, minimum=8)
            c.headers["Connection"] = sc.headers["Connection"] = "close"
            for _ in range(8):  # new connections land on either worker; all are served
                resp = c.post(f"/api/v1/keys/{S}/enc_keys", json={"number": 1})
                assert resp.status_code == 200, resp.text
                key_id, material = resp.json()["keys"][0]["key_ID"], resp.json()["keys"][0]["key"]
                got = sc.post(f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": [{"key_ID": key_id}]})
                assert got.status_code == 200, got.text
                assert got.json()["keys"][0]["key"] == material
        assert "worker_exited" in kme.log_tail(200)
    finally:
        kme.stop()
    assert kme.proc is not None and kme.proc.returncode is not None


def test_workers_that_cannot_start_make_serve_exit_with_an_error(tmp_path: Path) -> None:
    port = free_port()
    res = init_workdir(tmp_path / "kme", "KME-T", [M, S], port=port, link_source="random")
    blocker = socket.socket()  # holds the port without SO_REUSEPORT: no worker can bind it
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        cmd = [sys.executable, "-m", "kms", "serve", "--config", str(res.config_path)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        blocker.close()
    assert proc.returncode != 0
    assert "keep failing" in proc.stdout + proc.stderr


def test_several_workers_need_a_fixed_port(tmp_path: Path) -> None:
    res = init_workdir(tmp_path / "kme", "KME-T", [M, S], port=free_port(), link_source="random")
    cmd = [
        sys.executable,
        "-m",
        "kms",
        "serve",
        "--config",
        str(res.config_path),
        "--port",
        "0",
        "--workers",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "fixed port" in proc.stdout + proc.stderr


@pytest.mark.parametrize("workers", [2])
def test_supervisor_stops_every_worker_on_sigterm(tmp_path: Path, workers: int) -> None:
    res = init_workdir(tmp_path / "kme", "KME-T", [M, S], port=free_port(), link_source="random")
    kme = KmeProcess(res.config_path, free_port(), workers=workers).start()
    try:
        assert kme.proc is not None
        supervisor = kme.proc.pid
        pids = _wait_for(lambda: _n_workers(supervisor, workers))
        os.kill(supervisor, signal.SIGTERM)  # the supervisor alone, not its process group
        assert kme.proc.wait(30) == 0
    finally:
        kme.stop()  # whatever is left, if the test failed half-way
    for pid in pids:
        _wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists() or "Z" in _state(pid), timeout=30)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return "Z"
