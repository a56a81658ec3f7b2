"""A QKD network of several KMEs as plain processes on 127.0.0.1: the topology of the docker-compose
pilot (docker/compose.two-site.yml), used by the tests, the benchmarks and ``qkms pilot``.

Each site is a working directory made by ``qkms init`` (its own CA, KEK and database); sites trust
each other through exchanged peer bundles; each shared link is declared at both ends with the same
ID. Adjacent KMEs get each other's URL; the others are known (bundles) but reached through relay.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kms.lab.launcher import KmeProcess, free_port
from kms.provision.peers import add_link, add_peer, export_bundle
from kms.provision.workdir import init_workdir, sae_credential_paths


@dataclass(frozen=True)
class SiteSpec:
    kme_id: str
    saes: tuple[str, ...]
    database_url: str | None = None


@dataclass(frozen=True)
class LinkSpec:
    link_id: str
    a: str
    b: str
    source: str = "random"
    options: dict[str, Any] = field(default_factory=dict)
    # The b end's options when the two ends differ (a device pair: master at a, follower at b).
    options_b: dict[str, Any] | None = None


@dataclass
class Site:
    kme_id: str
    workdir: Path
    config_path: Path
    port: int
    saes: tuple[str, ...]
    process: KmeProcess | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.workdir / "pki" / "ca.pem"

    def sae_credentials(self, sae_id: str) -> tuple[Path, Path]:
        return sae_credential_paths(self.workdir, sae_id)


def prepare_network(
    root: Path,
    sites: Sequence[SiteSpec],
    links: Sequence[LinkSpec],
    pool: dict[str, Any] | None = None,
    policy: dict[str, Any] | None = None,
) -> dict[str, Site]:
    """Create every site's working directory, exchange bundles and declare the links."""
    out: dict[str, Site] = {}
    for spec in sites:
        port = free_port()
        result = init_workdir(
            root / spec.kme_id,
            spec.kme_id,
            list(spec.saes),
            port=port,
            database_url=spec.database_url,
            link_source=None,
            pool_overrides=pool or {},
            policy=policy,
        )
        out[spec.kme_id] = Site(spec.kme_id, root / spec.kme_id, result.config_path, port, spec.saes)
    adjacent = {(lk.a, lk.b) for lk in links} | {(lk.b, lk.a) for lk in links}
    bundles = {kme: export_bundle(site.config_path, root / f"{kme}.bundle.json") for kme, site in out.items()}
    for kme, site in out.items():
        for other, bundle in bundles.items():
            if other != kme:
                add_peer(site.config_path, bundle, out[other].url if (kme, other) in adjacent else None)
    for lk in links:
        options = dict(lk.options)
        if lk.source == "random":
            options.setdefault("shared_seed", f"pilot-{lk.link_id}")
        add_link(out[lk.a].config_path, lk.link_id, lk.b, lk.source, options)
        add_link(
            out[lk.b].config_path,
            lk.link_id,
            lk.a,
            lk.source,
            options if lk.options_b is None else lk.options_b,
        )
    return out


@contextmanager
def running_network(sites: dict[str, Site], start_timeout: float = 30.0) -> Iterator[dict[str, Site]]:
    """Start one ``qkms serve`` per site, all at once; stop them all on exit."""
    try:
        for site in sites.values():
            site.process = KmeProcess(site.config_path, site.port).spawn()
        for site in sites.values():
            assert site.process is not None
            site.process.wait_listening(start_timeout)
        yield sites
    finally:
        for site in sites.values():
            if site.process is not None:
                site.process.stop()
