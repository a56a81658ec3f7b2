"""Trusted-node relay over three sites A-B-C (links A-B and B-C, none A-C): real processes."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from kms.lab.pilot import LinkSpec, Site, SiteSpec, prepare_network, running_network
from tests.conftest import database_url
from tests.peer.conftest import POOL, Network, assert_stores_check_out, query, wait_for_remote_keys

POLICY = {
    "mode": "qkd",
    "kem": "ML-KEM-768",
    "rules": [
        {"master": "SAE-A2", "slave": "*", "mode": "hybrid"},
        {"master": "SAE-A1", "slave": "*", "mode": "qkd", "pqc_fallback": True},
    ],
}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    urls = {kme: database_url(request.param, request) for kme in ("KME-A", "KME-B", "KME-C")}
    sites = prepare_network(
        tmp_path_factory.mktemp(f"relay-{request.param}"),
        [
            SiteSpec("KME-A", ("SAE-A1", "SAE-A2"), urls["KME-A"]),
            SiteSpec("KME-B", ("SAE-B1",), urls["KME-B"]),
            SiteSpec("KME-C", ("SAE-C1",), urls["KME-C"]),
        ],
        [
            LinkSpec("link-ab", "KME-A", "KME-B", options={"block_bits": 131072}),
            LinkSpec("link-bc", "KME-B", "KME-C", options={"block_bits": 131072}),
        ],
        pool=POOL,
        policy=POLICY,
    )
    net = Network(sites, {})
    with running_network(sites):
        try:
            wait_for_remote_keys(net, "KME-A", "SAE-A1", "SAE-B1")
            wait_for_remote_keys(net, "KME-B", "SAE-B1", "SAE-C1")
            wait_for_remote_keys(net, "KME-A", "SAE-A1", "SAE-C1", minimum=8)
            yield net
            assert_stores_check_out(sites)
        finally:
            net.close()


def cut_bits(site: Site, link_id: str) -> tuple[int, int]:
    """(bits this KME cut on the link, bits it handed out from its mirror of the peer's pieces)."""
    own = query(
        site,
        "SELECT COALESCE(SUM(next_bit), 0) FROM key_blocks WHERE link_id = :l AND owner_kme_id IS NULL",
        l=link_id,
    )[0][0]
    taken = 0
    for (ranges,) in query(
        site, "SELECT taken FROM key_blocks WHERE link_id = :l AND owner_kme_id IS NOT NULL", l=link_id
    ):
        taken += sum(end - start for start, end in json.loads(str(ranges or "[]")))
    return int(str(own)), taken


def key_row(site: Site, key_id: str, columns: str) -> tuple[object, ...]:
    rows = query(site, f"SELECT {columns} FROM keys WHERE key_id = :k", k=key_id)
    assert len(rows) == 1
    return rows[0]


def test_relayed_key_is_identical_at_a_and_c_and_consumes_each_hop(chain: Network) -> None:
    a, b, c = (chain.sites[k] for k in ("KME-A", "KME-B", "KME-C"))
    before = {
        "a": cut_bits(a, "link-ab"),
        "b_ab": cut_bits(b, "link-ab"),
        "b_bc": cut_bits(b, "link-bc"),
        "c": cut_bits(c, "link-bc"),
    }
    r = chain.sae("KME-A", "SAE-A1").post("/api/v1/keys/SAE-C1/enc_keys", json={"number": 3, "size": 512})
    assert r.status_code == 200, r.text
    keys = r.json()["keys"]
    got = chain.sae("KME-C", "SAE-C1").post(
        "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
    )
    assert got.status_code == 200, got.text
    assert [k["key"] for k in got.json()["keys"]] == [k["key"] for k in keys]
    used = 3 * 512
    assert cut_bits(a, "link-ab")[0] - before["a"][0] == used  # hop A-B: the key itself
    assert cut_bits(b, "link-ab")[1] - before["b_ab"][1] == used  # B took the same bits from its mirror
    assert cut_bits(b, "link-bc")[0] - before["b_bc"][0] == used  # hop B-C: the one-time pad
    assert cut_bits(c, "link-bc")[1] - before["c"][1] == used
    # Provenance at C names the trusted node; the trusted node keeps no material.
    route, source = key_row(c, keys[0]["key_ID"], "route, source_kme_id")
    hops = json.loads(route) if isinstance(route, str) else route
    assert isinstance(hops, list)
    assert source == "KME-A"
    assert [(h["from"], h["to"]) for h in hops] == [("KME-A", "KME-B"), ("KME-B", "KME-C")]
    assert key_row(b, keys[0]["key_ID"], "state, material") == ("consumed", None)


def test_relay_honours_the_hybrid_policy(chain: Network) -> None:
    r = chain.sae("KME-A", "SAE-A2").post("/api/v1/keys/SAE-C1/enc_keys", json={"number": 2})
    assert r.status_code == 200, r.text
    keys = r.json()["keys"]
    got = chain.sae("KME-C", "SAE-C1").post(
        "/api/v1/keys/SAE-A2/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
    )
    assert got.status_code == 200, got.text
    assert [k["key"] for k in got.json()["keys"]] == [k["key"] for k in keys]
    policy, suite, exchange = key_row(
        chain.sites["KME-C"], keys[0]["key_ID"], "policy, suite, kem_exchange_id"
    )
    assert policy == "hybrid" and suite and exchange is not None


def test_suspended_hop_leaves_no_route(chain: Network) -> None:
    """Routing skips unhealthy links: with B-C suspended at B there is no route from A to C."""
    import subprocess
    import sys
    import time

    b_config = str(chain.sites["KME-B"].config_path)
    qkms = [sys.executable, "-m", "kms"]
    subprocess.run(
        [*qkms, "link", "suspend", "--config", b_config, "link-bc"], check=True, capture_output=True
    )
    try:
        time.sleep(2.5)  # A's view of B's links is at most 2 s old
        r = chain.sae("KME-A", "SAE-A1").post("/api/v1/keys/SAE-C1/enc_keys", json={"number": 1})
        assert r.status_code == 503
        assert "no route to KME KME-C" in r.json()["message"]
    finally:
        subprocess.run(
            [*qkms, "link", "resume", "--config", b_config, "link-bc"], check=True, capture_output=True
        )


def test_direct_hybrid_key_to_the_adjacent_site(chain: Network) -> None:
    """SAE-A2's pairs are hybrid: the keys to B go through the batched ledger with an ML-KEM
    ciphertext for B, and B derives the same hybrid keys."""
    r = chain.sae("KME-A", "SAE-A2").post("/api/v1/keys/SAE-B1/enc_keys", json={"number": 3})
    assert r.status_code == 200, r.text
    keys = r.json()["keys"]
    got = chain.sae("KME-B", "SAE-B1").post(
        "/api/v1/keys/SAE-A2/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
    )
    assert got.status_code == 200, got.text
    assert [k["key"] for k in got.json()["keys"]] == [k["key"] for k in keys]
    policy, exchange = key_row(chain.sites["KME-B"], keys[0]["key_ID"], "policy, kem_exchange_id")
    assert policy == "hybrid" and exchange is not None


def test_pqc_fallback_to_the_adjacent_site_while_the_link_is_suspended(chain: Network) -> None:
    """SAE-A1's pairs allow PQC fallback: with link A-B suspended at A, A still delivers ML-KEM-only
    keys to B's slave (encapsulated to B's key, recorded at B through the ledger), labelled so."""
    import subprocess
    import sys
    import time

    a_config = str(chain.sites["KME-A"].config_path)
    qkms = [sys.executable, "-m", "kms"]
    subprocess.run(
        [*qkms, "link", "suspend", "--config", a_config, "link-ab"], check=True, capture_output=True
    )
    try:
        time.sleep(1.0)  # routing's view of A's own links is at most 0.5 s old
        r = chain.sae("KME-A", "SAE-A1").post("/api/v1/keys/SAE-B1/enc_keys", json={"number": 2})
        assert r.status_code == 200, r.text
        keys = r.json()["keys"]
        got = chain.sae("KME-B", "SAE-B1").post(
            "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
        )
        assert got.status_code == 200, got.text
        assert [k["key"] for k in got.json()["keys"]] == [k["key"] for k in keys]
        assert key_row(chain.sites["KME-B"], keys[0]["key_ID"], "policy, block_id") == ("pqc_fallback", None)
        assert key_row(chain.sites["KME-A"], keys[0]["key_ID"], "policy, state") == (
            "pqc_fallback",
            "consumed",
        )
        # A pair without fallback gets a clear 503 instead.
        refused = chain.sae("KME-A", "SAE-A2").post("/api/v1/keys/SAE-B1/enc_keys", json={"number": 1})
        assert refused.status_code == 503
    finally:
        subprocess.run(
            [*qkms, "link", "resume", "--config", a_config, "link-ab"], check=True, capture_output=True
        )
