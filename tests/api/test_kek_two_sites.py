"""A KEK rotation at one site does not disturb the other (issue 16 part 5, docs/DECISIONS.md D-27):
two real KMEs joined by a shared link; KME A rotates its KEK while both serve. A's own pool, its
mirrors of B's pieces and the keys it reserved for B's slaves are re-sealed under A's new version;
keys made at A before and after the rotation are fetched at B, and keys made at B are fetched at A
(from A's re-sealed mirror), with identical material; B's keyring and rows are untouched."""

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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def net(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Network]:
    urls = {kme: database_url(request.param, request) for kme in ("KME-A", "KME-B")}
    network = open_network(tmp_path / "net", urls)
    with running_network(network.sites):
        try:
            wait_for_remote_keys(network, "KME-A", "SAE-A1", "SAE-B1")
            wait_for_remote_keys(network, "KME-B", "SAE-B1", "SAE-A1")
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
    r = net.sae(site, master).post(f"/api/v1/keys/{slave}/enc_keys", json={"number": 3})
    assert r.status_code == 200, r.text
    return list(r.json()["keys"])


def _dec(net: Network, site: str, slave: str, master: str, keys: list[dict[str, str]]) -> list[str]:
    body = {"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
    r = net.sae(site, slave).post(f"/api/v1/keys/{master}/dec_keys", json=body)
    assert r.status_code == 200, r.text
    return [k["key"] for k in r.json()["keys"]]


def _versions(net: Network, site: str) -> set[tuple[object, ...]]:
    s = net.sites[site]
    rows = query(s, "SELECT kek_id, owner_kme_id IS NOT NULL FROM key_blocks WHERE material IS NOT NULL")
    rows += query(s, "SELECT kek_id, 'key' FROM keys WHERE material IS NOT NULL")
    return set(rows)


def test_a_rotation_at_a_leaves_b_serving_and_untouched(net: Network) -> None:
    a, b = net.sites["KME-A"], net.sites["KME-B"]
    before_a = _enc(net, "KME-A", "SAE-A1", "SAE-B1")
    before_b = _enc(net, "KME-B", "SAE-B2", "SAE-A2")
    assert ("kek-1", True) in _versions(net, "KME-A")  # A holds mirrors of B's pieces
    b_rows = sorted(query(b, "SELECT id, kek_id, material FROM key_blocks ORDER BY id"))

    rotated = _qkms(a.config_path, "kek", "rotate")
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert {v for v, _ in _versions(net, "KME-A")} == {"kek-2"}

    assert _dec(net, "KME-B", "SAE-B1", "SAE-A1", before_a) == [k["key"] for k in before_a]
    assert _dec(net, "KME-A", "SAE-A2", "SAE-B2", before_b) == [k["key"] for k in before_b]
    after_a = _enc(net, "KME-A", "SAE-A1", "SAE-B1")
    after_b = _enc(net, "KME-B", "SAE-B2", "SAE-A2")
    assert _dec(net, "KME-B", "SAE-B1", "SAE-A1", after_a) == [k["key"] for k in after_a]
    assert _dec(net, "KME-A", "SAE-A2", "SAE-B2", after_b) == [k["key"] for k in after_b]

    assert query(b, "SELECT kek_id, state FROM kek_versions") == [("kek-1", "active")]
    assert {v for v, _ in _versions(net, "KME-B")} == {"kek-1"}
    # B's rows that existed before A rotated and were not touched by B's own serving are unchanged.
    unchanged = {r[0]: r for r in query(b, "SELECT id, kek_id, material FROM key_blocks ORDER BY id")}
    assert any(unchanged.get(r[0]) == r for r in b_rows)
    for site in (a, b):
        for args in (("db", "check"), ("audit", "verify")):
            done = _qkms(site.config_path, *args)
            assert done.returncode == 0, f"{site.kme_id}: {done.stdout}{done.stderr}"
