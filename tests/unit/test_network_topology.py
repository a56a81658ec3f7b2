"""Topologies for ``qkms pilot network`` (issue 18): the shipped networks, ``chain:N[:KM]`` and
``ring:N[:KM]``, bad input refused with one line, and the plan for simulated device links (block
length per link, the cap on their number, the two ends' different options)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kms.cli.pilot_devices import BLOCK_SECONDS, MAX_DEVICE_LINKS, block_seconds, serve_options
from kms.lab.network_topology import TopologyError, load_topology, uniform
from kms.lab.pilot import LinkSpec, SiteSpec, prepare_network


@pytest.mark.parametrize(
    ("name", "nodes", "links"),
    [("beijing-shanghai", 32, 31), ("secoqc-vienna", 6, 8), ("darpa", 10, None)],
)
def test_the_shipped_topologies_load_with_a_positive_rate_on_every_link(
    name: str, nodes: int, links: int | None
) -> None:
    topo = load_topology(name)
    assert len(topo.nodes) == nodes
    assert links is None or len(topo.links) == links
    ids = {n.id for n in topo.nodes}
    assert all(lk.a in ids and lk.b in ids and lk.length_km > 0 for lk in topo.links)
    assert all(0 < topo.link_rate_bps(lk) <= topo.max_rate_bps for lk in topo.links)


def test_chains_and_rings_take_a_length() -> None:
    chain = load_topology("chain:4:10")
    assert [lk.length_km for lk in chain.links] == [10.0, 10.0, 10.0]
    assert len(load_topology("ring:5").links) == 5 and load_topology("ring:5").links[0].length_km == 50.0
    for bad in ("chain:1", "ring:2", "chain:65", "chain:3:0", "chain:3:abc", "mesh:4", "no-such-net"):
        with pytest.raises(TopologyError):
            load_topology(bad)


def test_device_blocks_are_longer_on_longer_links_within_bounds() -> None:
    topo = uniform("chain", 4)
    short, long = topo.links[0], topo.links[1]
    gys = type(topo)(topo.name, topo.nodes, (short.__class__(short.a, short.b, 5.0, False), long), "gys")
    low, high = BLOCK_SECONDS
    seconds = [block_seconds(gys, lk) for lk in gys.links]
    assert low <= seconds[0] < seconds[1] == high, seconds  # gys: 2 MHz, 205 bit/s at 50 km
    assert block_seconds(topo, topo.links[0]) == low  # snspd-modern at 1 GHz: 5.3 Mbit/s at 50 km
    options = serve_options(gys, gys.links[1])
    assert options[options.index("--distance") + 1] == "50"
    assert options[options.index("--pacing") + 1] == "fast"


def test_too_many_device_links_are_refused_before_anything_starts(tmp_path: Path) -> None:
    directory = tmp_path / "net"
    args = [
        "pilot",
        "network",
        "--topology",
        "beijing-shanghai",
        "--links",
        "device",
        "--dir",
        str(directory),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "kms", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"device links are for up to {MAX_DEVICE_LINKS}" in proc.stderr
    assert not (directory / "devices").exists() and not (directory / "KME-01").exists()


def test_a_link_whose_ends_differ_gets_each_end_its_own_options(tmp_path: Path) -> None:
    sites = prepare_network(
        tmp_path,
        [SiteSpec("KME-A", ("SAE-A",)), SiteSpec("KME-B", ("SAE-B",))],
        [LinkSpec("link-ab", "KME-A", "KME-B", "etsi014", {"role": "master"}, {"role": "follower"})],
    )
    roles = {}
    for kme, site in sites.items():
        config = tomllib.loads(site.config_path.read_text())
        (link,) = [lk for lk in config["links"] if lk["id"] == "link-ab"]
        roles[kme] = link["options"]["role"]
    assert roles == {"KME-A": "master", "KME-B": "follower"}
