"""A restore at one site reconciled with its peer (issue 16 part 3, DECISIONS.md D-28 and D-39): two
real KMEs; A is backed up while both serve, keys are made both ways after the snapshot, A is stopped
and restored. ``qkms restore`` fences A's store and tells B (signed ``store.restored``): B retires
every piece, its own and its mirrors of A's, of the blocks A had confirmed, so no bit of them is cut
again at either end; the keys A made for B's slaves stay deliverable at B; an SAE revoked at A after
the snapshot is revoked again at A from B's record of it. Audited at both ends; both stores pass
``db check`` and ``audit verify``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.lab.pilot import running_network
from tests.conftest import database_url
from tests.peer.conftest import Network, open_network, query, wait_for_remote_keys


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def net(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    urls = {kme: database_url(request.param, request) for kme in ("KME-A", "KME-B")}
    network = open_network(tmp_path_factory.mktemp(f"restore-sites-{request.param}"), urls)
    with running_network(network.sites):
        try:
            wait_for_remote_keys(network, "KME-A", "SAE-A1", "SAE-B1")
            wait_for_remote_keys(network, "KME-B", "SAE-B2", "SAE-A2")
            yield network
        finally:
            network.close()


def _qkms(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "400"},
    )


def _enc(net: Network, site: str, master: str, slave: str) -> list[dict[str, str]]:
    r = net.sae(site, master).post(f"/api/v1/keys/{slave}/enc_keys", json={"number": 3, "size": 256})
    assert r.status_code == 200, r.text
    return list(r.json()["keys"])


def test_restore_at_a_retires_the_shared_pieces_at_b(net: Network, tmp_path: Path) -> None:
    a, b = net.sites["KME-A"], net.sites["KME-B"]
    backup = tmp_path / "a.qkmsbackup"
    taken = _qkms(a.config_path, "backup", "--out", str(backup))
    assert taken.returncode == 0, taken.stdout + taken.stderr
    after = _enc(net, "KME-A", "SAE-A1", "SAE-B1")  # made after the snapshot, held at B
    _enc(net, "KME-B", "SAE-B2", "SAE-A2")  # made after the snapshot, held at A (fenced there)
    revoked = _qkms(a.config_path, "sae", "revoke", "SAE-A2", "--reason", "lost laptop")  # B is told
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    shared = query(b, "SELECT count(*) FROM key_blocks WHERE state = 'active'")[0][0]
    assert isinstance(shared, int) and shared > 0
    assert a.process is not None
    a.process.stop()

    restored = _qkms(a.config_path, "restore", str(backup))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"KME KME-B told of the restore: {shared} shared pieces retired there" in restored.stdout
    assert "3 keys made here still deliverable there" in restored.stdout
    # The snapshot predates the revocation; B's record of it revokes SAE-A2 again at A.
    assert "SAE SAE-A2 revoked again (revoked at " in restored.stdout
    assert "per KME KME-B's record (lost by the restore): lost laptop" in restored.stdout
    assert query(a, "SELECT state FROM saes WHERE id = 'SAE-A2'") == [("revoked",)]
    # B cuts nothing more from blocks A fenced: no piece of them is usable at B.
    assert query(b, "SELECT count(*) FROM key_blocks WHERE state = 'active' OR material IS NOT NULL"
                 " AND state <> 'pre_active'") == [(0,)]  # fmt: skip
    events = query(
        b, "SELECT count(*) FROM lifecycle_events WHERE subject_kind = 'block' AND to_state = 'destroyed'"
        " AND actor = 'kme:KME-A'",
    )  # fmt: skip
    assert events == [(shared,)]
    # The keys A made after the snapshot were delivered to A's master: B's slave still gets them.
    r = net.sae("KME-B", "SAE-B1").post(
        "/api/v1/keys/SAE-A1/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in after]}
    )
    assert r.status_code == 200, r.text
    assert [k["key"] for k in r.json()["keys"]] == [k["key"] for k in after]

    at_b = query(b, "SELECT actor, subject FROM audit_records WHERE action = 'peer.restored'")
    assert at_b == [("kme:KME-A", "KME-A")]
    told = query(a, "SELECT count(*) FROM audit_records WHERE action = 'backup.peers_told'")
    assert told == [(1,)]
    again = _qkms(a.config_path, "peer", "tell-restored")
    assert again.returncode == 0 and "0 shared pieces retired" in again.stdout, again.stdout + again.stderr
    never = _qkms(b.config_path, "peer", "tell-restored")
    assert never.returncode == 1 and "no restore on record" in never.stderr
    for check in (("db", "check"), ("audit", "verify")):  # A's: run by the restore itself
        out = _qkms(b.config_path, *check)
        assert out.returncode == 0, f"KME-B {check}: {out.stdout[-1500:]}{out.stderr[-500:]}"
