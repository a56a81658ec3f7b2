"""The qkms CLI as an operator runs it (real subprocesses), and configuration errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kms.config import ConfigError, KmsSettings
from kms.crypto.pki import certificate_common_name, fingerprint_sha256
from kms.storage.migrate import head_revision


def qkms(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kms", *args], capture_output=True, text=True, timeout=120)


def test_init_creates_a_complete_working_directory(tmp_path: Path) -> None:
    d = tmp_path / "site"
    res = qkms("init", "--dir", str(d), "--kme-id", "KME-1", "--sae", "SAE-1", "--sae", "SAE-2")
    assert res.returncode == 0, res.stderr
    for rel in ("qkms.toml", "pki/ca.pem", "pki/kme.pem", "pki/kme.key", "kek.bin", "qkms.db"):
        assert (d / rel).is_file(), rel
    for sae in ("SAE-1", "SAE-2"):
        cert = (d / "pki" / "sae" / f"{sae}.pem").read_bytes()
        assert certificate_common_name(cert) == sae
        assert (d / "pki" / "sae" / f"{sae}.key").stat().st_mode & 0o777 == 0o600
    assert (d / "kek.bin").stat().st_mode & 0o777 == 0o600
    settings = KmsSettings.load(d / "qkms.toml")
    assert {s.id: s.cert_fingerprint for s in settings.saes} == {
        s: fingerprint_sha256((d / "pki" / "sae" / f"{s}.pem").read_bytes()) for s in ("SAE-1", "SAE-2")
    }
    assert settings.links[0].source == "simulated"

    up = qkms("db", "upgrade", "--config", str(d / "qkms.toml"))
    assert up.returncode == 0 and f"revision {head_revision()}" in up.stdout
    status = qkms("status", "--config", str(d / "qkms.toml"))
    assert status.returncode == 0, status.stderr
    assert "SAE-1" in status.stdout


def test_init_refuses_bad_ids_and_non_empty_dirs(tmp_path: Path) -> None:
    bad = qkms("init", "--dir", str(tmp_path / "x"), "--kme-id", "KME 1", "--sae", "S")
    assert bad.returncode == 2 and "letters, digits" in bad.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    full = qkms("init", "--dir", str(tmp_path / "full"), "--kme-id", "K", "--sae", "S")
    assert full.returncode == 2 and "not empty" in full.stderr


def test_help_explains_every_command() -> None:
    res = qkms("--help")
    assert res.returncode == 0
    for cmd in ("init", "serve", "status", "db", "demo"):
        assert cmd in res.stdout


def test_config_errors_are_readable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        KmsSettings.load(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[kme\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        KmsSettings.load(tmp_path / "bad.toml")
    (tmp_path / "sizes.toml").write_text(
        '[kme]\nid="K"\n[tls]\nca_cert="a"\nserver_cert="b"\nserver_key="c"\n[kek]\nfile="k"\n'
        "[pool]\nkey_size=100\n"
    )
    with pytest.raises(ConfigError, match="multiple of 8"):
        KmsSettings.load(tmp_path / "sizes.toml")


def test_serve_with_bad_config_exits_cleanly(tmp_path: Path) -> None:
    res = qkms("serve", "--config", str(tmp_path / "nope.toml"))
    assert res.returncode == 2 and "not found" in res.stderr and "Traceback" not in res.stderr


def test_sim_run_summarises_an_honest_and_an_attacked_link() -> None:
    env_cols = {"COLUMNS": "200"}
    import os

    honest = subprocess.run(
        [sys.executable, "-m", "kms", "sim", "run", "--seconds", "1", "--block-seconds", "1", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env_cols},
    )
    assert honest.returncode == 0, honest.stderr
    assert "blocks (aborted)" in honest.stdout and "1 (0)" in honest.stdout
    final = next(line for line in honest.stdout.splitlines() if "final secret key bits" in line)
    assert int(final.split("│")[2].strip().replace(",", "")) > 50_000
    attacked = subprocess.run(
        [
            sys.executable,
            "-m",
            "kms",
            "sim",
            "run",
            "--seconds",
            "1",
            "--block-seconds",
            "1",
            "--seed",
            "3",
            "--attack",
            "intercept-resend:1.0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env_cols},
    )
    assert (
        attacked.returncode == 0 and "1 (1)" in attacked.stdout and "qber-over-threshold" in attacked.stdout
    )


def test_sim_keyrate_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "rate.png"
    res = qkms(
        "sim",
        "keyrate",
        "--out",
        str(out),
        "--mc-distances",
        "0,50",
        "--repeats",
        "1",
        "--mc-pulses",
        "10000000",
    )
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_sim_run_rejects_bad_options() -> None:
    res = qkms("sim", "run", "--protocol", "nonsense", "--seconds", "1")
    assert res.returncode == 2 and "protocol" in (res.stderr + res.stdout)
