"""``qkms pilot``: the two-site pilot as plain processes, the demo SAE exchange, pilot certificates.

``qkms pilot two-site`` is the plain-process mirror of ``docker/compose.two-site.yml``: two KME sites,
each with its own database, joined by a shared link, and a master SAE at site A and a slave SAE at
site B exchanging keys through the ETSI GS QKD 014 API. ``qkms pilot exchange`` is that exchange on
its own (the compose pilot's demo SAE service), and ``qkms pilot server-cert`` re-issues a server
certificate for the host names the pilot's containers are reached by.

Nothing here prints key material: key IDs and whether both ends matched, no more.
"""

from __future__ import annotations

import base64
import hmac
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
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer
from rich.console import Console

if TYPE_CHECKING:
    from kms.lab.pilot import Site

pilot_app = typer.Typer(
    help="The two-site pilot: run it as plain processes, run its SAE exchange, issue its certificates.",
    no_args_is_help=True,
)
console = Console(soft_wrap=True, highlight=False)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)

SITE_A, SITE_B = "KME-A", "KME-B"
MASTER_SAE, SLAVE_SAE = "SAE-A1", "SAE-B1"
PILOT_LINK = "link-ab"
# Small pools: the pilot needs a handful of keys, not 64 Mibit per link.
PILOT_POOL = {"max_pool_bits": 2 * 1024 * 1024, "reserved_ttl_seconds": 60.0}
# The simulated device pair for `--link device`: GYS detectors over 5 km, 2e8-pulse blocks, no
# pacing, a small buffer so the link pauses once it is full instead of burning CPU.
FAST_DEVICE_LINK = (
    "--preset", "gys", "--distance", "5", "--clock-rate", "1e9", "--pulses-per-block", "200000000",
    "--pacing", "fast", "--max-stored-bits", "262144",
)  # fmt: skip
DEVICE_PULL = {"keys_per_pull": 16, "key_size": 256, "poll_interval_s": 0.2, "max_backoff_s": 1.0}


class ExchangeError(RuntimeError):
    """The exchange could not be completed; the message says where (no key material)."""


@dataclass(frozen=True)
class SaeEndpoint:
    """An SAE's view of its KME: the KME's URL and CA, and the SAE's own client credential."""

    sae_id: str
    url: str
    ca_cert: Path
    cert: Path
    key: Path

    def client(self, timeout: float = 15.0) -> httpx.Client:
        from kms.lab.launcher import client_ssl_context

        ctx = client_ssl_context(self.ca_cert, self.cert, self.key)
        return httpx.Client(base_url=self.url, verify=ctx, timeout=timeout)


@dataclass(frozen=True)
class ExchangeResult:
    key_ids: list[str]
    key_size: int
    matched: bool
    refetch_status: int
    refetch_identical: bool = False  # a 200 retry (redelivery window) gave the same keys


