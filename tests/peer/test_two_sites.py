"""Two sites: enc_keys at KME A, dec_keys at KME B — through real processes and the peer protocol."""

from __future__ import annotations

from tests.peer.conftest import Network


def enc(net: Network, site: str, master: str, slave: str, **body: object) -> list[dict[str, str]]:
    r = net.sae(site, master).post(f"/api/v1/keys/{slave}/enc_keys", json={"number": 2, "size": 256, **body})
    assert r.status_code == 200, r.text
    keys: list[dict[str, str]] = r.json()["keys"]
    return keys


def dec(net: Network, site: str, slave: str, master: str, key_ids: list[str]) -> list[dict[str, str]]:
    r = net.sae(site, slave).post(
        f"/api/v1/keys/{master}/dec_keys", json={"key_IDs": [{"key_ID": k} for k in key_ids]}
    )
    assert r.status_code == 200, r.text
    keys: list[dict[str, str]] = r.json()["keys"]
    return keys


def test_enc_at_a_dec_at_b_gives_identical_keys(two_sites: Network) -> None:
    keys = enc(two_sites, "KME-A", "SAE-A1", "SAE-B1")
    got = dec(two_sites, "KME-B", "SAE-B1", "SAE-A1", [k["key_ID"] for k in keys])
    assert [k["key_ID"] for k in got] == [k["key_ID"] for k in keys]
    assert [k["key"] for k in got] == [k["key"] for k in keys]


def test_both_sites_can_be_master_at_once(two_sites: Network) -> None:
    from_a = enc(two_sites, "KME-A", "SAE-A1", "SAE-B1")
    from_b = enc(two_sites, "KME-B", "SAE-B2", "SAE-A2")
    at_b = dec(two_sites, "KME-B", "SAE-B1", "SAE-A1", [k["key_ID"] for k in from_a])
    at_a = dec(two_sites, "KME-A", "SAE-A2", "SAE-B2", [k["key_ID"] for k in from_b])
    assert [k["key"] for k in at_b] == [k["key"] for k in from_a]
    assert [k["key"] for k in at_a] == [k["key"] for k in from_b]
    # The two directions cut disjoint pieces of the shared blocks: no key equals another.
    assert len({k["key"] for k in from_a + from_b}) == 4


def test_status_names_the_remote_kme(two_sites: Network) -> None:
    r = two_sites.sae("KME-A", "SAE-A1").get("/api/v1/keys/SAE-B1/status")
    assert r.status_code == 200
    body = r.json()
    assert body["source_KME_ID"] == "KME-A"
    assert body["target_KME_ID"] == "KME-B"
    assert body["stored_key_count"] > 0


def test_401_rule_across_sites(two_sites: Network) -> None:
    keys = enc(two_sites, "KME-A", "SAE-A1", "SAE-B1")
    ids = [k["key_ID"] for k in keys]
    wrong_slave = two_sites.sae("KME-B", "SAE-B2").post(
        "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k} for k in ids]}
    )
    assert wrong_slave.status_code == 401
    assert "message" in wrong_slave.json()
    at_master_site = two_sites.sae("KME-A", "SAE-A2").post(
        "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k} for k in ids]}
    )
    assert at_master_site.status_code == 401
    # The rightful slave still gets them: the refusals consumed nothing.
    assert [k["key"] for k in dec(two_sites, "KME-B", "SAE-B1", "SAE-A1", ids)] == [k["key"] for k in keys]


def test_keys_are_served_once_at_the_slave_site(two_sites: Network) -> None:
    keys = enc(two_sites, "KME-A", "SAE-A1", "SAE-B1")
    ids = [k["key_ID"] for k in keys]
    dec(two_sites, "KME-B", "SAE-B1", "SAE-A1", ids)
    again = two_sites.sae("KME-B", "SAE-B1").post(
        "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k} for k in ids]}
    )
    assert again.status_code == 200  # a retry inside the redelivery window: the same keys again
    assert [k["key"] for k in again.json()["keys"]] == [k["key"] for k in keys]
    other = two_sites.sae("KME-B", "SAE-B2").post(
        "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k} for k in ids]}
    )
    assert other.status_code == 401


def test_multicast_to_slaves_at_the_other_site(two_sites: Network) -> None:
    keys = enc(two_sites, "KME-A", "SAE-A1", "SAE-B1", additional_slave_SAE_IDs=["SAE-B2", "SAE-B3"])
    ids = [k["key_ID"] for k in keys]
    for slave in ("SAE-B1", "SAE-B2", "SAE-B3"):
        assert [k["key"] for k in dec(two_sites, "KME-B", slave, "SAE-A1", ids)] == [k["key"] for k in keys]


def test_multicast_mixing_sites_is_refused(two_sites: Network) -> None:
    r = two_sites.sae("KME-A", "SAE-A1").post(
        "/api/v1/keys/SAE-B1/enc_keys", json={"number": 1, "additional_slave_SAE_IDs": ["SAE-A2"]}
    )
    assert r.status_code == 400
    assert "same KME" in r.json()["message"]


def test_remote_sae_cannot_call_here(two_sites: Network) -> None:
    """SAE-B1's certificate is from site B's CA and registered only there: site A refuses it."""
    site_b = two_sites.sites["KME-B"]
    import httpx

    from kms.lab.launcher import client_ssl_context

    cert, key = site_b.sae_credentials("SAE-B1")
    ctx = client_ssl_context(two_sites.sites["KME-A"].ca, cert, key)
    with httpx.Client(base_url=two_sites.sites["KME-A"].url, verify=ctx) as client:
        try:
            r = client.get("/api/v1/keys/SAE-A1/status")
        except httpx.HTTPError:
            return  # refused at the handshake is as good
        assert r.status_code == 401
