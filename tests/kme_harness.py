"""Test harness: real KME server processes over real mTLS on 127.0.0.1, on SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from kms.config import KmsSettings
from kms.lab.launcher import KmeProcess, free_port
from kms.provision.workdir import init_workdir, sae_credential_paths

SAES = ("SAE-M", "SAE-S", "SAE-T", "SAE-U", "SAE-V", "SAE-W")


@dataclass
class RunningKme:
    workdir: Path
    settings: KmsSettings
    process: KmeProcess
    clients: dict[str, httpx.Client] = field(default_factory=dict)

    @property
    def ca(self) -> Path:
        return self.workdir / "pki" / "ca.pem"

    def client(self, sae_id: str) -> httpx.Client:
        if sae_id not in self.clients:
            cert, key = sae_credential_paths(self.workdir, sae_id)
            self.clients[sae_id] = self.process.client(self.ca, cert, key)
        return self.clients[sae_id]

    def close(self) -> None:
        for c in self.clients.values():
            c.close()
        self.process.stop()


@contextmanager
def running_kme(
    workdir: Path,
    database_url: str | None = None,
    *,
    saes: tuple[str, ...] = SAES,
    link_source: str = "random",
    pool: dict[str, Any] | None = None,
    with_links: bool = True,
    fill_keys: int = 512,
    workers: int = 1,
    policy: dict[str, Any] | None = None,
    auditors: tuple[str, ...] = (),
    link_options: dict[str, Any] | None = None,
) -> Iterator[RunningKme]:
    pool_cfg = {"max_pool_bits": 4 * 1024 * 1024, **(pool or {})}
    result = init_workdir(
        workdir,
        "KME-T",
        list(saes),
        port=free_port(),
        database_url=database_url,
        link_source=link_source if with_links else None,
        pool_overrides=pool_cfg,
        policy=policy,
        auditor_ids=list(auditors),
    )
    if link_options is not None:
        import tomllib

        import tomli_w

        config = tomllib.loads(result.config_path.read_text())
        config["links"][0]["options"].update(link_options)
        result.config_path.write_text(tomli_w.dumps(config))
    settings = KmsSettings.load(result.config_path)
    proc = KmeProcess(result.config_path, settings.kme.port, workers=workers)
    proc.start()
    kme = RunningKme(workdir, settings, proc)
    try:
        if with_links and fill_keys:
            proc.wait_for_keys(kme.client(saes[0]), saes[1], minimum=fill_keys)
        yield kme
    finally:
        kme.close()
