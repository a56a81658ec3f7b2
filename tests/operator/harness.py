"""A real KME (``qkms serve`` child process, mTLS on 127.0.0.1) with its operator listener on."""

from __future__ import annotations

import secrets
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from kms.config import KmsSettings
from kms.lab.launcher import KmeProcess, client_ssl_context, free_port
from kms.provision.workdir import init_workdir, sae_credential_paths

SAES = ("SAE-M", "SAE-S")


@dataclass
class OperatorKme:
    workdir: Path
    settings: KmsSettings
    process: KmeProcess
    token: str
    operator_port: int

    @property
    def ca(self) -> Path:
        return self.workdir / "pki" / "ca.pem"

    def operator(self, token: str | None = None, timeout: float = 10.0) -> httpx.Client:
        """A client of the operator listener (TLS checked against the site CA, no client certificate;
        plain HTTP when ``operator.tls = false``)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        tls = self.settings.operator.tls
        return httpx.Client(
            base_url=f"{'https' if tls else 'http'}://127.0.0.1:{self.operator_port}",
            verify=client_ssl_context(self.ca, None, None) if tls else False,
            headers=headers,
            timeout=timeout,
        )

    def sae(self, sae_id: str) -> httpx.Client:
        cert, key = sae_credential_paths(self.workdir, sae_id)
        return self.process.client(self.ca, cert, key)

    def wait_operator(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self.operator() as client:
            while True:
                try:
                    if client.get("/v1/health/live").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"operator listener not up:\n{self.process.log_tail()}")
                time.sleep(0.2)


@contextmanager
def operator_kme(
    workdir: Path,
    database_url: str | None = None,
    *,
    workers: int = 1,
    operator: dict[str, Any] | None = None,
    link_source: str | None = "random",
    policy: dict[str, Any] | None = None,
    fill_keys: int = 64,
    sections: dict[str, dict[str, Any]] | None = None,
) -> Iterator[OperatorKme]:
    """``sections``: further config sections (``siem``, ``quotas``, ...) merged into the config."""
    result = init_workdir(
        workdir,
        "KME-OP",
        list(SAES),
        port=free_port(),
        database_url=database_url,
        link_source=link_source,
        pool_overrides={"max_pool_bits": 1024 * 1024},
        policy=policy,
    )
    token = secrets.token_urlsafe(24)
    token_file = workdir / "operator-metrics.token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    config = tomllib.loads(result.config_path.read_text())
    # Test-only: a throwaway PostgreSQL cluster may run without durable commits.
    config.setdefault("database", {})["require_durable_commits"] = False
    config["operator"] = {
        "enabled": True,
        "port": free_port(),
        "metrics_token_file": token_file.name,
        "db_metrics_max_age_seconds": 0,
        **(operator or {}),
    }
    for name, values in (sections or {}).items():
        config.setdefault(name, {}).update(values)
    result.config_path.write_text(tomli_w.dumps(config))
    settings = KmsSettings.load(result.config_path)
    proc = KmeProcess(result.config_path, settings.kme.port, workers=workers)
    proc.start()
    kme = OperatorKme(workdir, settings, proc, token, settings.operator.port)
    try:
        kme.wait_operator()
        if link_source is not None and fill_keys:
            with kme.sae(SAES[0]) as client:
                proc.wait_for_keys(client, SAES[1], minimum=fill_keys)
        yield kme
    finally:
        proc.stop()


def child_pids(parent: int) -> list[tuple[int, bytes]]:
    """The live processes whose parent is ``parent``, with their command lines (from /proc)."""
    children: list[tuple[int, bytes]] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == parent:
            children.append((int(entry.name), cmdline))
    return children
