"""An SAE's state across sites and scale-out (issue 16 part 5, DECISIONS.md D-39): two real KMEs
joined by a shared link, KME B served by two ``qkms serve`` processes on one database (the second
one serves SAEs only; peers talk to the first).

- A KEK rotation at A while both sites keep exchanging keys both ways: not one request fails.
- ``qkms sae suspend|resume`` at A reaches both of B's processes (B's masters may not ask for keys
  for the suspended SAE, and may again after the resume).
- ``qkms sae revoke`` at A: the keys A made for the revoked master and recorded at B are destroyed
  at B, B's slaves can no longer fetch them at either process, B refuses new keys for it; both
  ends audit it; other pairs are untouched.
- A KME that claims another KME's SAE is refused and nothing changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kms.lab.launcher import KmeProcess, client_ssl_context, free_port
from kms.lab.pilot import running_network
from tests.conftest import database_url
from tests.peer.conftest import Network, open_network, query, wait_for_remote_keys

pytestmark = pytest.mark.postgres


class Sites:
    def __init__(self, net: Network, a2: KmeProcess, b2: KmeProcess) -> None:
        self.net = net
        self.second = {"KME-A": a2, "KME-B": b2}
        self._clients: dict[tuple[str, str], httpx.Client] = {}

    def at_second(self, kme_id: str, sae_id: str) -> httpx.Client:
        """SAE ``sae_id`` talking to its KME's second ``qkms serve`` process."""
        if (kme_id, sae_id) not in self._clients:
            site = self.net.sites[kme_id]
            cert, key = site.sae_credentials(sae_id)
            self._clients[kme_id, sae_id] = httpx.Client(
                base_url=self.second[kme_id].base_url,
                verify=client_ssl_context(site.ca, cert, key),
                timeout=30.0,
            )
        return self._clients[kme_id, sae_id]

    def at_b2(self, sae_id: str) -> httpx.Client:
        return self.at_second("KME-B", sae_id)

    def close(self) -> None:
        for c in self._clients.values():
            c.close()


@pytest.fixture(scope="module")
def sites(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    # PostgreSQL only: scale-out is several processes on one PostgreSQL (the --workers and SQLite
    # variants of revocation are tests/api/test_sae_lifecycle.py's).
    urls = {kme: database_url("postgres", request) for kme in ("KME-A", "KME-B")}
    net = open_network(tmp_path_factory.mktemp("revocation"), urls)
    with running_network(net.sites):
        second = [KmeProcess(net.sites[k].config_path, free_port()) for k in ("KME-A", "KME-B")]
        for p in second:
            p.spawn()
        out = Sites(net, *second)
        try:
            for p in second:
                p.wait_listening(30)
            wait_for_remote_keys(net, "KME-A", "SAE-A1", "SAE-B1")
            wait_for_remote_keys(net, "KME-B", "SAE-B2", "SAE-A2")
            yield out
        finally:
            out.close()
            for p in second:
                p.stop()
            net.close()


def _qkms(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "COLUMNS": "400"},
    )


def _enc(client: httpx.Client, slave: str, number: int = 2) -> list[dict[str, str]]:
    r = client.post(f"/api/v1/keys/{slave}/enc_keys", json={"number": number, "size": 256})
    assert r.status_code == 200, r.text
    return list(r.json()["keys"])


def _dec(client: httpx.Client, master: str, keys: list[dict[str, str]]) -> httpx.Response:
    return client.post(
        f"/api/v1/keys/{master}/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
    )


def _exchange(sites: Sites, site: str, master: str, slave_site: str, slave: str) -> None:
    keys = _enc(sites.net.sae(site, master), slave)
    got = _dec(sites.net.sae(slave_site, slave), master, keys)
    assert got.status_code == 200, got.text
    assert [k["key"] for k in got.json()["keys"]] == [k["key"] for k in keys]


def test_kek_rotation_at_a_while_both_sites_exchange_keys(sites: Sites) -> None:
    a = sites.net.sites["KME-A"]
    failures: list[str] = []
    done = [0]
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                _exchange(sites, "KME-A", "SAE-A1", "KME-B", "SAE-B1")
                _exchange(sites, "KME-B", "SAE-B2", "KME-A", "SAE-A2")
                done[0] += 1
            except AssertionError as exc:  # collected: the test fails below, after the rotation
                failures.append(str(exc)[:300])

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        rotated = _qkms(a.config_path, "kek", "rotate")
        during = done[0]
    finally:
        stop.set()
        worker.join(60)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert not failures, failures[:3]
    assert during >= 3, f"only {during} round trips each way during the rotation"
    sealed = query(a, "SELECT DISTINCT kek_id FROM key_blocks WHERE material IS NOT NULL")
    assert sealed == [("kek-2",)]
    assert query(sites.net.sites["KME-B"], "SELECT kek_id, state FROM kek_versions") == [("kek-1", "active")]


