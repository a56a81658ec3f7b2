"""``[siem]`` that cannot work stops ``qkms serve`` at start with one line and exit 2, before it
listens or touches the database; a receiver that is merely down does not (the shipper retries)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from kms.config import ConfigError, KmsSettings
from kms.lab.launcher import free_port
from kms.provision.workdir import init_workdir


def _workdir(tmp_path: Path, siem: dict[str, Any]) -> Path:
    result = init_workdir(tmp_path / "kme", "KME-CFG", ["SAE-A"], port=free_port(), link_source=None)
    config = tomllib.loads(result.config_path.read_text())
    config["siem"] = siem
    result.config_path.write_text(tomli_w.dumps(config))
    return result.config_path


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms", "serve", "--config", str(config), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("siem", "expected"),
    [
        (
            {"syslog": {"host": "siem-receiver.invalid", "port": 6514}},
            "siem.syslog.host 'siem-receiver.invalid' does not resolve",
        ),
        ({"syslog": {"host": "127.0.0.1", "ca_file": "bad-ca.pem"}}, "is not a usable CA certificate file"),
        (
            {"syslog": {"host": "127.0.0.1", "ca_file": "no-such-ca.pem"}},
            "is not a usable CA certificate file",
        ),
        ({"file": "qkms.toml/audit.jsonl"}, "cannot be opened for appending"),
    ],
)
def test_unusable_siem_settings_stop_the_start_in_one_line(
    tmp_path: Path, siem: dict[str, Any], expected: str
) -> None:
    config = _workdir(tmp_path, siem)
    (config.parent / "bad-ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    database = config.parent / "qkms.db"
    existed = database.exists()
    line = _one_line_error(_serve(config))
    assert expected in line, line
    assert database.exists() == existed  # nothing created or migrated


def test_half_a_client_certificate_is_a_config_error(tmp_path: Path) -> None:
    config = _workdir(tmp_path, {"syslog": {"host": "127.0.0.1", "client_cert": "pki/kme.pem"}})
    with pytest.raises(ConfigError, match="client_cert and client_key go together"):
        KmsSettings.load(config)
    done = _serve(config)  # the config loader's pydantic message (several lines, as for every section)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "client_cert and client_key go together" in done.stderr


def test_defaults_resolve_against_the_config_directory(tmp_path: Path) -> None:
    config = _workdir(tmp_path, {"file": "siem/audit.jsonl", "syslog": {"host": "127.0.0.1"}})
    settings = KmsSettings.load(config)
    assert settings.siem.active
    assert settings.siem.file == config.parent / "siem" / "audit.jsonl"
    assert settings.siem.state_dir == config.parent / "siem-state"
    assert settings.siem.syslog is not None and settings.siem.syslog.ca_file == settings.tls.ca_cert
    assert settings.siem.syslog.transport == "tls" and settings.siem.syslog.port == 6514
    assert not KmsSettings.load(_workdir(tmp_path / "off", {})).siem.active
