"""SAE lifecycle without restarts (issue 16, DECISIONS.md D-29), over real `qkms serve --workers 2`
processes, real mTLS and the real database (SQLite file and PostgreSQL).

Every change is made by the `qkms sae` command, which returns once every process must have seen it;
the very next request, on connections opened before the change, must be judged by the new registry.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select
from typer.testing import CliRunner

from kms.cli.main import app
from kms.crypto import pki
from kms.provision.workdir import sae_credential_paths
from kms.runtime.assembly import build_runtime
from kms.storage.schema import audit_head, audit_records, keys, registry_version, saes
from tests.conftest import database_url
from tests.kme_harness import RunningKme, running_kme

SAES = ("SAE-M", "SAE-S", "SAE-R", "SAE-Q", "SAE-T", "SAE-U", "SAE-W", "SAE-X")


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def kme(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKme]:
    workdir = tmp_path_factory.mktemp(f"sae-{request.param}")
    with running_kme(
        workdir, database_url(request.param, request), saes=SAES, workers=2, fill_keys=256
    ) as running:
        yield running


def qkms(kme: RunningKme, *args: str) -> Any:
    return CliRunner(env={"COLUMNS": "300"}).invoke(app, [*args, "--config", str(kme.workdir / "qkms.toml")])


def rows(kme: RunningKme, stmt: Any) -> list[Any]:
    engine = create_engine(kme.settings.database.url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(stmt))
    finally:
        engine.dispose()


def local_port(resp: httpx.Response) -> int:
    """The client side's port: the same number before and after means the same TCP connection."""
    return int(resp.extensions["network_stream"].get_extra_info("client_addr")[1])


def client_for(kme: RunningKme, cert: Path, key: Path) -> httpx.Client:
    client = kme.process.client(kme.ca, cert, key)
    kme.clients[f"extra-{len(kme.clients)}"] = client  # closed with the KME
    return client


def audit_actions(kme: RunningKme, subject: str) -> list[tuple[str, dict[str, Any]]]:
    found = rows(
        kme, select(audit_records.c.action, audit_records.c.data).where(audit_records.c.subject == subject)
    )
    return [(r.action, json.loads(r.data)) for r in found]


def test_revoke_refuses_the_next_request_on_open_connections(kme: RunningKme) -> None:
    master, slave = "SAE-U", "SAE-W"
    # Four keep-alive connections of the revoked SAE (spread over both worker processes).
    clients = [client_for(kme, *sae_credential_paths(kme.workdir, master)) for _ in range(4)]
    ports = []
    for client in clients:
        resp = client.get(f"/api/v1/keys/{slave}/status")
        assert resp.status_code == 200
        ports.append(local_port(resp))
    reserved = clients[0].post(f"/api/v1/keys/{slave}/enc_keys", json={"number": 3}).json()["keys"]
    key_ids = [k["key_ID"] for k in reserved]
    # A key already fetched (kept for the redelivery window) and a multicast key naming it as a slave.
    fetched = clients[0].get(f"/api/v1/keys/{slave}/enc_keys").json()["keys"][0]["key_ID"]
    body = {"key_IDs": [{"key_ID": fetched}]}
    assert kme.client(slave).post(f"/api/v1/keys/{master}/dec_keys", json=body).status_code == 200
    multicast = kme.client("SAE-M").post(
        "/api/v1/keys/SAE-S/enc_keys", json={"number": 1, "additional_slave_SAE_IDs": [master]}
    )
    assert multicast.status_code == 200
    multicast_id = multicast.json()["keys"][0]["key_ID"]

    result = qkms(kme, "sae", "revoke", master, "--reason", "key compromise drill")
    assert result.exit_code == 0, result.output
    assert "4 unfetched keys destroyed, 1 consumed keys' redelivery copies zeroised" in result.output

    for client, port in zip(clients, ports, strict=True):
        resp = client.get(f"/api/v1/keys/{slave}/status")
        assert resp.status_code == 401
        assert resp.json() == {"message": f"SAE {master} is revoked at this KME"}
        assert local_port(resp) == port  # the same connection, opened before the revocation
    # The keys it reserved are destroyed, material gone; its slave can no longer fetch them.
    resp = kme.client(slave).post(
        f"/api/v1/keys/{master}/dec_keys", json={"key_IDs": [{"key_ID": key_ids[0]}]}
    )
    assert resp.status_code == 400
    stored = rows(
        kme, select(keys.c.key_id, keys.c.state, keys.c.material).where(keys.c.master_sae_id == master)
    )
    assert {r.key_id: r.state for r in stored} == {key_ids[0]: "destroyed", fetched: "consumed"}
    assert all(r.material is None for r in stored)
    shared = rows(kme, select(keys.c.state, keys.c.material).where(keys.c.key_id == multicast_id))
    assert [(r.state, r.material) for r in shared] == [("destroyed", None)]
    assert (
        "sae.revoked",
        {"reason": "key compromise drill", "from": "active", "keys_destroyed": 4, "redelivery_zeroised": 1},
    ) in audit_actions(kme, master)
    # A master asking for keys for the revoked SAE as slave is refused too.
    assert kme.client("SAE-M").get(f"/api/v1/keys/{master}/enc_keys").status_code == 400

    # Final: resume is refused, and a start (which writes the configuration's SAEs) keeps it revoked.
    again = qkms(kme, "sae", "resume", master)
    assert again.exit_code == 1
    assert (
        again.output.strip()
        == f"error: SAE '{master}' is revoked; a revoked SAE cannot change state (register a new SAE ID)"
    )
    build_runtime(kme.settings, sync_registry=True).close()
    assert rows(kme, select(saes.c.state).where(saes.c.id == master))[0].state == "revoked"
    assert clients[1].get(f"/api/v1/keys/{slave}/status").status_code == 401
    # Every change was audited through the chain, which still verifies.
    verify = qkms(kme, "audit", "verify")
    assert verify.exit_code == 0, verify.output


