"""Link-state routing over real KME processes (issue 18): a chain relays end to end with no client
traffic at the trusted nodes, and a ring routes around a killed KME within the same request.

Before link-state flooding a KME learned far links only when it routed a request itself, so a chain
of 5 answered every Get key with 503 "no route" and a ring kept sending to the dead neighbour.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from kms.config import KmsSettings
from kms.lab.pilot import LinkSpec, Site, SiteSpec, prepare_network, running_network
from kms.peer.client import PeerRefused
from kms.peer.messages import MessageRejected
from kms.runtime.assembly import build_runtime
from tests.peer.conftest import POOL, Network, assert_stores_check_out, query

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


def wait_for_link_stock(net: Network, at: str, hops: list[tuple[str, str]], bits: int = 4096) -> None:
    """Until KME ``at`` holds records saying each (origin, neighbour) link is active with ``bits``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = {
            str(o): json.loads(str(r))
            for o, r in query(net.sites[at], "SELECT origin_kme_id, record FROM link_state_records")
        }
        if all(
            any(
                p == peer and st == "active" and b >= bits
                for p, _, st, b in records.get(origin, {}).get("links", [])
            )
            for origin, peer in hops
        ):
            return
        time.sleep(0.25)
    raise AssertionError(f"{at} never learned stock on {hops}")


def qkms_link(net: Network, site: str, action: str, link_id: str) -> None:
    config = str(net.sites[site].config_path)
    done = subprocess.run(
        [sys.executable, "-m", "kms", "link", action, link_id, "--config", config],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def wait_for_link_state(net: Network, at: str, origin: str, link_id: str, state: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = query(
            net.sites[at], "SELECT record FROM link_state_records WHERE origin_kme_id = :o", o=origin
        )
        if rows and any(lk[1] == link_id and lk[2] == state for lk in json.loads(str(rows[0][0]))["links"]):
            return
        time.sleep(0.25)
    raise AssertionError(f"{at} never heard that {origin}'s {link_id} is {state}")


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
    # And every KME's store and audit trail check out, the trusted nodes' relay copies included
    # (before, db check flagged each relayed key as consumed without a record at the middle KMEs).
    assert_stores_check_out(chain5.sites)


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
    wait_for_link_stock(ring5, "KME-0", [("KME-4", "KME-3"), ("KME-3", "KME-2")])
    exchange(ring5, "KME-0", "SAE-0", "KME-2", "SAE-2")
    # A link suspended only at its far end (KME-2) is routed around: KME-1 still says it is active.
    qkms_link(ring5, "KME-2", "suspend", "link-1-2")
    wait_for_link_state(ring5, "KME-0", "KME-2", "link-1-2", "suspended")
    for _ in range(3):
        exchange(ring5, "KME-0", "SAE-0", "KME-2", "SAE-2")
    qkms_link(ring5, "KME-2", "resume", "link-1-2")
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


def test_a_failed_relays_keys_are_withdrawn_end_to_end_around_a_dead_node(ring5: Network) -> None:
    """The master's KME withdraws keys at the far end of a route whose middle node died: the signed
    cancel travels the other way round the ring (``relay.forward``), and only the origin's own
    signature is acted on."""
    wait_for_route(ring5, "KME-0", "SAE-0", "SAE-2", timeout=60)
    at_slave = ring5.sites["KME-2"]
    for _ in range(20):  # keys that went the short way, through KME-1 (routes follow the stock)
        got = ring5.sae("KME-0", "SAE-0").post("/api/v1/keys/SAE-2/enc_keys", json={"number": 2})
        assert got.status_code == 200, got.text
        ids = [k["key_ID"] for k in got.json()["keys"]]
        (route,) = query(at_slave, "SELECT route FROM keys WHERE key_id = :k", k=ids[0])[0]
        if [h["from"] for h in json.loads(str(route))] == ["KME-0", "KME-1"]:
            break
    else:
        raise AssertionError("no key went through KME-1")
    assert key_states(at_slave, ids) == {"reserved"}  # recorded at the slave's KME, not fetched yet
    wait_for_link_stock(ring5, "KME-0", [("KME-4", "KME-3"), ("KME-3", "KME-2")], bits=0)
    dead = ring5.sites["KME-1"].process
    assert dead is not None
    dead.kill()
    rt0 = build_runtime(KmsSettings.load(ring5.sites["KME-0"].config_path), sync_registry=False)
    rt4 = build_runtime(KmsSettings.load(ring5.sites["KME-4"].config_path), sync_registry=False)
    try:
        assert rt0.network is not None and rt4.network is not None
        cancel = {"origin": "KME-0", "key_IDs": ids}
        # Another KME of the ring cannot withdraw KME-0's keys at KME-2 (it is not on their route).
        rt4.network.routed.send("KME-2", "keys.cancel", cancel)
        assert key_states(at_slave, ids) == {"reserved"}
        # Nor does a tampered envelope get through: KME-2 refuses it, KME-3 says so.
        _, raw, header = rt0.network.client.sealer.seal("KME-2", "keys.cancel", cancel)
        tampered = raw.replace(b'"KME-0"', b'"KME-4"', 1)
        envelope = {"to": "KME-2", "hops_left": 8, "header": header}
        with pytest.raises(PeerRefused, match="does not verify"):
            rt4.network.client.call(
                "KME-3", "relay.forward", {**envelope, "message": base64.b64encode(tampered).decode()}
            )
        assert key_states(at_slave, ids) == {"reserved"}
        # The origin's own cancel goes KME-0 -> KME-4 -> KME-3 -> KME-2 and withdraws both keys.
        reply = rt0.network.routed.send("KME-2", "keys.cancel", cancel)
        assert reply["delivered"] is True and reply["reply"]["withdrawn"] == 2, reply
        # Only withdrawals travel this way.
        inner = rt4.network.client.sealer.seal("KME-0", "topology", {})
        outer = rt4.network.client.sealer.seal(
            "KME-0",
            "relay.forward",
            {
                "to": "KME-0",
                "hops_left": 2,
                "message": base64.b64encode(inner[1]).decode(),
                "header": inner[2],
            },
        )
        with pytest.raises(MessageRejected, match="not carried"):
            rt0.network.routed.on_forward(outer[0])
    finally:
        rt0.close()
        rt4.close()
    assert key_states(at_slave, ids) == {"destroyed"}
    fetched = ring5.sae("KME-2", "SAE-2").post(
        "/api/v1/keys/SAE-0/dec_keys", json={"key_IDs": [{"key_ID": k} for k in ids]}
    )
    assert fetched.status_code == 400, fetched.text


def key_states(site: Site, key_ids: list[str]) -> set[str]:
    marks = ", ".join(f":k{i}" for i in range(len(key_ids)))
    params = {f"k{i}": k for i, k in enumerate(key_ids)}
    return {str(r[0]) for r in query(site, f"SELECT state FROM keys WHERE key_id IN ({marks})", **params)}