def test_suspend_and_resume_at_a_reach_both_processes_of_b(sites: Sites) -> None:
    a, b = sites.net.sites["KME-A"], sites.net.sites["KME-B"]
    suspended = _qkms(a.config_path, "sae", "suspend", "SAE-A2", "--reason", "maintenance")
    assert suspended.returncode == 0, suspended.stdout + suspended.stderr
    assert "KME KME-B told: SAE-A2 suspended" in suspended.stdout
    for client in (sites.net.sae("KME-B", "SAE-B2"), sites.at_b2("SAE-B2")):
        r = client.post("/api/v1/keys/SAE-A2/enc_keys", json={"number": 1})
        assert r.status_code == 400, r.text
        assert "unknown slave SAE" in r.json()["message"]
    assert query(b, "SELECT state, managed_by FROM saes WHERE id = 'SAE-A2'") == [("suspended", "peer")]
    resumed = _qkms(a.config_path, "sae", "resume", "SAE-A2")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    keys = _enc(sites.at_b2("SAE-B2"), "SAE-A2")
    assert _dec(sites.net.sae("KME-A", "SAE-A2"), "SAE-B2", keys).status_code == 200
    actions = [
        r[0] for r in query(b, "SELECT action FROM audit_records WHERE subject = 'SAE-A2' ORDER BY seq")
    ]
    assert actions == ["sae.peer_suspended", "sae.peer_resumed"]


def test_revocation_at_a_destroys_its_keys_at_b(sites: Sites) -> None:
    a, b = sites.net.sites["KME-A"], sites.net.sites["KME-B"]
    pending = _enc(sites.net.sae("KME-A", "SAE-A1"), "SAE-B1", number=3)  # made by A, held at B
    fetched = _enc(sites.net.sae("KME-A", "SAE-A1"), "SAE-B3")
    assert _dec(sites.at_b2("SAE-B3"), "SAE-A1", fetched).status_code == 200  # in its redelivery window
    other = _enc(sites.net.sae("KME-A", "SAE-A2"), "SAE-B1")  # another pair: untouched

    open_a = [sites.net.sae("KME-A", "SAE-A1"), sites.at_second("KME-A", "SAE-A1")]  # keep-alive
    assert all(c.get("/api/v1/keys/SAE-B2/status").status_code == 200 for c in open_a)
    revoked = _qkms(a.config_path, "sae", "revoke", "SAE-A1", "--reason", "host compromised")
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert "KME KME-B told: SAE-A1 revoked, 3 keys destroyed there" in revoked.stdout
    for client in open_a:  # the next request at either of A's processes
        r = client.get("/api/v1/keys/SAE-B2/status")
        assert r.status_code == 401 and "SAE SAE-A1 is revoked" in r.json()["message"], r.text

    for client in (sites.net.sae("KME-B", "SAE-B1"), sites.at_b2("SAE-B1")):
        r = _dec(client, "SAE-A1", pending)
        assert r.status_code == 400, r.text
        refused = client.post("/api/v1/keys/SAE-A1/enc_keys", json={"number": 1})
        assert refused.status_code == 400 and "unknown slave SAE" in refused.json()["message"]
    assert _dec(sites.at_b2("SAE-B3"), "SAE-A1", fetched).status_code == 400  # no redelivery copy left
    ids = ", ".join(f"'{k['key_ID']}'" for k in pending)
    assert query(b, f"SELECT DISTINCT state FROM keys WHERE key_id IN ({ids})") == [("destroyed",)]
    held = query(b, "SELECT count(*) FROM keys WHERE master_sae_id = 'SAE-A1' AND material IS NOT NULL")
    assert held == [(0,)]
    assert _dec(sites.at_b2("SAE-B1"), "SAE-A2", other).status_code == 200

    at_b = query(b, "SELECT actor, action FROM audit_records WHERE subject = 'SAE-A1' ORDER BY seq")
    assert at_b[0] == ("kme:KME-A", "sae.peer_revoked")
    at_a = [r[0] for r in query(a, "SELECT action FROM audit_records WHERE subject = 'SAE-A1' ORDER BY seq")]
    assert at_a[-2:] == ["sae.revoked", "sae.peer_told"]
    listed = _qkms(b.config_path, "sae", "list")
    assert any(
        "SAE-A1" in line and "revoked" in line and "peer" in line for line in listed.stdout.splitlines()
    )
    status = _qkms(b.config_path, "status")
    line = next(x for x in status.stdout.splitlines() if x.startswith("registered SAEs:"))
    assert "SAE-B1" in line and "SAE-A1" not in line  # the told-about SAEs are not B's
    again = _qkms(a.config_path, "sae", "tell-peers")  # idempotent: nothing changes, nothing destroyed
    assert again.returncode == 0 and "SAE-A1 revoked, 0 keys destroyed" in again.stdout, again.stdout
    assert len(query(b, "SELECT seq FROM audit_records WHERE action = 'sae.peer_revoked'")) == 1
    for site in (a, b):
        for check in (("db", "check"), ("audit", "verify")):
            out = _qkms(site.config_path, *check)
            assert out.returncode == 0, f"{site.kme_id} {check}: {out.stdout[-1500:]}{out.stderr[-500:]}"


