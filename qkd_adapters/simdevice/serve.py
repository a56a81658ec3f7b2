"""``qkms sim device serve``: both devices of the pair in one process, each on its own mTLS port.

The device pair's directory holds ``device.toml`` (:class:`DeviceDir`: which SAE, i.e. KME, each
device serves with its pinned certificate fingerprint, and where the PEM files are) and the device
CA, server and client credentials it names. The device only reads them: they are made by the lab
tooling on the KMS side with the KME's own X.509 code (``qkms sim device init``,
``kms.cli.device.init_device_dir``), as a vendor's devices come with credentials issued for them.
"""

from __future__ import annotations

import asyncio
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

from qkd_adapters.sim.postproc.channel import Authenticator
from qkd_adapters.simdevice.app import create_device_app
from qkd_adapters.simdevice.pair import SITES, DevicePair, PairLimits, Site
from qkd_adapters.tls_identity import TlsIdentityProtocol

log = structlog.get_logger(__name__)

CONFIG_NAME = "device.toml"
DEFAULT_LINK_ID = "simdevice-link"


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

    def save(self) -> None:
        """Write ``device.toml`` into ``directory``, every path in it relative to that directory."""

        def rel(path: Path) -> str:
            return path.relative_to(self.directory).as_posix()

        config: dict[str, Any] = {"ca_cert": rel(self.ca_cert)}
        for site in SITES:
            s = self.sites[site]
            config[f"site_{site.lower()}"] = {
                "device_id": s.device_id,
                "client": s.client,
                "client_fingerprint": s.client_fingerprint,
                "server_cert": rel(s.server_cert),
                "server_key": rel(s.server_key),
                "client_cert": rel(s.client_cert),
                "client_key": rel(s.client_key),
            }
        (self.directory / CONFIG_NAME).write_text(tomli_w.dumps(config), encoding="utf-8")


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


def build_pair(
    device: DeviceDir, link_options: dict[str, Any], limits: PairLimits, authenticator: Authenticator | None
) -> DevicePair:
    """The simulated link and its two devices. ``authenticator`` guards the link's classical channel;
    ``qkms sim device serve`` passes an ML-DSA one (``kms.crypto.channel_auth.device_authenticator``
    for ``link_options["link_id"]``, default :data:`DEFAULT_LINK_ID`)."""
    from qkd_adapters.sim.link import SimulatedLink

    options = dict(link_options)
    link_id = str(options.pop("link_id", DEFAULT_LINK_ID))
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