def wait_for_stored_keys(client: httpx.Client, slave_sae_id: str, minimum: int, timeout: float) -> int:
    """Poll Get status until the master's KME can serve ``minimum`` keys for the slave. Connection
    errors are retried too: in the compose pilot the KME may still be starting."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            resp = client.get(f"/api/v1/keys/{slave_sae_id}/status")
        except httpx.TransportError as exc:
            last = f"{type(exc).__name__}"
        else:
            if resp.status_code == 200:
                stored = int(resp.json()["stored_key_count"])
                if stored >= minimum:
                    return stored
                last = f"{stored} keys stored"
            else:
                last = f"Get status answered {resp.status_code}"
        time.sleep(0.5)
    raise ExchangeError(f"the master's KME never had {minimum} keys for {slave_sae_id} ({last})")


def run_exchange(
    master: SaeEndpoint, slave: SaeEndpoint, number: int, size: int | None, wait_s: float
) -> ExchangeResult:
    """The master gets ``number`` keys at its KME (enc_keys), the slave gets them by key_ID at its own
    KME (dec_keys); both sets must be identical, and a second fetch must be refused."""
    with master.client() as mc, slave.client() as sc:
        wait_for_stored_keys(mc, slave.sae_id, number, wait_s)
        body: dict[str, Any] = {"number": number}
        if size is not None:
            body["size"] = size
        resp = mc.post(f"/api/v1/keys/{slave.sae_id}/enc_keys", json=body)
        if resp.status_code != 200:
            raise ExchangeError(f"enc_keys at {master.url} answered {resp.status_code}: {_message(resp)}")
        sent = {k["key_ID"]: base64.b64decode(k["key"]) for k in resp.json()["keys"]}
        ids = list(sent)
        request = {"key_IDs": [{"key_ID": k} for k in ids]}
        resp = sc.post(f"/api/v1/keys/{master.sae_id}/dec_keys", json=request)
        if resp.status_code != 200:
            raise ExchangeError(f"dec_keys at {slave.url} answered {resp.status_code}: {_message(resp)}")
        got = {k["key_ID"]: base64.b64decode(k["key"]) for k in resp.json()["keys"]}
        matched = set(got) == set(sent) and all(hmac.compare_digest(sent[k], got[k]) for k in ids)
        key_size = 8 * len(next(iter(sent.values()))) if sent else 0
        again = sc.post(f"/api/v1/keys/{master.sae_id}/dec_keys", json=request)
        identical = again.status_code == 200 and all(
            hmac.compare_digest(sent[k["key_ID"]], base64.b64decode(k["key"])) for k in again.json()["keys"]
        )
        sent.clear()
        got.clear()
    return ExchangeResult(ids, key_size, matched, again.status_code, identical)


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("message", ""))[:200]
    except ValueError:
        return resp.text[:200]


def report_exchange(master: SaeEndpoint, slave: SaeEndpoint, result: ExchangeResult) -> bool:
    """Print what happened (key IDs and outcomes only); True when everything held."""
    n = len(result.key_ids)
    console.print(
        f"{master.sae_id} got {n} keys of {result.key_size} bits for {slave.sae_id} "
        f"from {master.url} (enc_keys):"
    )
    for key_id in result.key_ids:
        console.print(f"  key_ID {key_id}")
    console.print(f"{slave.sae_id} fetched the same {n} key_IDs from {slave.url} (dec_keys)")
    if result.matched:
        console.print(f"both ends matched: {n}/{n} keys identical at the master and the slave")
    else:
        console.print("MISMATCH: the slave's keys differ from the master's")
    # The slave's retry: 400 once consumed, or, inside the redelivery window (pool.redelivery_seconds),
    # the same keys again (an audited redelivery, for an answer that was lost).
    refused = result.refetch_status == 400
    redelivered = result.refetch_status == 200 and result.refetch_identical
    console.print(
        f"a second dec_keys for the same key_IDs answered {result.refetch_status}"
        + (
            " (each key is served once)"
            if refused
            else " (the same keys again: a redelivery inside the window)"
            if redelivered
            else " (expected 400, or the same keys inside the redelivery window)"
        )
    )
    return result.matched and (refused or redelivered)


@pilot_app.command("exchange")
def exchange(
    master_url: Annotated[str, typer.Option("--master-url", help="https://host:port of the master's KME.")],
    master_ca: Annotated[Path, typer.Option("--master-ca", help="CA certificate of the master's KME.")],
    master_cert: Annotated[Path, typer.Option("--master-cert", help="The master SAE's certificate.")],
    master_key: Annotated[Path, typer.Option("--master-key", help="The master SAE's private key.")],
    slave_url: Annotated[str, typer.Option("--slave-url", help="https://host:port of the slave's KME.")],
    slave_ca: Annotated[Path, typer.Option("--slave-ca", help="CA certificate of the slave's KME.")],
    slave_cert: Annotated[Path, typer.Option("--slave-cert", help="The slave SAE's certificate.")],
    slave_key: Annotated[Path, typer.Option("--slave-key", help="The slave SAE's private key.")],
    master_sae: Annotated[str, typer.Option("--master-sae", help="The master SAE's ID.")] = MASTER_SAE,
    slave_sae: Annotated[str, typer.Option("--slave-sae", help="The slave SAE's ID.")] = SLAVE_SAE,
    number: Annotated[int, typer.Option("--number", min=1, help="Keys per exchange.")] = 4,
    size: Annotated[int | None, typer.Option("--size", help="Key size in bits (default: the KME's).")] = None,
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for the KMEs and their keys.")
    ] = 180.0,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Exchanges to run.")] = 1,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between exchanges.")] = 10.0,
) -> None:
    """A master SAE gets keys at its KME (enc_keys) and a slave SAE gets them by key_ID at its own KME
    (dec_keys); exit 0 only if both ends matched every time. Prints key IDs, never key material."""
    master = SaeEndpoint(master_sae, master_url, master_ca, master_cert, master_key)
    slave = SaeEndpoint(slave_sae, slave_url, slave_ca, slave_cert, slave_key)
    ok = True
    for i in range(rounds):
        if i:
            time.sleep(interval)
        try:
            result = run_exchange(master, slave, number, size, wait)
        except (ExchangeError, httpx.HTTPError, OSError) as exc:
            err_console.print(f"error: {exc}", markup=False)
            raise typer.Exit(1) from exc
        ok = report_exchange(master, slave, result) and ok
    raise typer.Exit(0 if ok else 1)


@pilot_app.command("server-cert")
def server_cert(
    ca_cert: Annotated[Path, typer.Option("--ca-cert", help="The signing CA's certificate.")],
    ca_key: Annotated[Path, typer.Option("--ca-key", help="The signing CA's private key.")],
    cert: Annotated[Path, typer.Option("--cert", help="Server certificate to (re)write.")],
    key: Annotated[Path, typer.Option("--key", help="Its private key (a new one is written, 0600).")],
    hostname: Annotated[list[str], typer.Option("--hostname", help="A DNS name of the server (repeat).")],
    ip: Annotated[
        list[str] | None,
        typer.Option("--ip", help="An IP address of the server (repeat; default 127.0.0.1)."),
    ] = None,
    common_name: Annotated[
        str | None, typer.Option("--cn", help="Common name (default: the existing certificate's).")
    ] = None,
) -> None:
    """Issue a server certificate (new key) for the names a KME or device is reached by, e.g. its
    container's service name; clients match these names, never the CN."""
    from kms.crypto import pki

    try:
        ca = pki.load_credential(ca_cert, ca_key)
        cn = common_name or pki.certificate_common_name(cert.read_bytes())
        cred = pki.issue_server_cert(ca, cn, hostnames=hostname, ip_addresses=ip or ["127.0.0.1"])
        pki.write_credential(cred, cert, key)
    except (OSError, ValueError) as exc:
        err_console.print(f"error: {exc}", markup=False)
        raise typer.Exit(2) from exc
    names = ", ".join([*hostname, *(ip or ["127.0.0.1"])])
    console.print(f"issued {cert} for {cn}: {names}")


