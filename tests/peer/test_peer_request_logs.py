"""Request IDs across KMEs (DECISIONS.md D-37): an SAE's Get key for a slave at another KME is logged
at the master's KME under the SAE's ``X-Request-ID``, and the peer messages sent for it carry that ID
to the slave's KME, whose ``request`` lines for them name the sending KME and the message type. No
key of the run appears in either log."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kms.lab.pilot import Site, running_network
from tests.peer.conftest import Network, open_network, wait_for_remote_keys


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = open_network(tmp_path_factory.mktemp("peer-request-logs"), {})
    with running_network(network.sites):
        try:
            wait_for_remote_keys(network, "KME-A", "SAE-A1", "SAE-B1", minimum=4)
            yield network
        finally:
            network.close()


def lines(site: Site) -> list[dict[str, Any]]:
    assert site.process is not None and site.process.log_path is not None
    return [json.loads(x) for x in site.process.log_path.read_text().splitlines() if x.strip()]


def test_a_request_id_follows_the_keys_to_the_peer_kme(net: Network) -> None:
    master, slave = net.sae("KME-A", "SAE-A1"), net.sae("KME-B", "SAE-B1")
    enc = master.post(
        "/api/v1/keys/SAE-B1/enc_keys", json={"number": 2}, headers={"X-Request-ID": "xsite-enc-1"}
    )
    assert enc.status_code == 200, enc.text
    assert enc.headers["x-request-id"] == "xsite-enc-1"
    ids = [{"key_ID": k["key_ID"]} for k in enc.json()["keys"]]
    dec = slave.post(
        "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": ids}, headers={"X-Request-ID": "xsite-dec-1"}
    )
    assert dec.status_code == 200, dec.text
    # A request's line is written once its answer has gone out: wait for the last one.
    deadline = time.monotonic() + 10
    while True:
        at_a, at_b = lines(net.sites["KME-A"]), lines(net.sites["KME-B"])
        if any(x.get("request_id") == "xsite-dec-1" for x in at_b) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    (sae_line,) = [x for x in at_a if x["event"] == "request" and x.get("request_id") == "xsite-enc-1"]
    assert (sae_line["sae_id"], sae_line["endpoint"], sae_line["status"]) == ("SAE-A1", "enc_keys", 200)
    carried = [x for x in at_b if x["event"] == "request" and x.get("request_id") == "xsite-enc-1"]
    assert carried, "the peer KME logged no message under the SAE's request ID"
    for line in carried:
        assert (line["endpoint"], line["peer_kme_id"], line["status"]) == ("peer", "KME-A", 200), line
        assert line["peer_message"] and "sae_id" not in line
    (dec_line,) = [x for x in at_b if x["event"] == "request" and x.get("request_id") == "xsite-dec-1"]
    assert (dec_line["sae_id"], dec_line["endpoint"], dec_line["status"]) == ("SAE-B1", "dec_keys", 200)
    # Background peer traffic (block confirmations, sync) is logged too, without a request of an SAE.
    assert any(x["event"] == "request" and x.get("endpoint") == "peer" for x in at_a)
    assert not any(x.get("logger") == "httpx" for x in at_a + at_b)  # the peer client's calls: not twice
    text = "".join(
        s.process.log_path.read_text() for s in net.sites.values() if s.process and s.process.log_path
    )
    for key in enc.json()["keys"]:
        assert key["key"] not in text and base64.b64decode(key["key"]).hex() not in text
