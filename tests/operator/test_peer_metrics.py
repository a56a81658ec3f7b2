"""Two real KMEs (sites A and B, a shared link, mTLS on 127.0.0.1) with operator listeners: a key for
a slave SAE at the other site shows up as ledger messages counted and timed, the peer as up and
recently heard from; with B stopped, A's scrape shows B down."""

from __future__ import annotations

import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tomli_w
import yaml

from kms.lab.launcher import client_ssl_context, free_port
from kms.lab.pilot import running_network
from tests.operator.test_observability import NAME, RULES, dashboard_exprs, exported_names
from tests.operator.test_operator_listener import samples, value
from tests.peer.conftest import Network, open_network, wait_for_remote_keys


def enable_operator(config_path: Path) -> int:
    port = free_port()
    config = tomllib.loads(config_path.read_text())
    config["operator"] = {
        "enabled": True,
        "port": port,
        "unauthenticated_metrics": True,
        "db_metrics_max_age_seconds": 0,
    }
    config.setdefault("database", {})["require_durable_commits"] = False
    config_path.write_text(tomli_w.dumps(config))
    return port


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Network, dict[str, int]]]:
    net = open_network(tmp_path_factory.mktemp("peer-metrics"), {})
    ports = {kme: enable_operator(site.config_path) for kme, site in net.sites.items()}
    with running_network(net.sites):
        try:
            wait_for_remote_keys(net, "KME-A", "SAE-A1", "SAE-B1")
            yield net, ports
        finally:
            net.close()


def scrape(net: Network, ports: dict[str, int], kme: str) -> str:
    site = net.sites[kme]
    with httpx.Client(verify=client_ssl_context(site.ca, None, None), timeout=10) as client:
        resp = client.get(f"https://127.0.0.1:{ports[kme]}/metrics")
    assert resp.status_code == 200
    return resp.text


def test_ledger_messages_counted_and_peer_seen(network: tuple[Network, dict[str, int]]) -> None:
    net, ports = network
    before = samples(scrape(net, ports, "KME-A"))
    ok = ("qkms_peer_requests_total", (("kind", "ledger"), ("outcome", "ok"), ("peer", "KME-B")))
    enc = net.sae("KME-A", "SAE-A1").post("/api/v1/keys/SAE-B1/enc_keys", json={"number": 3})
    assert enc.status_code == 200, enc.text
    ids = [{"key_ID": k["key_ID"]} for k in enc.json()["keys"]]
    dec = net.sae("KME-B", "SAE-B1").post("/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": ids})
    assert dec.status_code == 200, dec.text
    text = scrape(net, ports, "KME-A")
    after = samples(text)
    assert after[ok] > before.get(ok, 0.0)
    assert value(text, "qkms_peer_round_trip_seconds_count", peer="KME-B", kind="ledger") >= after[ok]
    assert value(text, "qkms_peer_up", peer="KME-B") == 1
    assert value(text, "qkms_peer_last_message_age_seconds", peer="KME-B") < 60
    for key in enc.json()["keys"]:
        assert key["key_ID"] not in text and key["key"] not in text


def test_dashboard_and_alert_queries_name_metrics_a_peered_kme_exports(
    network: tuple[Network, dict[str, int]],
) -> None:
    net, ports = network
    exported = exported_names(scrape(net, ports, "KME-A"))
    rules = [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    for expr in dashboard_exprs() + rules:
        missing = [n for n in NAME.findall(expr) if n not in exported]
        assert not missing, f"{expr}: {missing} not exported by a KME with a peer"


def test_a_stopped_peer_shows_down(network: tuple[Network, dict[str, int]]) -> None:
    net, ports = network
    b = net.sites["KME-B"].process
    assert b is not None
    b.stop()
    deadline = time.monotonic() + 30
    while value(scrape(net, ports, "KME-A"), "qkms_peer_up", peer="KME-B") != 0:
        assert time.monotonic() < deadline, "KME-A never noticed KME-B down"
        time.sleep(0.5)
    text = scrape(net, ports, "KME-A")
    failed = sum(
        v
        for (name, labels), v in samples(text).items()
        if name == "qkms_peer_requests_total"
        and ("peer", "KME-B") in labels
        and ("outcome", "ok") not in labels
    )
    assert failed > 0
