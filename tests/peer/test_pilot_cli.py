"""``qkms pilot``: the two-site pilot as plain processes (the mirror of docker/compose.two-site.yml),
run as a real command; and ``qkms pilot server-cert``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from typer.testing import CliRunner

from kms.cli.main import app
from kms.crypto import pki
from tests.conftest import database_url

REPO = Path(__file__).resolve().parents[2]
KEY_ID = re.compile(r"key_ID ([0-9a-f-]{36})")
# A 256-bit key in base64, or 32 bytes in hex: neither may ever be printed.
MATERIAL = re.compile(r"[A-Za-z0-9+/]{43}=|[0-9a-fA-F]{64}")


def _two_site(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms", "pilot", "two-site", "--dir", str(directory), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _assert_matched(proc: subprocess.CompletedProcess[str], number: int) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    ids = KEY_ID.findall(out)
    assert len(ids) == len(set(ids)) == number
    assert f"both ends matched: {number}/{number} keys identical" in out
    assert "answered 200 (the same keys again: a redelivery inside the window)" in out
    assert "both KMEs stopped" in out
    assert not MATERIAL.search(out + proc.stderr)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_two_site_random_link(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    args = ["--number", "3"]
    if backend == "postgres":
        url_a, url_b = database_url(backend, request), database_url(backend, request)
        assert url_a and url_b and url_a != url_b  # each site its own database
        args += ["--database-url-a", url_a, "--database-url-b", url_b]
    proc = _two_site(tmp_path / "pilot", *args)
    _assert_matched(proc, 3)
    assert "link link-ab: random" in proc.stdout
    assert (tmp_path / "pilot" / "KME-A" / "qkms.toml").is_file()
    assert (tmp_path / "pilot" / "KME-B" / "qkms.toml").is_file()
    assert (tmp_path / "pilot" / "KME-A" / "qkms.db").exists() == (backend == "sqlite")


def test_two_site_through_the_simulated_device_pair(tmp_path: Path) -> None:
    proc = _two_site(tmp_path / "pilot", "--link", "device")
    _assert_matched(proc, 4)
    assert "simulated QKD device pair: device A https://127.0.0.1:" in proc.stdout


def test_two_site_refuses_a_used_directory(tmp_path: Path) -> None:
    (tmp_path / "pilot").mkdir()
    (tmp_path / "pilot" / "something").write_text("x")
    proc = _two_site(tmp_path / "pilot")
    assert proc.returncode == 2
    assert "not empty" in proc.stderr


def test_server_cert_reissues_for_new_names(tmp_path: Path) -> None:
    ca = pki.create_ca("test CA")
    pki.write_credential(ca, tmp_path / "ca.pem", tmp_path / "ca.key")
    old = pki.issue_server_cert(ca, "KME-X")
    pki.write_credential(old, tmp_path / "kme.pem", tmp_path / "kme.key")
    result = CliRunner().invoke(
        app,
        [
            "pilot", "server-cert", "--ca-cert", str(tmp_path / "ca.pem"), "--ca-key", str(tmp_path / "ca.key"),
            "--cert", str(tmp_path / "kme.pem"), "--key", str(tmp_path / "kme.key"),
            "--hostname", "kme-x", "--hostname", "localhost",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    new = pki.load_credential(tmp_path / "kme.pem", tmp_path / "kme.key")  # key matches the cert
    assert new.fingerprint_sha256 != old.fingerprint_sha256
    cert = x509.load_pem_x509_certificate(new.cert_pem)
    assert pki.certificate_common_name(new.cert_pem) == "KME-X"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"kme-x", "localhost"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.issuer == x509.load_pem_x509_certificate(ca.cert_pem).subject
    assert (tmp_path / "kme.key").stat().st_mode & 0o077 == 0
