"""``qkms sim device init`` and ``serve``: the device pair's PKI, and both devices in one process.

Layout made by :func:`init_device_dir`::

    DIR/device.toml                 which SAE (KME) each device serves, and its pinned fingerprint
    DIR/ca.pem, ca.key              the device CA (the "vendor's" CA): it signs everything below
    DIR/device-a.pem, .key          device A's TLS server certificate (127.0.0.1, localhost)
    DIR/device-b.pem, .key          device B's
    DIR/clients/<SAE>.pem, .key     the client credentials each KME uses as SAE of its device

A KME at site A is configured with ``ca.pem`` and ``clients/<site-a-client>.pem/.key``; at site B
with the site-B client's. Keys are 0600, as ``kms.pki.write_credential`` writes them.
"""

from __future__ import annotations

import asyncio
import re
import signal
import ssl
import tomllib
from collections.abc import Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
import tomli_w
import uvicorn

from kms import pki
from kms.api.tls_identity import TlsIdentityProtocol
from kms.simdevice.app import create_device_app
from kms.simdevice.pair import SITES, DevicePair, PairLimits, Site

log = structlog.get_logger(__name__)

CONFIG_NAME = "device.toml"
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class DeviceSetupError(RuntimeError):
    """The device directory cannot be created or used; the message says why."""


@dataclass(frozen=True)
class DeviceSite:
    site: Site
    device_id: str
    client: str
    client_fingerprint: str
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class DeviceDir:
    directory: Path
    ca_cert: Path
    sites: dict[Site, DeviceSite]

    @classmethod
    def load(cls, directory: Path) -> DeviceDir:
        path = directory / CONFIG_NAME
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DeviceSetupError(
                f"{path} not found; run `qkms sim device init --dir {directory}` first"
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise DeviceSetupError(f"{path} is not valid TOML: {exc}") from exc
        base = path.resolve().parent
        try:
            sites: dict[Site, DeviceSite] = {}
            for site in SITES:
                s = data[f"site_{site.lower()}"]
                sites[site] = DeviceSite(
                    site=site,
                    device_id=str(s["device_id"]),
                    client=str(s["client"]),
                    client_fingerprint=str(s["client_fingerprint"]),
                    server_cert=base / s["server_cert"],
                    server_key=base / s["server_key"],
                    client_cert=base / s["client_cert"],
                    client_key=base / s["client_key"],
                )
            return cls(base, base / data["ca_cert"], sites)
        except (KeyError, TypeError) as exc:
            raise DeviceSetupError(f"{path} lacks a setting: {exc}") from exc


def init_device_dir(
    directory: Path,
    site_a_client: str = "kme-a",
    site_b_client: str = "kme-b",
    device_ids: tuple[str, str] = ("SIMDEV-A", "SIMDEV-B"),
    hostnames: tuple[str, ...] = ("localhost",),
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
) -> DeviceDir:
    """Create the device CA, both device server certificates and one client credential per KME."""
    for ident in (site_a_client, site_b_client, *device_ids):
        if not SAFE_ID.match(ident):
            raise DeviceSetupError(
                f"ID {ident!r} must be 1-128 characters of letters, digits, '.', '_' or '-'"
            )
    if site_a_client == site_b_client:
        raise DeviceSetupError("the two sites' clients must have different IDs")
    if directory.exists() and any(directory.iterdir()):
        raise DeviceSetupError(f"{directory} is not empty; choose a new directory")
    directory.mkdir(parents=True, exist_ok=True)
    ca = pki.create_ca("QKMS simulated QKD device CA")
    pki.write_credential(ca, directory / "ca.pem", directory / "ca.key")
    config: dict[str, Any] = {"ca_cert": "ca.pem"}
    for site, client, device_id in zip(SITES, (site_a_client, site_b_client), device_ids, strict=True):
        name = f"device-{site.lower()}"
        server = pki.issue_server_cert(ca, device_id, hostnames=hostnames, ip_addresses=ip_addresses)
        pki.write_credential(server, directory / f"{name}.pem", directory / f"{name}.key")
        cred = pki.issue_client_cert(ca, client, role="sae")
        pki.write_credential(
            cred, directory / "clients" / f"{client}.pem", directory / "clients" / f"{client}.key"
        )
        config[f"site_{site.lower()}"] = {
            "device_id": device_id,
            "client": client,
            "client_fingerprint": cred.fingerprint_sha256,
            "server_cert": f"{name}.pem",
            "server_key": f"{name}.key",
            "client_cert": f"clients/{client}.pem",
            "client_key": f"clients/{client}.key",
        }
    (directory / CONFIG_NAME).write_text(tomli_w.dumps(config), encoding="utf-8")
    return DeviceDir.load(directory)


def server_ssl_context(device: DeviceDir, site: Site) -> ssl.SSLContext:
    """TLS 1.2+, the device's certificate, a client certificate from the device CA required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    s = device.sites[site]
    ctx.load_cert_chain(str(s.server_cert), str(s.server_key))
    ctx.load_verify_locations(cafile=str(device.ca_cert))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to :func:`run_devices` (two servers share one process)."""

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def build_pair(device: DeviceDir, link_options: dict[str, Any], limits: PairLimits) -> DevicePair:
    """The simulated link (ML-DSA-authenticated classical channel by default) and its two devices."""
    from kms.crypto.channel_auth import device_authenticator
    from qkd_adapters.sim.link import SimulatedLink

    options = dict(link_options)
    link_id = str(options.pop("link_id", "simdevice-link"))
    authenticator = device_authenticator(str(options.pop("channel_auth", "ml-dsa-session")), link_id)
    # A tiny queue: the link works ahead by two blocks at most; the pair's buffer is the real store.
    link = SimulatedLink(link_id, authenticator=authenticator, max_queue=2, **options)
    clients = {site: device.sites[site].client for site in SITES}
    ids = {site: device.sites[site].device_id for site in SITES}
    return DevicePair(link, clients, limits, ids)


def _fixed_context(
    ctx: ssl.SSLContext,
) -> Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    def factory(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return ctx

    return factory


def run_devices(device: DeviceDir, pair: DevicePair, ports: dict[Site, int], host: str = "127.0.0.1") -> None:
    """Serve device A and device B until SIGINT/SIGTERM; the pair is closed (buffers zeroised) at exit."""
    servers: list[_Server] = []
    for site in SITES:
        app = create_device_app(pair, site, device.sites[site].client_fingerprint)
        ctx = server_ssl_context(device, site)
        config = uvicorn.Config(
            app,
            host=host,
            port=ports[site],
            http=TlsIdentityProtocol,
            ssl_context_factory=_fixed_context(ctx),
            access_log=False,
            log_config=None,
            server_header=False,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=3,
        )
        servers.append(_Server(config))

    def stop(_sig: int, _frame: FrameType | None) -> None:
        for server in servers:
            server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    pair.start()
    for site in SITES:
        s = device.sites[site]
        log.info(
            "device_listening",
            site=site,
            device_id=s.device_id,
            url=f"https://{host}:{ports[site]}",
            serves_sae=s.client,
        )
    log.info("link_started", **{k: v for k, v in pair.link.describe().items() if k != "adapter"})

    async def main() -> None:
        await asyncio.gather(*(server.serve() for server in servers))

    try:
        asyncio.run(main())
    finally:
        pair.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("devices_stopped")
