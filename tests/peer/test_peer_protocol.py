"""The peer protocol under failure and attack: peer down or frozen mid-request, and unsigned,
tampered, replayed or misaddressed messages — real KME processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import httpx
import pytest
import tomli_w

from kms.config import KmsSettings
from kms.domain.lifecycle import KeyState
from kms.lab.launcher import client_ssl_context
from kms.lab.pilot import running_network
from kms.peer.ledger_master import entry_body
from kms.peer.messages import SIGNATURE_HEADER, MessageSealer, PeerMessage
from kms.runtime.assembly import Runtime, build_runtime
from kms.service.peer_mac_keys import PeerMacKeys
from kms.storage import migrate
from kms.storage import pool_repository as pool
from kms.storage.database import Database
from kms.storage.peer_repository import close_pending_keys, remember_message, void_message
from tests.conftest import database_url
from tests.peer.conftest import Network, open_network, query, wait_for_remote_keys


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


def cancels_handled(site_dir: Path, sender: str) -> int:
    """``keys.cancel`` messages from ``sender`` that this site acted on (remembered in its transaction)."""
    with sqlite3.connect(site_dir / "qkms.db") as db:
        row = db.execute(
            "SELECT COUNT(*) FROM peer_messages WHERE sender = ? AND msg_type = 'keys.cancel'", (sender,)
        ).fetchone()
        return int(row[0])


def test_peer_frozen_mid_request_keys_are_withdrawn_at_both_ends(net: Network) -> None:
    """A's ledger request to a frozen B times out: A discards the keys and sends ``keys.cancel``.
    Whether B ever got the request is chance — its bytes may sit in B's socket, or never have left A
    when the request needed a new TLS connection (the handshake waits on B) — and so is the order in
    which B, thawed, handles request and cancel. What must hold in every case, once B has handled the
    cancel: the keys are not servable at B (never recorded, or destroyed)."""
    site_a, site_b = net.sites["KME-A"], net.sites["KME-B"]
    assert site_b.process is not None and site_b.process.proc is not None
    pid = site_b.process.proc.pid
    before = set(discarded_key_ids(site_a.workdir))
    cancels_before = cancels_handled(site_b.workdir, "KME-A")
    os.kill(pid, signal.SIGSTOP)
    try:
        r = enc(net)
        assert r.status_code == 503
        assert "no answer" in r.json()["message"]
    finally:
        os.kill(pid, signal.SIGCONT)
    lost = sorted(set(discarded_key_ids(site_a.workdir)) - before)
    assert len(lost) == 2
    # The real condition: B has acted on A's cancel (A retries it for about 30 s).
    deadline = time.monotonic() + 40
    while cancels_handled(site_b.workdir, "KME-A") == cancels_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancels_handled(site_b.workdir, "KME-A") > cancels_before, "B never handled A's keys.cancel"
    states = key_states(site_b.workdir, lost)
    assert all(s == "destroyed" for s in states.values()), states
    refused = net.sae("KME-B", "SAE-B1").post(
        "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k} for k in lost]}
    )
    assert refused.status_code == 400
    # Whatever of A's request B still had queued is refused now: nothing of it is ever recorded.
    assert all(s == "destroyed" for s in key_states(site_b.workdir, lost).values())


@pytest.fixture(scope="module")
def runtime_a(net: Network) -> Iterator[Runtime]:
    """KME A's own code, in this process, on A's database (shared with A's server process)."""
    settings = KmsSettings.load(net.sites["KME-A"].config_path)
    rt = build_runtime(settings, sync_registry=False)
    try:
        yield rt
    finally:
        rt.close()


@pytest.fixture(scope="module")
def sealer(runtime_a: Runtime) -> MessageSealer:
    return MessageSealer("KME-A", runtime_a.identity)


@pytest.fixture(scope="module")
def as_kme_a(net: Network) -> Iterator[httpx.Client]:
    a, b = net.sites["KME-A"], net.sites["KME-B"]
    ctx = client_ssl_context(b.ca, a.workdir / "pki" / "kme-client.pem", a.workdir / "pki" / "kme-client.key")
    with httpx.Client(base_url=b.url, verify=ctx, timeout=10) as client:
        yield client


# A peer message with a JSON content type is answered by the lean path (kms.api.hot_path), any other
# by the FastAPI route: the protocol's checks run through both (PeerEndpoint.respond).
PATHS = pytest.mark.parametrize("content_type", ["application/json", "text/plain"], ids=["lean", "route"])


def post(
    client: httpx.Client, raw: bytes, header: str | None, content_type: str = "application/json"
) -> httpx.Response:
    headers = {"content-type": content_type, **({SIGNATURE_HEADER: header} if header else {})}
    return client.post("/peer/v1/messages", content=raw, headers=headers)


@PATHS
def test_signed_message_is_accepted_once(
    as_kme_a: httpx.Client, sealer: MessageSealer, content_type: str
) -> None:
    _, raw, header = sealer.seal("KME-B", "topology", {})
    first = post(as_kme_a, raw, header, content_type)
    assert first.status_code == 200
    assert b'"type":"topology.ok"' in first.content
    assert first.headers.get(SIGNATURE_HEADER)
    replay = post(as_kme_a, raw, header, content_type)
    assert replay.status_code == 200
    assert b'"type":"error"' in replay.content and b"replayed" in replay.content


@PATHS
def test_unsigned_message_is_rejected(
    as_kme_a: httpx.Client, sealer: MessageSealer, content_type: str
) -> None:
    _, raw, _ = sealer.seal("KME-B", "topology", {})
    r = post(as_kme_a, raw, None, content_type)
    assert r.status_code == 401
    assert r.json()["message"] == "the message is not signed"


@PATHS
def test_tampered_message_is_rejected(
    as_kme_a: httpx.Client, sealer: MessageSealer, content_type: str
) -> None:
    _, raw, header = sealer.seal("KME-B", "keys.cancel", {"origin": "KME-A", "key_IDs": []})
    tampered = raw.replace(b'"origin":"KME-A"', b'"origin":"KME-X"')
    assert tampered != raw
    r = post(as_kme_a, tampered, header, content_type)
    assert r.status_code == 401
    assert "signature" in r.json()["message"]


@PATHS
def test_message_for_another_kme_is_rejected(
    as_kme_a: httpx.Client, sealer: MessageSealer, content_type: str
) -> None:
    _, raw, header = sealer.seal("KME-Z", "topology", {})
    r = post(as_kme_a, raw, header, content_type)
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


@PATHS
def test_sae_certificate_cannot_speak_the_peer_protocol(
    net: Network, sealer: MessageSealer, content_type: str
) -> None:
    _, raw, header = sealer.seal("KME-B", "topology", {})
    r = net.sae("KME-B", "SAE-B1").post(
        "/peer/v1/messages",
        content=raw,
        headers={SIGNATURE_HEADER: header, "content-type": content_type},
    )
    assert r.status_code == 401


def test_cancel_that_overtakes_its_ledger_request_voids_it(
    net: Network, runtime_a: Runtime, as_kme_a: httpx.Client, sealer: MessageSealer
) -> None:
    """The order a thawed peer may see: A's ``keys.cancel`` first, then the request it cancels. A's
    real code cuts the keys and writes the entry; the test sends the two signed messages in that order.
    B must refuse the late request (before the fix it recorded keys A had discarded, servable to B's
    slave until their TTL)."""
    network = runtime_a.network
    assert network is not None
    master = runtime_a.registry.get("SAE-A1")
    assert master is not None
    wanted = runtime_a.service._key_request(master, "SAE-B1", 2, None, (), ())
    at = datetime.now(UTC)
    events = pool.EventBatch(at)
    with runtime_a.db.write() as conn:
        prepared = network.ledger.prepare(conn, wanted, "KME-B", events, at)
        events.flush(conn)
    key_ids = prepared.key_ids
    try:
        entry = entry_body(["KME-A", "KME-B"], prepared)
        ledger, raw_ledger, ledger_header = sealer.seal("KME-B", "keys.record.batch", {"entries": [entry]})
        named = {"nonce": ledger.nonce, "session": ledger.session, "seq": ledger.seq, "type": ledger.type}
        _, raw_cancel, cancel_header = sealer.seal(
            "KME-B", "keys.cancel", {"origin": "KME-A", "key_IDs": key_ids, "message": named}
        )
        cancelled = post(as_kme_a, raw_cancel, cancel_header)
        assert cancelled.status_code == 200 and b'"type":"keys.cancel.ok"' in cancelled.content
        late = post(as_kme_a, raw_ledger, ledger_header)
        assert late.status_code == 200
        assert b'"type":"error"' in late.content and b"replayed" in late.content
        assert key_states(net.sites["KME-B"].workdir, key_ids) == {}
        refused = net.sae("KME-B", "SAE-B1").post(
            "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k} for k in key_ids]}
        )
        assert refused.status_code == 400
    finally:  # A discards what it cut, as after any failed request
        with runtime_a.db.write() as conn:
            close_pending_keys(conn, key_ids, KeyState.DESTROYED, "test", "cancelled", datetime.now(UTC))


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_voided_request_is_refused_and_an_arrived_one_is_not_voided(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The storage half of the cancel, on both backends: voiding marks a request as seen (its late
    arrival is then a replay); a request that arrived first is not voided (it is withdrawn instead)."""
    url = database_url(backend, request) or f"sqlite:///{tmp_path / 'void.db'}"
    migrate.upgrade(url)
    db = Database(url)
    at = datetime.now(UTC)
    try:
        with db.write() as conn:
            assert void_message(conn, "KME-A", "a" * 32, "s1", 1, "keys.record.batch", at)
            assert not remember_message(conn, "KME-A", "a" * 32, "s1", 1, "keys.record.batch", at)
            assert remember_message(conn, "KME-A", "b" * 32, "s1", 2, "keys.record.batch", at)
            assert not void_message(conn, "KME-A", "b" * 32, "s1", 2, "keys.record.batch", at)
            # Another sender's request of the same nonce is not affected.
            assert remember_message(conn, "KME-C", "a" * 32, "s9", 1, "keys.record.batch", at)
    finally:
        db.dispose()


# -- MACs between neighbours (DECISIONS.md D-35) -----------------------------------------------------


def _mac_key(runtime_a: Runtime) -> tuple[str, bytes]:
    """KME-A's MAC key toward KME-B: established by a first hop-by-hop call, then cached."""
    assert runtime_a.network is not None
    client = runtime_a.network.client
    assert client.call("KME-B", "topology", {}).type == "topology.ok"  # MAC'd (after session.key)

    def not_again(peer: str, body: dict[str, object]) -> PeerMessage:
        raise AssertionError("the key should be cached")

    key = client.mac_sessions.key_for("KME-B", not_again)
    assert key is not None
    return key


def test_a_neighbours_mac_key_is_stored_sealed_at_the_receiver(net: Network, runtime_a: Runtime) -> None:
    key_id, key = _mac_key(runtime_a)
    rows = query(net.sites["KME-B"], "SELECT id, sealed_key FROM peer_mac_keys")
    assert f"KME-A/{key_id}" in {str(r[0]) for r in rows}
    assert all(key not in bytes(r[1]) for r in rows)  # sealed under B's KEK, never in clear


def test_a_kek_rotation_reseals_the_neighbours_mac_keys(net: Network, runtime_a: Runtime) -> None:
    key_id, key = _mac_key(runtime_a)
    site_b = net.sites["KME-B"]
    rotated = subprocess.run(
        [sys.executable, "-m", "kms", "kek", "rotate", "--config", str(site_b.config_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert rotated.returncode == 0, rotated.stderr
    versions = {str(r[0]) for r in query(site_b, "SELECT kek_id FROM peer_mac_keys")}
    assert versions == {"kek-2"}, versions
    # A process of B that never held the key in memory opens the re-sealed row.
    runtime_b = build_runtime(KmsSettings.load(site_b.config_path), sync_registry=False)
    try:
        assert PeerMacKeys(runtime_b.db, runtime_b.envelope).lookup("KME-A", key_id) == key
    finally:
        runtime_b.close()
    check = subprocess.run(
        [sys.executable, "-m", "kms", "db", "check", "--config", str(site_b.config_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert check.returncode == 0, check.stdout


def test_a_macd_hop_message_is_accepted_once_and_answered_with_a_mac(
    as_kme_a: httpx.Client, sealer: MessageSealer, runtime_a: Runtime
) -> None:
    mac = _mac_key(runtime_a)
    _, raw, header = sealer.seal("KME-B", "topology", {}, mac=mac)
    assert header.startswith("hmac-sha256;")
    first = post(as_kme_a, raw, header)
    assert first.status_code == 200, first.text
    assert first.headers[SIGNATURE_HEADER].startswith(f"hmac-sha256;k={mac[0]};")
    replay = post(as_kme_a, raw, header)
    assert b'"type":"error"' in replay.content and b"replayed" in replay.content


def test_a_wrong_mac_an_unknown_key_or_a_macd_ledger_entry_for_the_target_is_refused(
    as_kme_a: httpx.Client, sealer: MessageSealer, runtime_a: Runtime
) -> None:
    key_id, key = _mac_key(runtime_a)
    _, raw, header = sealer.seal("KME-B", "topology", {}, mac=(key_id, bytes(32)))
    r = post(as_kme_a, raw, header)
    assert r.status_code == 401 and "MAC does not verify" in r.json()["message"]
    _, raw, header = sealer.seal("KME-B", "topology", {}, mac=("00112233aabbccdd", key))
    r = post(as_kme_a, raw, header)
    assert r.status_code == 401 and "unknown MAC key" in r.json()["message"]
    # Where a signed statement is the point, a MAC is not enough: a ledger entry whose target is B,
    # a batch of them, a withdrawal.
    for msg_type, body in (
        ("keys.record", {"route": ["KME-A", "KME-B"], "keys": []}),
        ("keys.record", {"route": ["KME-C", "KME-A", "KME-B"], "keys": []}),
        ("keys.record.batch", {"entries": []}),
        ("keys.cancel", {"origin": "KME-A", "key_IDs": []}),
    ):
        _, raw, header = sealer.seal("KME-B", msg_type, body, mac=(key_id, key))
        r = post(as_kme_a, raw, header)
        assert r.status_code == 401 and "must be signed" in r.json()["message"], (msg_type, r.text)


def test_a_peer_that_lost_the_key_gets_the_message_signed(net: Network, runtime_a: Runtime) -> None:
    key_id, _ = _mac_key(runtime_a)
    site_b = net.sites["KME-B"]
    with sqlite3.connect(site_b.workdir / "qkms.db") as db:
        db.execute("DELETE FROM peer_mac_keys")
    # B's server process still holds the key in memory; a new key ID it never saw stands for a
    # restored database.
    assert runtime_a.network is not None
    client = runtime_a.network.client
    client.mac_sessions._keys["KME-B"] = ("ffeeddccbbaa0099", bytes(32), time.monotonic())
    assert client.call("KME-B", "topology", {}).type == "topology.ok"  # refused, then sent signed
    new_id, _ = _mac_key(runtime_a)  # and the next call establishes a new key
    assert new_id not in (key_id, "ffeeddccbbaa0099")


def _cut_for_b(runtime_a: Runtime, number: int) -> tuple[list[str], dict[str, object]]:
    """A's real code cuts ``number`` keys for SAE-B1 and writes the ledger entry (key_IDs, entry)."""
    network = runtime_a.network
    assert network is not None
    master = runtime_a.registry.get("SAE-A1")
    assert master is not None
    wanted = runtime_a.service._key_request(master, "SAE-B1", number, None, (), ())
    at = datetime.now(UTC)
    events = pool.EventBatch(at)
    with runtime_a.db.write() as conn:
        prepared = network.ledger.prepare(conn, wanted, "KME-B", events, at)
        events.flush(conn)
    return prepared.key_ids, entry_body(["KME-A", "KME-B"], prepared)


def _discard(runtime_a: Runtime, key_ids: list[str]) -> None:
    with runtime_a.db.write() as conn:
        close_pending_keys(conn, key_ids, KeyState.DESTROYED, "test", "test over", datetime.now(UTC))


def test_a_ledger_batch_at_the_endpoint_records_its_good_entries_once(
    net: Network, runtime_a: Runtime, as_kme_a: httpx.Client, sealer: MessageSealer
) -> None:
    """``keys.record.batch`` joins B's group commit (``kms.api.routes.peer``): one entry refused (a
    link B does not share with A) leaves the other recorded, the receipt is signed with one result
    per entry, and the same message again is refused as a replay without recording anything."""
    key_ids, entry = _cut_for_b(runtime_a, 2)
    try:
        keys = cast(list[dict[str, object]], entry["keys"])
        bad = {**entry, "keys": [{**k, "key_ID": str(uuid.uuid4()), "link_id": "no-such-link"} for k in keys]}
        _, raw, header = sealer.seal("KME-B", "keys.record.batch", {"entries": [entry, bad]})
        first = post(as_kme_a, raw, header)
        assert first.status_code == 200 and first.headers[SIGNATURE_HEADER].startswith("ML-DSA")
        reply = first.json()
        assert reply["type"] == "keys.record.batch.ok"
        results = reply["body"]["results"]
        assert results[0] == {"ok": True}
        assert results[1]["ok"] is False and "no-such-link" in results[1]["error"]
        assert set(key_states(net.sites["KME-B"].workdir, key_ids).values()) == {"reserved"}
        again = post(as_kme_a, raw, header)
        assert b'"type":"error"' in again.content and b"replayed" in again.content
        got = net.sae("KME-B", "SAE-B1").post(
            "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k} for k in key_ids]}
        )
        assert got.status_code == 200 and len(got.json()["keys"]) == 2
    finally:
        _discard(runtime_a, key_ids)


def test_a_ledger_batch_unit_rerun_by_group_commit_records_once(net: Network, runtime_a: Runtime) -> None:
    """The unit the endpoint hands to group commit, run by B's code in this process together with an
    SAE unit that fails: group commit rolls the first pass back and runs both again, each on its own
    savepoint; the ledger entry must come out recorded exactly once and audited once."""
    from sqlalchemy import func, select

    from kms.service.group_commit import execute_batch
    from kms.storage.schema import audit_records

    settings_b = KmsSettings.load(net.sites["KME-B"].config_path)
    runtime_b = build_runtime(settings_b, sync_registry=False)
    key_ids, entry = _cut_for_b(runtime_a, 1)
    try:
        assert runtime_b.network is not None
        message, _, _ = MessageSealer("KME-A", runtime_a.identity).seal(
            "KME-B", "keys.record.batch", {"entries": [entry]}
        )
        unit = runtime_b.network.group_unit(message)
        assert unit is not None

        def failing(_conn: object) -> tuple[None, list[object]]:
            raise RuntimeError("an SAE request that fails")

        def recorded() -> int:
            with runtime_b.db.read() as conn:
                return int(
                    conn.execute(
                        select(func.count()).where(
                            audit_records.c.action == "keys.recorded",
                            audit_records.c.data.contains(key_ids[0]),
                        )
                    ).scalar_one()
                )

        outcomes = execute_batch(runtime_b.db, [unit, failing])  # type: ignore[list-item]
        assert outcomes[0].unwrap() == [{"ok": True}]
        with pytest.raises(RuntimeError):
            outcomes[1].unwrap()
        assert key_states(net.sites["KME-B"].workdir, key_ids) == {key_ids[0]: "reserved"}
        assert recorded() == 1
    finally:
        runtime_b.close()
        _discard(runtime_a, key_ids)
