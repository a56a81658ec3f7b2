"""The peer protocol under failure and attack: peer down or frozen mid-request, and unsigned,
tampered, replayed or misaddressed messages — real KME processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tomli_w

from kms.config import KmsSettings
from kms.launcher import client_ssl_context
from kms.peer.messages import SIGNATURE_HEADER, MessageSealer
from kms.pilot import running_network
from kms.runtime import build_runtime
from tests.peer.conftest import Network, open_network, wait_for_remote_keys


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = open_network(tmp_path_factory.mktemp("peer-protocol"), {})
    cfg_path = network.sites["KME-A"].config_path
    config = tomllib.loads(cfg_path.read_text())
    config["peering"] = {"timeout_seconds": 1.5}
    cfg_path.write_text(tomli_w.dumps(config))
    with running_network(network.sites):
        try:
            wait_for_remote_keys(network, "KME-A", "SAE-A1", "SAE-B1")
            yield network
        finally:
            network.close()


def key_states(site_dir: Path, key_ids: list[str]) -> dict[str, str]:
    with sqlite3.connect(site_dir / "qkms.db") as db:
        marks = ",".join("?" * len(key_ids))
        return dict(
            db.execute(f"SELECT key_id, state FROM keys WHERE key_id IN ({marks})", key_ids).fetchall()
        )


def discarded_key_ids(site_dir: Path) -> list[str]:
    with sqlite3.connect(site_dir / "qkms.db") as db:
        return [r[0] for r in db.execute("SELECT key_id FROM keys WHERE state = 'destroyed'").fetchall()]


def enc(net: Network) -> httpx.Response:
    return net.sae("KME-A", "SAE-A1").post("/api/v1/keys/SAE-B1/enc_keys", json={"number": 2})


def test_peer_down_gives_503_and_loses_no_bits_silently(net: Network) -> None:
    site_a, site_b = net.sites["KME-A"], net.sites["KME-B"]
    assert site_b.process is not None
    site_b.process.stop()
    try:
        before = set(discarded_key_ids(site_a.workdir))
        first = enc(net)
        assert first.status_code == 503
        assert "KME-B" in first.json()["message"]
        second = enc(net)
        assert second.status_code == 503
        # Whatever bits the failed requests had cut are marked destroyed here, never left pending.
        new = set(discarded_key_ids(site_a.workdir)) - before
        assert len(new) in (0, 2, 4)
        with sqlite3.connect(site_a.workdir / "qkms.db") as db:
            assert db.execute("SELECT COUNT(*) FROM keys WHERE state = 'pre_active'").fetchone()[0] == 0
    finally:
        site_b.process.start()
    wait_for_remote_keys(net, "KME-A", "SAE-A1", "SAE-B1", minimum=2)
    deadline = time.monotonic() + 10
    while (r := enc(net)).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert r.status_code == 200


def test_peer_frozen_mid_request_keys_are_withdrawn_at_both_ends(net: Network) -> None:
    site_a, site_b = net.sites["KME-A"], net.sites["KME-B"]
    assert site_b.process is not None and site_b.process.proc is not None
    pid = site_b.process.proc.pid
    before = set(discarded_key_ids(site_a.workdir))
    os.kill(pid, signal.SIGSTOP)
    try:
        r = enc(net)
        assert r.status_code == 503
        assert "no answer" in r.json()["message"]
    finally:
        os.kill(pid, signal.SIGCONT)
    lost = sorted(set(discarded_key_ids(site_a.workdir)) - before)
    assert len(lost) == 2
    # B handles the queued request once it runs again, then the master's withdrawal: never served.
    deadline = time.monotonic() + 30
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = key_states(site_b.workdir, lost)
        if states and all(s == "destroyed" for s in states.values()):
            break
        time.sleep(0.5)
    assert states, "KME B never handled the request it received while frozen"
    assert all(s == "destroyed" for s in states.values()), states
    refused = net.sae("KME-B", "SAE-B1").post(
        "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k} for k in lost]}
    )
    assert refused.status_code == 400


@pytest.fixture(scope="module")
def sealer(net: Network) -> Iterator[MessageSealer]:
    settings = KmsSettings.load(net.sites["KME-A"].config_path)
    rt = build_runtime(settings, sync_registry=False)
    try:
        yield MessageSealer("KME-A", rt.identity)
    finally:
        rt.close()


@pytest.fixture(scope="module")
def as_kme_a(net: Network) -> Iterator[httpx.Client]:
    a, b = net.sites["KME-A"], net.sites["KME-B"]
    ctx = client_ssl_context(b.ca, a.workdir / "pki" / "kme-client.pem", a.workdir / "pki" / "kme-client.key")
    with httpx.Client(base_url=b.url, verify=ctx, timeout=10) as client:
        yield client


def post(client: httpx.Client, raw: bytes, header: str | None) -> httpx.Response:
    headers = {"content-type": "application/json", **({SIGNATURE_HEADER: header} if header else {})}
    return client.post("/peer/v1/messages", content=raw, headers=headers)


def test_signed_message_is_accepted_once(as_kme_a: httpx.Client, sealer: MessageSealer) -> None:
    _, raw, header = sealer.seal("KME-B", "topology", {})
    first = post(as_kme_a, raw, header)
    assert first.status_code == 200
    assert b'"type":"topology.ok"' in first.content
    assert first.headers.get(SIGNATURE_HEADER)
    replay = post(as_kme_a, raw, header)
    assert replay.status_code == 200
    assert b'"type":"error"' in replay.content and b"replayed" in replay.content


def test_unsigned_message_is_rejected(as_kme_a: httpx.Client, sealer: MessageSealer) -> None:
    _, raw, _ = sealer.seal("KME-B", "topology", {})
    r = post(as_kme_a, raw, None)
    assert r.status_code == 401
    assert r.json()["message"] == "the message is not signed"


def test_tampered_message_is_rejected(as_kme_a: httpx.Client, sealer: MessageSealer) -> None:
    _, raw, header = sealer.seal("KME-B", "keys.cancel", {"origin": "KME-A", "key_IDs": []})
    tampered = raw.replace(b'"origin":"KME-A"', b'"origin":"KME-X"')
    assert tampered != raw
    r = post(as_kme_a, tampered, header)
    assert r.status_code == 401
    assert "signature" in r.json()["message"]


def test_message_for_another_kme_is_rejected(as_kme_a: httpx.Client, sealer: MessageSealer) -> None:
    _, raw, header = sealer.seal("KME-Z", "topology", {})
    r = post(as_kme_a, raw, header)
    assert r.status_code == 401
    assert "addressed to another KME" in r.json()["message"]


def test_stale_message_is_rejected(as_kme_a: httpx.Client, sealer: MessageSealer) -> None:
    message, raw, _ = sealer.seal("KME-B", "topology", {})
    stale = raw.replace(f'"ts":{message.ts!r}'.encode(), f'"ts":{message.ts - 3600!r}'.encode())
    assert stale != raw
    version, algorithm, signature = sealer.identity.sign(stale, b"qkms/peer/v1")
    import base64

    r = post(as_kme_a, stale, f"{algorithm};v={version};sig={base64.b64encode(signature).decode()}")
    assert r.status_code == 401
    assert "clock skew" in r.json()["message"]


def test_sae_certificate_cannot_speak_the_peer_protocol(net: Network, sealer: MessageSealer) -> None:
    _, raw, header = sealer.seal("KME-B", "topology", {})
    r = net.sae("KME-B", "SAE-B1").post(
        "/peer/v1/messages",
        content=raw,
        headers={SIGNATURE_HEADER: header, "content-type": "application/json"},
    )
    assert r.status_code == 401
