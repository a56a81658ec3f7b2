"""Audit trail over the real server: role separation, provenance, tamper detection, export, fail closed."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, delete, text, update

from kms.provision.workdir import auditor_credential_paths
from kms.storage.schema import audit_head, audit_records
from tests.kme_harness import RunningKme, running_kme

M, S, AUDITOR = "SAE-M", "SAE-S", "AUDITOR-1"


@pytest.fixture(scope="module")
def akme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKme]:
    workdir = tmp_path_factory.mktemp("audit") / "kme"
    with running_kme(
        workdir, None, saes=(M, S), auditors=(AUDITOR,), pool={"reserved_ttl_seconds": 300}
    ) as kme:
        yield kme


def _auditor(kme: RunningKme) -> httpx.Client:
    cert, key = auditor_credential_paths(kme.workdir, AUDITOR)
    return kme.process.client(kme.ca, cert, key)


def qkms(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run(
        [sys.executable, "-m", "kms", *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_roles_are_separated(akme: RunningKme) -> None:
    key_id = akme.client(M).get(f"/api/v1/keys/{S}/enc_keys").json()["keys"][0]["key_ID"]
    for path in (f"/api/v1/audit/keys/{key_id}", "/api/v1/audit/events", "/api/v1/audit/verify"):
        resp = akme.client(M).get(path)
        assert resp.status_code == 401 and "auditor" in resp.json()["message"]
    with _auditor(akme) as auditor:
        for resp in (
            auditor.get(f"/api/v1/keys/{S}/enc_keys"),
            auditor.get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": key_id}),
            auditor.get(f"/api/v1/keys/{S}/status"),
        ):
            assert resp.status_code == 401 and "key material" in resp.json()["message"]


def test_provenance_tells_where_every_bit_came_from_and_never_the_material(akme: RunningKme) -> None:
    key = akme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"size": 512}).json()["keys"][0]
    akme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": key["key_ID"]})
    with _auditor(akme) as auditor:
        resp = auditor.get(f"/api/v1/audit/keys/{key['key_ID']}")
    assert resp.status_code == 200
    prov = resp.json()
    assert prov["state"] == "consumed" and prov["policy"] == "qkd" and prov["size_bits"] == 512
    assert prov["master_SAE_ID"] == M and [r["SAE_ID"] for r in prov["recipients"]] == [S]
    bits = prov["bits"]
    assert bits["link_ID"] == "link-local-1" and bits["bit_length"] == 512 and bits["first_bit"] % 8 == 0
    assert bits["block_provenance"]["protocol"] == "csprng-test-source"
    assert bits["block_provenance"]["is_qkd"] is False
    assert [(t["from"], t["to"]) for t in prov["transitions"]] == [
        ("active", "reserved"),
        ("reserved", "consumed"),
    ]
    assert len(prov["audit_seqs"]) == 2
    raw = base64.b64decode(key["key"])
    assert key["key"] not in resp.text and raw.hex() not in resp.text


def test_unknown_key_provenance_is_400(akme: RunningKme) -> None:
    with _auditor(akme) as auditor:
        resp = auditor.get("/api/v1/audit/keys/00000000-0000-4000-8000-000000000000")
    assert resp.status_code == 400 and resp.json()["message"]


def test_events_and_signed_checkpoints_verify(akme: RunningKme) -> None:
    akme.client(M).get(f"/api/v1/keys/{S}/enc_keys")
    deadline = time.monotonic() + 20
    with _auditor(akme) as auditor:
        while time.monotonic() < deadline:
            report = auditor.get("/api/v1/audit/verify").json()
            if report["checkpoints_valid"] and report["unsigned_tail"] == 0:
                break
            time.sleep(0.5)
        assert report["ok"] and report["checkpoints_valid"] >= 1, report
        events = auditor.get("/api/v1/audit/events", params={"limit": 1000}).json()
        actions = {r["action"] for r in events["records"]}
        assert {"block.received", "keys.reserved", "keys.delivered"} <= actions
        seqs = [r["seq"] for r in events["records"]]
        assert seqs == list(range(1, len(seqs) + 1))
        later = auditor.get("/api/v1/audit/events", params={"after_seq": seqs[-2]}).json()["records"]
        assert [r["seq"] for r in later] == seqs[-1:] or len(later) >= 1
        bad = auditor.get("/api/v1/audit/events", params={"limit": 0})
        assert bad.status_code == 400 and "message" in bad.json()


def test_denied_access_is_audited(akme: RunningKme) -> None:
    from kms.provision.workdir import init_workdir  # noqa: F401  (the harness already created the SAEs)

    key_id = akme.client(M).get(f"/api/v1/keys/{S}/enc_keys").json()["keys"][0]["key_ID"]
    assert akme.client(M).get(f"/api/v1/keys/{S}/dec_keys", params={"key_ID": key_id}).status_code in (
        400,
        401,
    )
    with _auditor(akme) as auditor:
        records = auditor.get("/api/v1/audit/events", params={"limit": 1000}).json()["records"]
    assert any(r["action"] in ("access.denied",) or key_id in json.dumps(r["data"]) for r in records)


def test_offline_export_verifies_with_only_the_public_key_and_detects_tampering(
    akme: RunningKme, tmp_path: Path
) -> None:
    config = str(akme.workdir / "qkms.toml")
    assert (
        qkms("keys", "export-public", "--config", config, "--out", str(tmp_path / "pub.json")).returncode == 0
    )
    exp = qkms("audit", "export", "--config", config, "--out", str(tmp_path / "audit.json"))
    assert exp.returncode == 0, exp.stderr
    ok = qkms(
        "audit", "verify", "--file", str(tmp_path / "audit.json"), "--public-key", str(tmp_path / "pub.json")
    )
    assert ok.returncode == 0 and "intact" in ok.stdout

    data = json.loads((tmp_path / "audit.json").read_text())
    data["records"][2]["data"]["key_IDs"] = ["forged"]
    (tmp_path / "edited.json").write_text(json.dumps(data))
    bad = qkms(
        "audit", "verify", "--file", str(tmp_path / "edited.json"), "--public-key", str(tmp_path / "pub.json")
    )
    assert bad.returncode == 1 and "seq 3 was edited" in bad.stdout

    other = tmp_path / "other"
    assert (
        qkms(
            "init", "--dir", str(other), "--kme-id", "KME-X", "--sae", "A", "--link-source", "random"
        ).returncode
        == 0
    )
    assert (
        qkms(
            "keys", "export-public", "--config", str(other / "qkms.toml"), "--out", str(tmp_path / "x.json")
        ).returncode
        == 0
    )
    wrong = qkms(
        "audit", "verify", "--file", str(tmp_path / "audit.json"), "--public-key", str(tmp_path / "x.json")
    )
    assert wrong.returncode == 1 and "invalid signature" in wrong.stdout


def test_cli_show_and_events(akme: RunningKme) -> None:
    key_id = akme.client(M).get(f"/api/v1/keys/{S}/enc_keys").json()["keys"][0]["key_ID"]
    config = str(akme.workdir / "qkms.toml")
    show = qkms("audit", "show", key_id, "--config", config)
    assert show.returncode == 0 and '"state": "reserved"' in show.stdout
    events = qkms(
        "audit", "events", "--config", config, "--since", "2000-01-01T00:00:00+00:00", "--limit", "5"
    )
    assert events.returncode == 0 and "block.received" in events.stdout


def test_audit_failure_fails_the_request_and_loses_nothing(tmp_path: Path) -> None:
    with running_kme(tmp_path / "kme", None, saes=(M, S), fill_keys=64) as kme:
        engine = create_engine(kme.settings.database.url)
        count_keys = text("SELECT COUNT(*) FROM keys")
        with engine.connect() as conn:
            before = conn.execute(count_keys).scalar_one()
        with engine.begin() as conn:
            conn.execute(delete(audit_head))  # the chain head is gone: appends cannot chain
        resp = kme.client(M).get(f"/api/v1/keys/{S}/enc_keys")
        assert resp.status_code == 503 and "message" in resp.json()
        with engine.connect() as conn:
            assert conn.execute(count_keys).scalar_one() == before  # no key was reserved unaudited
        with engine.begin() as conn:
            last = conn.execute(text("SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1")).one()
            conn.execute(audit_head.insert().values(id=1, seq=last.seq, hash=last.hash))
        engine.dispose()
        assert kme.client(M).get(f"/api/v1/keys/{S}/enc_keys").status_code == 200


def test_database_tampering_is_detected_by_verify(tmp_path: Path) -> None:
    """Edit, delete, insert and reorder records in the live database; `qkms audit verify` names each."""
    with running_kme(tmp_path / "kme", None, saes=(M, S), fill_keys=64) as kme:
        for _ in range(6):
            kme.client(M).get(f"/api/v1/keys/{S}/enc_keys")
        config = str(kme.workdir / "qkms.toml")
        assert qkms("audit", "export", "--config", config, "--out", str(tmp_path / "a.json")).returncode == 0
        assert qkms("audit", "verify", "--config", config).returncode == 0
        engine = create_engine(kme.settings.database.url)

        def verify() -> str:
            res = qkms("audit", "verify", "--config", config)
            assert res.returncode == 1
            return res.stdout

        with engine.begin() as conn:
            conn.execute(
                update(audit_records).where(audit_records.c.seq == 4).values(actor="sae:SOMEONE-ELSE")
            )
        assert "seq 4 was edited" in verify()
        with engine.begin() as conn:
            row = conn.execute(text("SELECT * FROM audit_records WHERE seq = 4")).one()
            conn.execute(update(audit_records).where(audit_records.c.seq == 4).values(actor=f"sae:{M}"))
        with engine.begin() as conn:
            conn.execute(delete(audit_records).where(audit_records.c.seq == 5))
        assert "seq 5 deleted" in verify()
        with engine.begin() as conn:
            conn.execute(audit_records.insert().values(**{**row._mapping, "seq": 5}))
        assert "seq 5 does not chain" in verify() or "seq 5 was edited" in verify()
        engine.dispose()
