"""A KME whose KEK is unwrapped by a PKCS#11 token (SoftHSM2), end to end through the real server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kms.config import KmsSettings
from kms.lab.launcher import KmeProcess, free_port
from kms.provision.workdir import sae_credential_paths
from tests.support.softhsm import SoftHsm, softhsm_available, softhsm_required


@pytest.fixture
def token(tmp_path: Path):  # type: ignore[no-untyped-def]
    ok, why = softhsm_available()
    if not ok:
        if softhsm_required():
            pytest.fail(f"SoftHSM2 is required but unavailable: {why}")
        pytest.skip(f"SoftHSM2 not installed: {why}")
    hsm = SoftHsm(tmp_path).start()
    try:
        yield hsm, hsm.init_token("qkms-kek")
    finally:
        hsm.stop()


def test_kme_runs_on_a_pkcs11_kek(token, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    hsm, tok = token
    env = {**os.environ, "QKMS_PKCS11_PIN": tok.pin, "SOFTHSM2_CONF": str(hsm.conf)}
    work = tmp_path / "kme"
    init = subprocess.run(
        [
            sys.executable,
            "-m",
            "kms",
            "init",
            "--dir",
            str(work),
            "--kme-id",
            "KME-H",
            "--sae",
            "A",
            "--sae",
            "B",
            "--link-source",
            "random",
            "--port",
            str(free_port()),
            "--pkcs11-module",
            str(tok.module),
            "--pkcs11-token",
            tok.label,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert init.returncode == 0, init.stderr
    assert not (work / "kek.bin").exists() and (work / "kek.wrapped").stat().st_mode & 0o777 == 0o600
    settings = KmsSettings.load(work / "qkms.toml")
    assert settings.kek.pkcs11 is not None and settings.kek.file is None

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    kme = KmeProcess(work / "qkms.toml", settings.kme.port).start()
    try:
        cert, key = sae_credential_paths(work, "A")
        with kme.client(work / "pki" / "ca.pem", cert, key) as a:
            kme.wait_for_keys(a, "B", minimum=4)
            got = a.get("/api/v1/keys/B/enc_keys").json()["keys"][0]
        cert, key = sae_credential_paths(work, "B")
        with kme.client(work / "pki" / "ca.pem", cert, key) as b:
            assert b.get("/api/v1/keys/A/dec_keys", params={"key_ID": got["key_ID"]}).json()["keys"] == [got]
    finally:
        kme.stop()

    monkeypatch.setenv("QKMS_PKCS11_PIN", "wrong-pin")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "kms",
            "serve",
            "--config",
            str(work / "qkms.toml"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "PIN" in bad.stderr and tok.pin not in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr
