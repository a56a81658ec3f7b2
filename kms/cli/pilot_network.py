"""``qkms pilot network``: a whole trusted-node network from a topology file, as plain processes.

Every node of the topology (``kms.lab.network_topology``) becomes a KME site with its own CA, KEK,
database and one SAE; every KME gets every other's bundle (URLs only for its neighbours), each link
is declared at both ends. The command starts them all, waits until every KME holds every KME's
link-state record (DECISIONS.md D-26), then exchanges keys between two chosen ends over the relay.
Nothing here prints key material.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import httpx
import typer
from rich.table import Table

from kms.cli.pilot import ExchangeError, SaeEndpoint, console, err_console, report_exchange, run_exchange

if TYPE_CHECKING:
    from kms.lab.network_topology import NetworkTopology
    from kms.lab.pilot import LinkSpec, Site

# Small pools: a pilot relays a handful of keys; 8 Mibit per link end fills in seconds and then stops.
NETWORK_POOL = {"max_pool_bits": 8 * 1024 * 1024, "reserved_ttl_seconds": 60.0}


def network(
    topology: Annotated[
        str,
        typer.Option(
            "--topology",
            help="A shipped topology (beijing-shanghai, secoqc-vienna, darpa), chain:N, ring:N or a TOML file.",
        ),
    ],
    directory: Annotated[Path, typer.Option("--dir", help="Where to create the sites (new or empty).")],
    source: Annotated[
        str | None, typer.Option("--from", help="The master SAE's node (default: the first).")
    ] = None,
    target: Annotated[
        str | None, typer.Option("--to", help="The slave SAE's node (default: the last).")
    ] = None,
    number: Annotated[int, typer.Option("--number", min=1, max=128, help="Keys to exchange.")] = 4,
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for the network to converge.")
    ] = 180.0,
    hold: Annotated[
        float, typer.Option("--hold", help="Keep the network running this many seconds after.")
    ] = 0.0,
    links: Annotated[
        str,
        typer.Option(
            "--links",
            help="'random' (test sources paced at each link's analytic key rate; any size) or 'device'"
            " (a simulated QKD device pair with full physics per link; up to 8 links).",
        ),
    ] = "random",
    preset: Annotated[
        str | None,
        typer.Option("--preset", help="Detector and fibre preset for every link (default: the topology's)."),
    ] = None,
) -> None:
    """Start every KME of a topology, wait until each knows the whole network, relay keys end to end."""
    from kms.lab.network_topology import TopologyError, load_topology
    from kms.lab.pilot import prepare_network

    if links not in ("random", "device"):
        raise typer.BadParameter("--links must be 'random' or 'device'")
    try:
        topo = load_topology(topology)
        if preset is not None:
            topo = dataclasses.replace(topo, preset=preset)
        ids = [n.id for n in topo.nodes]
        source = source or ids[0]
        target = target or ids[-1]
        for node in (source, target):
            if node not in ids:
                raise TopologyError(f"node {node} is not in the topology ({', '.join(ids)})")
        sites_spec, links_spec = topo.specs()
    except TopologyError as exc:
        err_console.print(f"error: {exc}", markup=False)
        raise typer.Exit(2) from exc
    if directory.exists() and any(directory.iterdir()):
        err_console.print(f"error: {directory} is not empty; choose a new directory", markup=False)
        raise typer.Exit(2)
    directory.mkdir(parents=True, exist_ok=True)
    _print_topology(topo)
    console.print(f"preparing {len(ids)} sites in {directory}")
    with contextlib.ExitStack() as devices:
        if links == "device":
            links_spec = _start_devices(devices, directory, topo)
        sites = prepare_network(directory, sites_spec, links_spec, pool=NETWORK_POOL)
        ok = _run(sites, topo, source, target, number, wait, hold)
    console.print("every KME stopped")
    raise typer.Exit(0 if ok else 1)


def _start_devices(
    stack: contextlib.ExitStack[bool | None], directory: Path, topo: NetworkTopology
) -> list[LinkSpec]:
    from kms.cli.pilot_devices import device_links
    from kms.lab.network_topology import TopologyError

    console.print(f"starting {len(topo.links)} simulated QKD device pairs ({topo.preset}, fast pacing)")
    try:
        return stack.enter_context(device_links(directory, topo))
    except (TopologyError, ExchangeError) as exc:
        err_console.print(f"error: {exc}", markup=False)
        raise typer.Exit(2 if isinstance(exc, TopologyError) else 1) from exc


def _run(
    sites: dict[str, Site],
    topo: NetworkTopology,
    source: str,
    target: str,
    number: int,
    wait: float,
    hold: float,
) -> bool:
    """Start every KME, wait for convergence, exchange keys from ``source`` to ``target``."""
    from kms.lab.pilot import running_network

    started = time.monotonic()
    with running_network(sites, start_timeout=max(60.0, 4.0 * len(sites))):
        console.print(f"{len(sites)} KMEs serving on 127.0.0.1 after {time.monotonic() - started:.1f} s")
        try:
            converged = _wait_converged(sites, wait)
            console.print(
                f"every KME holds every KME's link-state record {converged:.1f} s after the last started"
            )
            a, b = sites[source], sites[target]
            master = SaeEndpoint(topo.sae(source), a.url, a.ca, *a.sae_credentials(topo.sae(source)))
            slave = SaeEndpoint(topo.sae(target), b.url, b.ca, *b.sae_credentials(topo.sae(target)))
            ok = report_exchange(master, slave, run_exchange(master, slave, number, None, wait))
        except (ExchangeError, httpx.HTTPError, TimeoutError) as exc:
            err_console.print(f"error: {exc}", markup=False)
            raise typer.Exit(1) from exc
        if hold > 0:
            console.print(f"holding the network for {hold:g} s (Ctrl-C stops it)")
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(hold)
    return ok


def _print_topology(topo: object) -> None:
    from kms.lab.network_topology import NetworkTopology

    assert isinstance(topo, NetworkTopology)
    table = Table(
        title=f"{topo.name}: {len(topo.nodes)} nodes, {len(topo.links)} links ({topo.preset} rates)"
    )
    for column in ("link", "km", "estimate", "key rate bit/s"):
        table.add_column(column)
    for lk in topo.links:
        table.add_row(
            lk.id, f"{lk.length_km:g}", "yes" if lk.estimate else "", f"{topo.link_rate_bps(lk):,.0f}"
        )
    console.print(table)


def _wait_converged(sites: dict[str, Site], wait: float) -> float:
    """Seconds until every KME's database holds a record of every KME (``link_state_records``)."""
    from kms.config import KmsSettings
    from kms.service.link_state_store import LinkStateStore
    from kms.storage.database import Database

    everyone = set(sites)
    databases = [Database(KmsSettings.load(s.config_path).database.url) for s in sites.values()]
    stores = [LinkStateStore(db, max_age=0) for db in databases]
    started = time.monotonic()
    try:
        while time.monotonic() - started < wait:
            known = [len(everyone & {r.origin for r in store.records()}) for store in stores]
            if min(known) == len(everyone):
                return time.monotonic() - started
            time.sleep(0.5)
        raise TimeoutError(
            f"the network did not converge within {wait:g} s: the least informed KME knows "
            f"{min(known)} of {len(everyone)} KMEs"
        )
    finally:
        for db in databases:
            db.dispose()