def test_suspend_then_resume(kme: RunningKme) -> None:
    client = client_for(kme, *sae_credential_paths(kme.workdir, "SAE-R"))
    first = client.get("/api/v1/keys/SAE-S/status")
    assert first.status_code == 200
    reserved = client.get("/api/v1/keys/SAE-S/enc_keys").json()["keys"][0]["key_ID"]

    assert qkms(kme, "sae", "suspend", "SAE-R", "--reason", "maintenance").exit_code == 0
    resp = client.get("/api/v1/keys/SAE-S/status")
    assert (resp.status_code, resp.json()) == (401, {"message": "SAE SAE-R is suspended at this KME"})
    assert local_port(resp) == local_port(first)
    # Suspension keeps the SAE's keys: still reserved.
    assert rows(kme, select(keys.c.state).where(keys.c.key_id == reserved))[0].state == "reserved"
    twice = qkms(kme, "sae", "suspend", "SAE-R")
    assert (twice.exit_code, twice.output.strip()) == (1, "error: SAE 'SAE-R' is already suspended")

    assert qkms(kme, "sae", "resume", "SAE-R").exit_code == 0
    assert client.get("/api/v1/keys/SAE-S/status").status_code == 200
    fetched = kme.client("SAE-S").post(
        "/api/v1/keys/SAE-R/dec_keys", json={"key_IDs": [{"key_ID": reserved}]}
    )
    assert fetched.status_code == 200
    assert [a for a, _ in audit_actions(kme, "SAE-R")] == ["sae.suspended", "sae.resumed"]


def test_add_issued_sae_serves_at_once(kme: RunningKme) -> None:
    result = qkms(kme, "sae", "add", "SAE-NEW")
    assert result.exit_code == 0, result.output
    client = client_for(kme, *sae_credential_paths(kme.workdir, "SAE-NEW"))
    got = client.get("/api/v1/keys/SAE-M/enc_keys")
    assert got.status_code == 200
    key_id = got.json()["keys"][0]["key_ID"]
    assert (
        kme.client("SAE-M")
        .post("/api/v1/keys/SAE-NEW/dec_keys", json={"key_IDs": [{"key_ID": key_id}]})
        .status_code
        == 200
    )
    listing = qkms(kme, "sae", "list")
    assert "SAE-NEW" in listing.output and "site-ca" in listing.output


def test_rotate_keeps_the_old_certificate_for_the_grace_period(kme: RunningKme, tmp_path: Path) -> None:
    cert, key = sae_credential_paths(kme.workdir, "SAE-T")
    old_cert, old_key = tmp_path / "old.pem", tmp_path / "old.key"
    shutil.copy(cert, old_cert)
    shutil.copy(key, old_key)
    old_client = client_for(kme, old_cert, old_key)
    assert old_client.get("/api/v1/keys/SAE-S/status").status_code == 200

    result = qkms(kme, "sae", "rotate", "SAE-T", "--grace-hours", "1")
    assert result.exit_code == 0, result.output
    assert pki.fingerprint_sha256(cert.read_bytes()) != pki.fingerprint_sha256(old_cert.read_bytes())
    assert client_for(kme, cert, key).get("/api/v1/keys/SAE-S/status").status_code == 200
    assert old_client.get("/api/v1/keys/SAE-S/status").status_code == 200  # open connection, in grace
    assert client_for(kme, old_cert, old_key).get("/api/v1/keys/SAE-S/status").status_code == 200  # new one

    second_cert, second_key = tmp_path / "second.pem", tmp_path / "second.key"
    shutil.copy(cert, second_cert)
    shutil.copy(key, second_key)
    assert qkms(kme, "sae", "rotate", "SAE-T", "--grace-hours", "0").exit_code == 0
    # No grace: the second certificate is refused at once, and the first (grace ended by the new rotation) too.
    assert client_for(kme, second_cert, second_key).get("/api/v1/keys/SAE-S/status").status_code == 401
    assert old_client.get("/api/v1/keys/SAE-S/status").status_code == 401
    assert client_for(kme, cert, key).get("/api/v1/keys/SAE-S/status").status_code == 200
    rotations = [d for a, d in audit_actions(kme, "SAE-T") if a == "sae.rotated"]
    assert len(rotations) == 2 and rotations[0]["previous_fingerprint"] == pki.fingerprint_sha256(
        old_cert.read_bytes()
    )


