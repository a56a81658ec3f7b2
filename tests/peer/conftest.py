"""Two real KME processes (sites A and B) joined by a shared test link, over real mTLS on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kms.lab.launcher import client_ssl_context
from kms.lab.pilot import LinkSpec, Site, SiteSpec, prepare_network, running_network
from tests.conftest import database_url

POOL = {"max_pool_bits": 2 * 1024 * 1024, "reserved_ttl_seconds": 60.0}


@dataclass
class Network:
    sites: dict[str, Site]
    clients: dict[str, httpx.Client]

    def sae(self, site: str, sae_id: str) -> httpx.Client:
        key = f"{site}/{sae_id}"
        if key not in self.clients:
            s = self.sites[site]
            cert, key_path = s.sae_credentials(sae_id)
            self.clients[key] = httpx.Client(
                base_url=s.url, verify=client_ssl_context(s.ca, cert, key_path), timeout=30.0
            )
        return self.clients[key]

    def close(self) -> None:
        for c in self.clients.values():
            c.close()


def wait_for_remote_keys(net: Network, site: str, master: str, slave: str, minimum: int = 64) -> None:
    """Until the master's KME can serve ``minimum`` keys to the remote slave (blocks confirmed)."""
    deadline = time.monotonic() + 60
    count = 0
    while time.monotonic() < deadline:
        r = net.sae(site, master).get(f"/api/v1/keys/{slave}/status")
        if r.status_code == 200:
            count = r.json()["stored_key_count"]
            if count >= minimum:
                return
        time.sleep(0.3)
    raise AssertionError(f"{site} never had {minimum} keys for {slave} (last count {count})")


def open_network(
    root: Path, db_urls: dict[str, str | None], policy: dict[str, object] | None = None
) -> Network:
    sites = prepare_network(
        root,
        [
            SiteSpec("KME-A", ("SAE-A1", "SAE-A2"), db_urls.get("KME-A")),
            SiteSpec("KME-B", ("SAE-B1", "SAE-B2", "SAE-B3"), db_urls.get("KME-B")),
        ],
        [LinkSpec("link-ab", "KME-A", "KME-B", options={"block_bits": 65536})],
        pool=POOL,
        policy=policy,
    )
    return Network(sites, {})


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def two_sites(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    root = tmp_path_factory.mktemp(f"two-site-{request.param}")
    urls = {kme: database_url(request.param, request) for kme in ("KME-A", "KME-B")}
    net = open_network(root, urls)
    with running_network(net.sites):
        try:
            wait_for_remote_keys(net, "KME-A", "SAE-A1", "SAE-B1")
            wait_for_remote_keys(net, "KME-B", "SAE-B1", "SAE-A1")
            yield net
        finally:
            net.close()


def query(site: Site, sql: str, **params: object) -> list[tuple[object, ...]]:
    """Read a site's database (SQLite or PostgreSQL) directly, as an auditor with DB access would."""
    from sqlalchemy import create_engine, text

    from kms.config import KmsSettings

    engine = create_engine(KmsSettings.load(site.config_path).database.url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def assert_stores_check_out(sites: dict[str, Site]) -> None:
    """``qkms db check`` and ``qkms audit verify`` pass at every KME of a multi-site test (the family
    that would have caught a trusted node's relayed keys flagged as unrecorded consumption)."""
    import subprocess
    import sys

    for site in sites.values():
        for check in (["db", "check"], ["audit", "verify"]):
            done = subprocess.run(
                [sys.executable, "-m", "kms", *check, "--config", str(site.config_path)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, (site.kme_id, check, done.stdout[-2000:], done.stderr[-500:])
