"""A neighbour that declines MAC keys (``peering.hop_macs = false``, as a KME from before DECISIONS.md
D-35 would by not knowing ``session.key``) is still served: the other KME signs every message to it.
Two real KMEs on 127.0.0.1; KME-B has MACs off, KME-A on."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterator

import pytest
import tomli_w

from kms.lab.pilot import running_network
from tests.peer.conftest import Network, open_network, query, wait_for_remote_keys


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = open_network(tmp_path_factory.mktemp("hop-macs-off"), {})
    cfg_path = network.sites["KME-B"].config_path
    config = tomllib.loads(cfg_path.read_text())
    config.setdefault("peering", {})["hop_macs"] = False
    cfg_path.write_text(tomli_w.dumps(config))
    with running_network(network.sites):
        try:
            yield network
        finally:
            network.close()


def test_keys_flow_both_ways_with_every_message_signed(net: Network) -> None:
    # Announcements, claims, topology and ledger entries pass in both directions, so A asked B for a
    # MAC key (refused) and fell back to signatures; B never asked.
    wait_for_remote_keys(net, "KME-A", "SAE-A1", "SAE-B1")
    wait_for_remote_keys(net, "KME-B", "SAE-B1", "SAE-A1")
    for master_site, master, slave_site, slave in (
        ("KME-A", "SAE-A1", "KME-B", "SAE-B1"),
        ("KME-B", "SAE-B1", "KME-A", "SAE-A1"),
    ):
        enc = net.sae(master_site, master).post(f"/api/v1/keys/{slave}/enc_keys", json={"number": 2})
        assert enc.status_code == 200, enc.text
        ids = [{"key_ID": k["key_ID"]} for k in enc.json()["keys"]]
        dec = net.sae(slave_site, slave).post(f"/api/v1/keys/{master}/dec_keys", json={"key_IDs": ids})
        assert dec.status_code == 200, dec.text
        same = [k["key"] for k in dec.json()["keys"]] == [k["key"] for k in enc.json()["keys"]]
        assert same, "the slave's keys differ from the master's"  # no key material in the output
    for site in ("KME-A", "KME-B"):
        assert query(net.sites[site], "SELECT COUNT(*) FROM peer_mac_keys") == [(0,)]


def test_hop_by_hop_messages_from_the_mac_side_arrive_signed(net: Network) -> None:
    # KME-A's link-state record reaches KME-B only by hop messages (topology exchange, flood) that A
    # would MAC: B holding it shows A fell back to signing them.
    deadline = time.monotonic() + 30
    held: list[tuple[object, ...]] = []
    while time.monotonic() < deadline and not held:
        held = query(net.sites["KME-B"], "SELECT seq FROM link_state_records WHERE origin_kme_id = 'KME-A'")
        time.sleep(0.2)
    assert held, "KME-B never received KME-A's link-state record"