def _enterprise(tmp_path: Path, sae_id: str, valid_days: int = 825) -> tuple[Path, Path, Path]:
    ca = pki.create_ca("Example Bank Issuing CA 7")
    pki.write_credential(ca, tmp_path / "bank-ca.pem", tmp_path / "bank-ca.key")
    leaf = pki.issue_client_cert(ca, sae_id, role="sae", valid_days=valid_days)
    pki.write_credential(leaf, tmp_path / f"{sae_id}.pem", tmp_path / f"{sae_id}.key")
    return tmp_path / "bank-ca.pem", tmp_path / f"{sae_id}.pem", tmp_path / f"{sae_id}.key"


def test_enterprise_ca_certificate_pinned(kme: RunningKme, tmp_path: Path) -> None:
    ca, cert, key = _enterprise(tmp_path, "SAE-BANK", valid_days=10)
    result = qkms(kme, "sae", "add", "SAE-BANK", "--cert", str(cert), "--ca", str(ca))
    assert result.exit_code == 0, result.output
    client = client_for(kme, cert, key)
    assert client.get("/api/v1/keys/SAE-M/status").status_code == 200
    # The CA only lets the handshake through: its other certificates are not pinned and are refused.
    other = pki.issue_client_cert(pki.load_credential(ca, tmp_path / "bank-ca.key"), "SAE-BANK2", role="sae")
    pki.write_credential(other, tmp_path / "other.pem", tmp_path / "other.key")
    resp = client_for(kme, tmp_path / "other.pem", tmp_path / "other.key").get("/api/v1/keys/SAE-M/status")
    assert (resp.status_code, resp.json()["message"]) == (
        401,
        "the client certificate does not belong to a registered SAE",
    )
    # qkms status shows its expiry and warns: it expires within sae_registry.expiry_warning_days.
    status = qkms(kme, "status")
    assert status.exit_code == 0, status.output
    assert "SAE SAE-BANK (current)" in status.output and "KME server certificate" in status.output
    assert "warning: SAE SAE-BANK (current) (CN=SAE-BANK,OU=sae) expires in" in " ".join(
        status.output.split()
    )


def _state(kme: RunningKme) -> tuple[Any, ...]:
    return (
        rows(kme, select(registry_version.c.version))[0].version,
        rows(kme, select(audit_head.c.seq))[0].seq,
        sorted(tuple(r) for r in rows(kme, select(saes.c.id, saes.c.state, saes.c.cert_fingerprint))),
        sorted(p.name for p in kme.settings.sae_registry.trusted_ca_dir.iterdir()),
    )


def test_bad_input_is_one_line_and_changes_nothing(kme: RunningKme, tmp_path: Path) -> None:
    ca, cert, _ = _enterprise(tmp_path, "SAE-Z")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    (tmp_path / "other").mkdir()
    other_ca, _, _ = _enterprise(tmp_path / "other", "SAE-Z")  # the same CA name, another key
    cases = [
        (["sae", "revoke", "SAE-NOPE"], "error: no SAE 'SAE-NOPE' is registered at this KME"),
        (["sae", "suspend", "SAE-NOPE"], "error: no SAE 'SAE-NOPE' is registered at this KME"),
        (
            ["sae", "add", "../etc"],
            "error: SAE ID '../etc' must be 1-128 characters of letters, digits, '.', '_' or '-'",
        ),
        (["sae", "add", "SAE-M"], "error: sae 'SAE-M' is already registered"),
        (
            ["sae", "add", "SAE-Z", "--cert", str(garbage)],
            f"error: certificate {garbage} is not a PEM or DER X.509 certificate",
        ),
        (
            ["sae", "add", "SAE-Z", "--cert", str(cert), "--ca", str(cert)],
            "error: the CA certificate (CN=SAE-Z,OU=sae) is not a CA (basic constraints CA=false or absent)",
        ),
        (
            ["sae", "add", "SAE-Z", "--cert", str(cert), "--ca", str(other_ca)],
            f"error: the certificate's signature does not verify under the CA in {other_ca}",
        ),
        (
            ["sae", "add", "SAE-Z", "--cert", str(cert)],
            "error: the certificate was not issued by the site CA (give the issuing CA with --ca) (issuer CN=Example Bank Issuing CA 7)",
        ),
        (
            ["sae", "add", "SAE-Y", "--cert", str(cert), "--ca", str(ca)],
            "error: the certificate's CN is 'SAE-Z', not the SAE ID 'SAE-Y'",
        ),
        (["sae", "add", "SAE-Z", "--ca", str(ca)], "error: --ca names the issuer of --cert; give --cert too"),
        (
            ["sae", "rotate", "SAE-M", "--cert", str(ca), "--ca", str(ca)],
            "error: the certificate is a CA certificate, not an SAE's client certificate",
        ),
    ]
    before = _state(kme)
    for args, message in cases:
        result = qkms(kme, *args)
        assert result.exit_code == 1, (args, result.output)
        assert " ".join(result.output.split()) == message, args
        assert _state(kme) == before, args