def test_a_kme_cannot_speak_for_another_kmes_sae(sites: Sites) -> None:
    from kms.config import KmsSettings
    from kms.peer.client import PeerRefused
    from kms.runtime.assembly import build_runtime

    b = sites.net.sites["KME-B"]
    rt = build_runtime(KmsSettings.load(b.config_path), sync_registry=False)
    try:
        assert rt.network is not None
        notice = {
            "sae_id": "SAE-A2",
            "state": "revoked",
            "reason": "forged",
            "changed_at": "2026-01-01T00:00:00+00:00",
        }
        with pytest.raises(PeerRefused, match="SAE SAE-A2 is not served by KME-B"):
            rt.network.client.call("KME-A", "sae.state", {"saes": [notice]})
        with pytest.raises(PeerRefused, match="names 1 to 256 SAEs"):
            rt.network.client.call("KME-A", "sae.state", {"saes": []})
        with pytest.raises(PeerRefused, match=r"cannot act on sae\.state"):
            rt.network.client.call("KME-A", "sae.state", {"saes": [{**notice, "changed_at": "2026-01-01"}]})
        with pytest.raises(PeerRefused, match=r"cannot act on store\.restored"):
            rt.network.client.call("KME-A", "store.restored", {"backup": "x.qkmsbackup"})
    finally:
        rt.close()
    assert query(sites.net.sites["KME-A"], "SELECT state FROM saes WHERE id = 'SAE-A2'") == [("active",)]
    assert _qkms(b.config_path, "sae", "tell-peers", "SAE-A2").returncode == 1


def test_a_kme_that_missed_a_revocation_is_told_again(sites: Sites) -> None:
    """B's peer-facing process is down when SAE-A2 is revoked: the command says so and exits 3, and
    B's keys for it stay until A's leader tells the state again (``peering.sae_resend_seconds``, and
    at once when a process becomes leader: here A's second process, once the first stops)."""
    a, b = sites.net.sites["KME-A"], sites.net.sites["KME-B"]
    pending = _enc(sites.net.sae("KME-A", "SAE-A2"), "SAE-B1")
    assert b.process is not None
    b.process.stop()
    revoked = _qkms(a.config_path, "sae", "revoke", "SAE-A2")
    assert revoked.returncode == 3, revoked.stdout + revoked.stderr
    assert "SAE SAE-A2 revoked" in revoked.stdout and "KME KME-B not told" in revoked.stderr
    r = sites.at_second("KME-A", "SAE-A2").get("/api/v1/keys/SAE-B1/status")
    assert r.status_code == 401  # revoked at home at once, whatever B knows
    ids = ", ".join(f"'{k['key_ID']}'" for k in pending)
    held = f"SELECT DISTINCT state FROM keys WHERE key_id IN ({ids})"
    assert query(b, held) == [("reserved",)]

    b.process = KmeProcess(b.config_path, b.port).spawn()  # stopped by the fixture
    b.process.wait_listening(30)
    assert a.process is not None
    a.process.stop()  # A's second process takes the lead and tells every KME again
    deadline = time.monotonic() + 30
    while query(b, held) != [("destroyed",)] and time.monotonic() < deadline:
        time.sleep(0.3)
    assert query(b, held) == [("destroyed",)]
    told = query(
        b, "SELECT actor FROM audit_records WHERE action = 'sae.peer_revoked' AND subject = 'SAE-A2'"
    )
    assert told == [("kme:KME-A",)]
