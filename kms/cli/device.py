"""``qkms sim device init|serve``: provision and run the simulated QKD device pair.

The device pair itself is ``qkd_adapters.simdevice`` (it imports nothing of ``kms``). What the KMS
side adds is the lab tooling: :func:`init_device_dir` makes the pair's credentials with the KME's own
X.509 code (``kms.crypto.pki``) and writes ``device.toml``; ``serve`` builds the ML-DSA authenticator of the
link's classical channel (``kms.crypto.channel_auth``) and hands it to the device.

Layout made by :func:`init_device_dir`::

    DIR/device.toml                 which SAE (KME) each device serves, and its pinned fingerprint
    DIR/ca.pem, ca.key              the device CA (the "vendor's" CA): it signs everything below
    DIR/device-a.pem, .key          device A's TLS server certificate (127.0.0.1, localhost)
    DIR/device-b.pem, .key          device B's
    DIR/clients/<SAE>.pem, .key     the client credentials each KME uses as SAE of its device

A KME at site A is configured with ``ca.pem`` and ``clients/<site-a-client>.pem/.key``; at site B
with the site-B client's. Keys are 0600, as ``kms.crypto.pki.write_credential`` writes them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:  # imported where used: `qkms` starts without the device's web stack and physics
    from qkd_adapters.simdevice.pair import Site
    from qkd_adapters.simdevice.serve import DeviceDir, DeviceSite

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def init_device_dir(
    directory: Path,
    site_a_client: str = "kme-a",
    site_b_client: str = "kme-b",
    device_ids: tuple[str, str] = ("SIMDEV-A", "SIMDEV-B"),
    hostnames: tuple[str, ...] = ("localhost",),
    ip_addresses: tuple[str, ...] = ("127.0.0.1",),
) -> DeviceDir:
    """Create the device CA, both device server certificates and one client credential per KME."""
    from kms.crypto import pki
    from qkd_adapters.simdevice.pair import SITES
    from qkd_adapters.simdevice.serve import DeviceDir, DeviceSetupError, DeviceSite

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
    sites: dict[Site, DeviceSite] = {}
    for site, client, device_id in zip(SITES, (site_a_client, site_b_client), device_ids, strict=True):
        server_cert, server_key = (
            directory / f"device-{site.lower()}.pem",
            directory / f"device-{site.lower()}.key",
        )
        server = pki.issue_server_cert(ca, device_id, hostnames=hostnames, ip_addresses=ip_addresses)
        pki.write_credential(server, server_cert, server_key)
        client_cert, client_key = (
            directory / "clients" / f"{client}.pem",
            directory / "clients" / f"{client}.key",
        )
        cred = pki.issue_client_cert(ca, client, role="sae")
        pki.write_credential(cred, client_cert, client_key)
        sites[site] = DeviceSite(
            site, device_id, client, cred.fingerprint_sha256, server_cert, server_key, client_cert, client_key
        )
    DeviceDir(directory, directory / "ca.pem", sites).save()
    return DeviceDir.load(directory)


device_app = typer.Typer(
    help="A simulated QKD device pair serving ETSI GS QKD 014 to two KMEs (one port per site).",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> typer.Exit:
    """Print a one-line error (no panel: scripts grep it) and exit 2."""
    err_console.print(f"error: {message}", markup=False, highlight=False)
    return typer.Exit(2)


DeviceDirOpt = Annotated[
    Path, typer.Option("--dir", help="The device pair's directory (PKI and device.toml).")
]


@device_app.command("init")
def device_init(
    directory: DeviceDirOpt,
    site_a_client: Annotated[
        str, typer.Option("--site-a-client", help="SAE ID (certificate CN) of the KME at site A.")
    ] = "kme-a",
    site_b_client: Annotated[
        str, typer.Option("--site-b-client", help="SAE ID (certificate CN) of the KME at site B.")
    ] = "kme-b",
) -> None:
    """Create the device CA, both devices' server certificates and one client credential per KME."""
    from qkd_adapters.simdevice.serve import DeviceSetupError

    try:
        device = init_device_dir(directory, site_a_client, site_b_client)
    except DeviceSetupError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"device CA: {device.ca_cert}")
    for site, s in device.sites.items():
        console.print(
            f"site {site}: device {s.device_id}, client {s.client}: {s.client_cert}, {s.client_key}"
        )


