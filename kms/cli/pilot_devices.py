"""Simulated-physics links for ``qkms pilot network --links device``: one simulated QKD device pair
per link of the topology (``qkms sim device serve``, full decoy-BB84 physics over the link's fibre
length), each KME an SAE of its end's device.

A random test source is paced at the analytic key rate, which is what scale needs; a device pair
simulates every block, which is what a small network's pilot should show (QBER, finite-key
aborts, key rates that vary). Each device pair is a process of its own and simulates as fast as its
CPU share allows, so this is for a handful of links (``MAX_DEVICE_LINKS``), not for 31.

The ends of a device link differ, as in ``qkms pilot two-site --link device``: the KME at the link's
``a`` end is the ETSI 014 master (it pulls keys and announces their key_IDs), the one at ``b`` the
follower (it fetches the same keys from its own device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from kms.cli.pilot import device_link_options, serve_device_pair
from kms.lab.network_topology import Link, NetworkTopology, TopologyError
from kms.lab.pilot import LinkSpec

MAX_DEVICE_LINKS = 8
# Link seconds per block: about 10^5 secret bits at the asymptotic rate, enough detections for a
# positive finite-key length (gys at 10 km, a 2 MHz source: 69 s; snspd-modern at 1 GHz: 1 s), at
# least 1 s and at most 120 s of link time (simulated faster than that with fast pacing).
TARGET_BLOCK_BITS = 1e5
BLOCK_SECONDS = (1.0, 120.0)


def block_seconds(topo: NetworkTopology, link: Link) -> float:
    """Link time per block for ``link`` at the topology's preset (its asymptotic key rate)."""
    from qkd_adapters.sim import analytic
    from qkd_adapters.sim.params import load_preset

    params = load_preset(topo.preset, length_km=link.length_km)
    rate = analytic.key_rate_weak_vacuum(params) * params.clock_rate_hz
    if rate <= 0:
        raise TopologyError(f"{link.id}: no secret key at {link.length_km:g} km with preset {topo.preset}")
    low, high = BLOCK_SECONDS
    return round(min(high, max(low, TARGET_BLOCK_BITS / rate)), 1)


def serve_options(topo: NetworkTopology, link: Link) -> tuple[str, ...]:
    """``qkms sim device serve`` options for one link: its preset and length, as fast as the CPU
    allows, and a small key buffer so a full link pauses instead of burning CPU."""
    return (
        "--preset", topo.preset, "--distance", f"{link.length_km:g}",
        "--block-seconds", f"{block_seconds(topo, link):g}",
        "--pacing", "fast", "--max-stored-bits", "262144", "--log-level", "warning",
    )  # fmt: skip


@contextlib.contextmanager
def device_links(root: Path, topo: NetworkTopology) -> Iterator[list[LinkSpec]]:
    """Start a device pair per link (under ``root``/devices) and yield the links' specs; every pair
    stops on exit. ``TopologyError`` for too many links or a link without secret key."""
    from kms.cli.device import init_device_dir
    from kms.lab.launcher import free_port

    if len(topo.links) > MAX_DEVICE_LINKS:
        raise TopologyError(
            f"{topo.name} has {len(topo.links)} links; device links are for up to {MAX_DEVICE_LINKS}"
            " (one simulating process each): use --links random"
        )
    options = {lk.id: serve_options(topo, lk) for lk in topo.links}  # refuse before starting any
    specs: list[LinkSpec] = []
    with contextlib.ExitStack() as stack:
        for lk in topo.links:
            directory = root / "devices" / lk.id
            init_device_dir(directory, lk.a, lk.b)
            ports = {"A": free_port(), "B": free_port()}
            urls = stack.enter_context(serve_device_pair(directory, ports, *options[lk.id]))
            master = device_link_options(directory, urls["A"], "master", lk.a, lk.b)
            follower = device_link_options(directory, urls["B"], "follower", lk.b, lk.a)
            specs.append(LinkSpec(lk.id, lk.a, lk.b, "etsi014", master, follower))
        yield specs
