"""Link-state routing over real KME processes (issue 18): a chain relays end to end with no client
traffic at the trusted nodes, and a ring routes around a killed KME within the same request.

Before link-state flooding a KME learned far links only when it routed a request itself, so a chain
of 5 answered every Get key with 503 "no route" and a ring kept sending to the dead neighbour.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kms.lab.pilot import LinkSpec, SiteSpec, prepare_network, running_network
from tests.peer.conftest import POOL, Network, query

LINK = {"block_bits": 65536}


def chain_of(n: int) -> tuple[list[SiteSpec], list[LinkSpec]]:
    kmes = [f"KME-{i}" for i in range(n)]
    sites = [SiteSpec(k, (f"SAE-{i}",)) for i, k in enumerate(kmes)]
    links = [LinkSpec(f"link-{i}-{i + 1}", kmes[i], kmes[i + 1], options=LINK) for i in range(n - 1)]
    return sites, links


def wait_for_route(net: Network, site: str, master: str, slave: str, timeout: float) -> float:
    """Seconds until the master's KME reports key it can relay to ``slave`` (Get status only)."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        r = net.sae(site, master).get(f"/api/v1/keys/{slave}/status")
        last = r.status_code, r.text[:200]
        if r.status_code == 200 and r.json()["stored_key_count"] > 0:
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"{site} found no route to {slave} within {timeout} s (last answer {last})")


def exchange(net: Network, master_site: str, master: str, slave_site: str, slave: str) -> None:
    got = net.sae(master_site, master).post(f"/api/v1/keys/{slave}/enc_keys", json={"number": 2})
    assert got.status_code == 200, got.text
    keys = got.json()["keys"]
    fetched = net.sae(slave_site, slave).post(
        f"/api/v1/keys/{master}/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
    )
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["keys"] == keys


@pytest.fixture(scope="module")
def chain5(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    sites, links = chain_of(5)
    net = Network(prepare_network(tmp_path_factory.mktemp("chain5"), sites, links, pool=POOL), {})
    with running_network(net.sites):
        try:
            yield net
        finally:
            net.close()


def test_a_chain_of_five_relays_end_to_end_without_traffic_at_the_trusted_nodes(chain5: Network) -> None:
    # Only the end KMEs are ever asked anything: the middle ones learn the network by flooding.
    wait_for_route(chain5, "KME-0", "SAE-0", "SAE-4", timeout=60)
    exchange(chain5, "KME-0", "SAE-0", "KME-4", "SAE-4")
    exchange(chain5, "KME-4", "SAE-4", "KME-0", "SAE-0")
    # Every KME holds every KME's record (its own included), signed and stored for all its processes.
    for site in chain5.sites.values():
        origins = {str(r[0]) for r in query(site, "SELECT origin_kme_id FROM link_state_records")}
        assert origins == set(chain5.sites), (site.kme_id, origins)


@pytest.fixture
def ring5(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    sites, links = chain_of(5)
    links.append(LinkSpec("link-4-0", "KME-4", "KME-0", options=LINK))
    net = Network(prepare_network(tmp_path_factory.mktemp("ring5"), sites, links, pool=POOL), {})
    with running_network(net.sites):
        try:
            yield net
        finally:
            net.close()


def test_a_ring_routes_around_a_killed_kme_within_the_request(ring5: Network) -> None:
    # KME-0 to KME-2: two hops through KME-1, or three through KME-4 and KME-3.
    wait_for_route(ring5, "KME-0", "SAE-0", "SAE-2", timeout=60)
    wait_for_route(ring5, "KME-4", "SAE-4", "SAE-2", timeout=60)
    exchange(ring5, "KME-0", "SAE-0", "KME-2", "SAE-2")
    killed = ring5.sites["KME-1"].process
    assert killed is not None
    killed.kill()
    # The very next request: the first hop refuses the connection, KME-0 tries the other way round.
    started = time.monotonic()
    exchange(ring5, "KME-0", "SAE-0", "KME-2", "SAE-2")
    assert time.monotonic() - started < 5
    # And it stays so: the dead KME is routed around (its neighbours say its links are down).
    for _ in range(3):
        exchange(ring5, "KME-0", "SAE-0", "KME-2", "SAE-2")