@device_app.command("serve")
def device_serve(
    directory: DeviceDirOpt,
    port_a: Annotated[int, typer.Option("--port-a", help="HTTPS port of device A (site A's KME).")],
    port_b: Annotated[int, typer.Option("--port-b", help="HTTPS port of device B (site B's KME).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    preset: Annotated[str, typer.Option(help="Preset name (see `qkms sim presets`) or a TOML file.")] = "gys",
    distance_km: Annotated[float, typer.Option("--distance", help="Fibre length in km.")] = 25.0,
    protocol: Annotated[str, typer.Option(help="'decoy-bb84' or 'bbm92'.")] = "decoy-bb84",
    clock_rate: Annotated[float, typer.Option(help="Source clock in Hz.")] = 1e9,
    block_seconds: Annotated[
        float | None, typer.Option(help="Link time per block (default 1 s; or give --pulses-per-block).")
    ] = None,
    pulses_per_block: Annotated[int | None, typer.Option(help="Pulses per block.")] = None,
    attack: Annotated[
        str, typer.Option(help="none | intercept-resend:<fraction> | pns | beam-splitting")
    ] = "none",
    pacing: Annotated[
        str, typer.Option(help="'realtime' (physical rate) or 'fast' (as fast as the CPU).")
    ] = "realtime",
    seed: Annotated[int | None, typer.Option(help="Seed for a reproducible link.")] = None,
    channel_auth: Annotated[
        str, typer.Option(help="Authentication of the devices' classical channel (ml-dsa-session, ...).")
    ] = "ml-dsa-session",
    key_size: Annotated[int, typer.Option(help="Default key size in bits (Get status key_size).")] = 256,
    min_key_size: Annotated[int, typer.Option(help="Smallest key size served, bits.")] = 64,
    max_key_size: Annotated[int, typer.Option(help="Largest key size served, bits.")] = 4096,
    max_keys_per_request: Annotated[int, typer.Option(help="Most keys in one request.")] = 128,
    max_stored_bits: Annotated[
        int, typer.Option(help="Key buffer bound, bits (the link pauses when full).")
    ] = 4 * 1024 * 1024,
    key_ttl: Annotated[
        float, typer.Option(help="Seconds a key waits for its slave before it is zeroised.")
    ] = 300.0,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
) -> None:
    """Run devices A and B over one simulated link, each an ETSI GS QKD 014 server over mTLS."""
    from kms.crypto.channel_auth import device_authenticator
    from kms.runtime.logs import configure_logging
    from qkd_adapters.simdevice.pair import PairLimits
    from qkd_adapters.simdevice.serve import (
        DEFAULT_LINK_ID,
        DeviceDir,
        DeviceSetupError,
        build_pair,
        run_devices,
    )

    configure_logging(log_level)
    if port_a == port_b:
        raise _fail("--port-a and --port-b must differ")
    if block_seconds is not None and pulses_per_block is not None:
        raise _fail("give --block-seconds or --pulses-per-block, not both")
    try:
        device = DeviceDir.load(directory)
        limits = PairLimits(
            key_size=key_size,
            min_key_size=min_key_size,
            max_key_size=max_key_size,
            max_key_per_request=max_keys_per_request,
            max_stored_bits=max_stored_bits,
            key_ttl_s=key_ttl,
        )
        link_options = _link_options(
            preset, distance_km, protocol, clock_rate, attack, pacing, seed, block_seconds, pulses_per_block
        )
        # The device's classical channel is authenticated with ML-DSA, the KMS's PQC code (the device
        # itself imports nothing of kms).
        authenticator = device_authenticator(channel_auth, DEFAULT_LINK_ID)
        pair = build_pair(device, link_options, limits, authenticator)
    except (DeviceSetupError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    run_devices(device, pair, {"A": port_a, "B": port_b}, host=host)


def _link_options(
    preset: str,
    distance_km: float,
    protocol: str,
    clock_rate: float,
    attack: str,
    pacing: str,
    seed: int | None,
    block_seconds: float | None,
    pulses_per_block: int | None,
) -> dict[str, object]:
    """The simulated link's options from ``serve``'s; a block is 1 s of link time unless told."""
    link_options: dict[str, object] = {
        "preset": preset,
        "distance_km": distance_km,
        "protocol": protocol,
        "clock_rate_hz": clock_rate,
        "attack": attack,
        "pacing": pacing,
        "seed": seed,
    }
    if pulses_per_block is not None:
        link_options["pulses_per_block"] = pulses_per_block
    else:
        link_options["seconds_per_block"] = 1.0 if block_seconds is None else block_seconds
    return link_options