@contextmanager
def serve_device_pair(device_dir: Path, ports: dict[str, int], *options: str) -> Iterator[dict[str, str]]:
    """``qkms sim device serve`` for a directory made by ``qkms sim device init``, as a child process
    on 127.0.0.1 (fast pacing unless ``options`` say otherwise); yields device A's and B's URLs."""
    log_path = device_dir / "device.log"
    cmd = [sys.executable, "-m", "kms", "sim", "device", "serve", "--dir", str(device_dir)]
    cmd += ["--port-a", str(ports["A"]), "--port-b", str(ports["B"]), *(options or FAST_DEVICE_LINK)]
    with log_path.open("ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for port in ports.values():
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise ExchangeError(f"the device pair exited with {proc.returncode}; see {log_path}")
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise ExchangeError(f"the device pair never listened; see {log_path}") from None
                    time.sleep(0.1)
        yield {site: f"https://127.0.0.1:{port}" for site, port in ports.items()}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def device_link_options(device_dir: Path, url: str, role: str, client: str, peer_sae: str) -> dict[str, Any]:
    creds = {
        "ca_cert": str((device_dir / "ca.pem").resolve()),
        "client_cert": str((device_dir / "clients" / f"{client}.pem").resolve()),
        "client_key": str((device_dir / "clients" / f"{client}.key").resolve()),
    }
    options: dict[str, Any] = {"role": role, "url": url, "peer_sae_id": peer_sae, "protocol": "decoy-bb84"}
    options.update(creds)
    if role == "master":
        options.update(DEVICE_PULL)
    return options


@pilot_app.command("two-site")
def two_site(
    directory: Annotated[Path, typer.Option("--dir", help="Where to create the two sites (new or empty).")],
    database_url_a: Annotated[
        str | None, typer.Option("--database-url-a", help="Site A's database (default: SQLite in its dir).")
    ] = None,
    database_url_b: Annotated[
        str | None, typer.Option("--database-url-b", help="Site B's database (default: SQLite in its dir).")
    ] = None,
    link: Annotated[
        str, typer.Option("--link", help="'random' (paired test source) or 'device' (simulated QKD devices).")
    ] = "random",
    number: Annotated[int, typer.Option("--number", min=1, help="Keys to exchange.")] = 4,
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for shared keys.")] = 120.0,
) -> None:
    """Create KME-A and KME-B (each its own CA, KEK and database), exchange their bundles, declare the
    shared link, start both, run the SAE exchange once (SAE-A1 at A, SAE-B1 at B) and stop."""
    from kms.lab.pilot import LinkSpec, SiteSpec, prepare_network

    if link not in ("random", "device"):
        raise typer.BadParameter("--link must be 'random' or 'device'")
    if directory.exists() and any(directory.iterdir()):
        err_console.print(f"error: {directory} is not empty; choose a new directory", markup=False)
        raise typer.Exit(2)
    directory.mkdir(parents=True, exist_ok=True)
    specs = [
        SiteSpec(SITE_A, (MASTER_SAE, "SAE-A2"), database_url_a),
        SiteSpec(SITE_B, (SLAVE_SAE, "SAE-B2"), database_url_b),
    ]
    links = [LinkSpec(PILOT_LINK, SITE_A, SITE_B, options={"block_bits": 131072})] if link == "random" else []
    console.print(f"preparing {SITE_A} and {SITE_B} in {directory} (link {PILOT_LINK}: {link})")
    sites = prepare_network(directory, specs, links, pool=PILOT_POOL)
    try:
        ok = _run_two_site(directory, sites, link == "device", number, wait)
    except (ExchangeError, httpx.HTTPError) as exc:
        err_console.print(f"error: {exc}", markup=False)
        raise typer.Exit(1) from exc
    console.print("both KMEs stopped")
    raise typer.Exit(0 if ok else 1)


@contextmanager
def _maybe_devices(directory: Path, wanted: bool) -> Iterator[dict[str, str] | None]:
    if not wanted:
        yield None
        return
    from kms.cli.device import init_device_dir
    from kms.lab.launcher import free_port

    device = init_device_dir(directory, "kme-a", "kme-b")
    with serve_device_pair(device.directory, {"A": free_port(), "B": free_port()}) as urls:
        yield urls


def _run_two_site(directory: Path, sites: dict[str, Site], device: bool, number: int, wait: float) -> bool:
    from kms.lab.pilot import running_network
    from kms.provision.peers import add_link, add_peer

    a, b = sites[SITE_A], sites[SITE_B]
    with _maybe_devices(directory / "devices", device) as devices:
        if devices is not None:
            # Device links differ per end (master at A, follower at B), and need each other's URL.
            add_peer(a.config_path, directory / f"{SITE_B}.bundle.json", b.url)
            add_peer(b.config_path, directory / f"{SITE_A}.bundle.json", a.url)
            dev = directory / "devices"
            options_a = device_link_options(dev, devices["A"], "master", "kme-a", "kme-b")
            options_b = device_link_options(dev, devices["B"], "follower", "kme-b", "kme-a")
            add_link(a.config_path, PILOT_LINK, SITE_B, "etsi014", options_a)
            add_link(b.config_path, PILOT_LINK, SITE_A, "etsi014", options_b)
            console.print(f"simulated QKD device pair: device A {devices['A']}, device B {devices['B']}")
        with running_network(sites):
            for site in (a, b):
                log_path = site.process.log_path if site.process else None
                console.print(f"{site.kme_id} serving on {site.url} (log {log_path})")
            master = SaeEndpoint(MASTER_SAE, a.url, a.ca, *a.sae_credentials(MASTER_SAE))
            slave = SaeEndpoint(SLAVE_SAE, b.url, b.ca, *b.sae_credentials(SLAVE_SAE))
            console.print(f"waiting for keys shared by {SITE_A} and {SITE_B} (up to {wait:g} s)")
            result = run_exchange(master, slave, number, None, wait)
            return report_exchange(master, slave, result)
