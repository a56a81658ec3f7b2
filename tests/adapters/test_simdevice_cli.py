"""``qkms sim device init`` / ``serve`` as an operator runs them (real subprocesses)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from kms.crypto.pki import certificate_common_name, fingerprint_sha256


def qkms(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kms", *args], capture_output=True, text=True, timeout=120)


def test_device_init_makes_the_pki_and_serve_refuses_without_it(tmp_path: Path) -> None:
    d = tmp_path / "dev"
    res = qkms(
        "sim", "device", "init", "--dir", str(d), "--site-a-client", "kme-a", "--site-b-client", "kme-b"
    )
    assert res.returncode == 0, res.stderr
    config = tomllib.loads((d / "device.toml").read_text())
    for site, client in (("a", "kme-a"), ("b", "kme-b")):
        cert = (d / "clients" / f"{client}.pem").read_bytes()
        assert certificate_common_name(cert) == client
        assert config[f"site_{site}"]["client_fingerprint"] == fingerprint_sha256(cert)
        assert (d / "clients" / f"{client}.key").stat().st_mode & 0o777 == 0o600
        assert (d / f"device-{site}.key").stat().st_mode & 0o777 == 0o600
    assert (d / "ca.key").stat().st_mode & 0o777 == 0o600

    again = qkms("sim", "device", "init", "--dir", str(d))
    assert again.returncode != 0 and "not empty" in again.stderr
    missing = qkms(
        "sim", "device", "serve", "--dir", str(tmp_path / "nope"), "--port-a", "1", "--port-b", "2"
    )
    assert missing.returncode != 0 and "device.toml" in missing.stderr
    same = qkms("sim", "device", "serve", "--dir", str(d), "--port-a", "5", "--port-b", "5")
    assert same.returncode != 0 and "must differ" in same.stderr
