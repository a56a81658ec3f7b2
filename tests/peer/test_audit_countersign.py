"""Peer copies of the audit checkpoint chain (issue 13, "countersigned by peer KMEs that keep their
own copy"): two real KMEs on 127.0.0.1. KME-B keeps a copy of KME-A's checkpoints and countersigns
them; then KME-A is rewritten as root on its host would do it — database *and* its own anchor file —
which nothing on KME-A's host can detect any more, and KME-B's copy still does: KME-A refuses to
start, the offline check against the copy fails, and a re-signed forgery pushed to KME-B is refused
and audited there."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, create_engine, text

from kms.config import KmsSettings
from kms.domain.audit_chain import Checkpoint
from kms.lab.launcher import KmeProcess
from kms.peer.client import PeerRefused
from kms.runtime.assembly import build_runtime
from tests.peer.conftest import Network, open_network, query, wait_for_remote_keys


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("QKMS_AUDIT__CHECKPOINT_SECONDS", "0.3")
        env.setenv("QKMS_AUDIT__CHECKPOINT_RECORDS", "4")
        network = open_network(tmp_path_factory.mktemp("countersign"), {})
        from kms.lab.pilot import running_network

        with running_network(network.sites):
            try:
                wait_for_remote_keys(network, "KME-A", "SAE-A1", "SAE-B1")
                yield network
            finally:
                network.close()


def own_anchors(net: Network) -> Path:
    return net.sites["KME-A"].workdir / "audit-anchors" / "KME-A.anchors.jsonl"


def copy_at_b(net: Network) -> Path:
    return net.sites["KME-B"].workdir / "audit-anchors" / "peer-copies" / "KME-A.anchors.jsonl"


def qkms_verify(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms", "audit", "verify", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )


def test_the_peer_keeps_a_copy_and_countersigns(net: Network) -> None:
    a = net.sites["KME-A"]
    for _ in range(12):
        r = net.sae("KME-A", "SAE-A1").get("/api/v1/keys/SAE-B1/enc_keys")
        assert r.status_code == 200, r.text
        time.sleep(0.1)
    deadline = time.monotonic() + 60
    receipts: list[tuple[object, ...]] = []
    while time.monotonic() < deadline:
        receipts = query(a, "SELECT peer_kme_id, number FROM audit_countersignatures ORDER BY number DESC")
        # The copy starts at whichever checkpoint KME-B first saw (KME-A may have cut some before
        # peering, on a slow machine): wait for three checkpoints in the copy, not for number 3,
        # with a request each turn so that new records keep cutting new checkpoints.
        held = copy_at_b(net).read_bytes().splitlines() if copy_at_b(net).exists() else []
        if receipts and int(str(receipts[0][1])) >= 3 and len(held) >= 3:
            break
        assert net.sae("KME-A", "SAE-A1").get("/api/v1/keys/SAE-B1/enc_keys").status_code == 200
        time.sleep(0.3)
    assert receipts and receipts[0][0] == "KME-B" and int(str(receipts[0][1])) >= 3, receipts
    copy_lines = copy_at_b(net).read_bytes().splitlines()
    own_lines = set(own_anchors(net).read_bytes().splitlines())
    assert len(copy_lines) >= 3 and all(line in own_lines for line in copy_lines)
    ok = qkms_verify(a.config_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "countersigned: KME-B holds a copy up to checkpoint #" in ok.stdout
    against_copy = qkms_verify(a.config_path, "--anchors", str(copy_at_b(net)))
    assert against_copy.returncode == 0 and "audit trail intact" in against_copy.stdout, against_copy.stdout


def test_a_root_rewrite_of_database_and_anchor_file_is_caught_by_the_peer_copy(net: Network) -> None:
    a, b = net.sites["KME-A"], net.sites["KME-B"]
    assert a.process is not None
    a.process.stop()
    held = [line for line in copy_at_b(net).read_bytes().splitlines() if line]
    assert len(held) >= 3
    keep = len(held) - 2 + int(held[0].split(b'"number":')[1].split(b",")[0]) - 1  # checkpoints kept
    engine = create_engine(KmsSettings.load(a.config_path).database.url)

    def rewrite(conn: Connection) -> None:
        cut = conn.execute(
            text("SELECT upto_seq FROM audit_checkpoints WHERE number = :n"), {"n": keep}
        ).scalar_one()
        conn.execute(text("DELETE FROM audit_records WHERE seq > :s"), {"s": cut})
        conn.execute(text("DELETE FROM audit_checkpoints WHERE number > :n"), {"n": keep})
        conn.execute(text("DELETE FROM audit_countersignatures"))
        last = conn.execute(text("SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1")).one()
        conn.execute(
            text("UPDATE audit_head SET seq = :s, hash = :h WHERE id = 1"), {"s": last.seq, "h": last.hash}
        )

    with engine.begin() as conn:
        rewrite(conn)
    engine.dispose()
    lines = own_anchors(net).read_bytes().splitlines(keepends=True)
    own_anchors(net).write_bytes(b"".join(lines[:keep]))

    # Nothing on KME-A's host can tell any more ...
    local = qkms_verify(a.config_path)
    assert local.returncode == 0 and "audit trail intact" in local.stdout, local.stdout + local.stderr
    # ... but KME-B's copy can: offline,
    res = qkms_verify(a.config_path, "--anchors", str(copy_at_b(net)))
    assert res.returncode == 1 and "is missing (deleted)" in res.stdout, res.stdout
    assert f"checkpoint #{keep + 1} " in res.stdout
    # and at start: KME-A asks KME-B and refuses to serve.
    proc = KmeProcess(a.config_path, a.port)
    try:
        with pytest.raises(RuntimeError) as refused:
            proc.start(timeout=60)
    finally:
        proc.stop()
    message = str(refused.value)
    assert "exited with 3" in message and "audit_start_refused" in message, message
    assert "KME KME-B holds a copy of checkpoint #" in message and "lacks (deleted)" in message, message

    # Root on KME-A's host also holds its signing key: re-sign a different checkpoint under a number
    # KME-B holds and push it. KME-B refuses it and audits the conflict.
    rt = build_runtime(KmsSettings.load(a.config_path), sync_registry=False)
    try:
        assert rt.countersigner is not None
        with rt.db.read() as conn:
            last = conn.execute(text("SELECT MAX(number) FROM audit_checkpoints")).scalar_one()
        from kms.storage import audit_repository as audit

        with rt.db.read() as conn:
            mine = audit.chained_checkpoints(conn, int(last) - 1)[0]
        forged = dataclasses.replace(
            mine,
            number=mine.number + 1,
            prev_hash=mine.hash(),
            from_seq=mine.upto_seq + 1,
            upto_seq=mine.upto_seq + 1,
        )
        _, _, signature = rt.identity.sign(forged.message(), Checkpoint.context)
        forged = dataclasses.replace(forged, signature=signature.hex())
        with pytest.raises(PeerRefused, match="audit copy conflict") as pushed:
            rt.countersigner.client.call("KME-B", "audit.checkpoints", {"checkpoints": [forged.to_json()]})
        assert "differs from the copy held here" in pushed.value.reason
    finally:
        rt.close()
    conflicts = query(b, "SELECT actor, data FROM audit_records WHERE action = 'audit.peer_conflict'")
    assert conflicts and conflicts[-1][0] == "kme:KME-A", conflicts
