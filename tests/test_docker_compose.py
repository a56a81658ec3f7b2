"""The docker-compose two-site pilot, kept valid on machines without a Docker engine.

``docker/provision-two-site.sh`` runs for real (each site on SQLite: the dry run) and the directory it
makes is checked; ``docker-compose config`` validates ``docker/compose.two-site.yml`` against that
directory (services, ports, dependencies, networks, mounts); and the provisioned sites then run as
plain processes, with the compose network's names mapped to 127.0.0.1, so the demo SAE exchange goes
through exactly the files the containers would mount.

``docker-compose`` missing is a skip, unless QKMS_REQUIRE_DOCKER_COMPOSE=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import yaml
from cryptography import x509

from kms.cli.pilot import serve_device_pair
from kms.config import KmsSettings
from kms.lab.launcher import KmeProcess, free_port

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker" / "compose.two-site.yml"
PROVISION = REPO / "docker" / "provision-two-site.sh"
PASSWORDS = {"A": "pilot-test-password-a", "B": "pilot-test-password-b"}
QKMS_SERVICES = {"provision", "qkd-devices", "kme-a", "kme-b", "demo-sae"}


def _provision(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(PROVISION), str(out)],
        cwd=REPO,
        env={**os.environ, "QKMS": f"{sys.executable} -m kms", **env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def pilot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compose-pilot") / "pilot"
    proc = _provision(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _docker_compose() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        why = "docker-compose is not installed (Debian package docker-compose; scripts/test.sh installs it)"
        if os.environ.get("QKMS_REQUIRE_DOCKER_COMPOSE") == "1":
            pytest.fail(f"docker-compose is required (QKMS_REQUIRE_DOCKER_COMPOSE=1): {why}")
        pytest.skip(why)
    return exe


def _compose_config(pilot: Path, **overrides: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QKMS_PG_", "QKMS_PILOT_", "COMPOSE_"))}
    env.update(
        QKMS_PILOT_DIR=str(pilot),
        QKMS_PG_PASSWORD_A=PASSWORDS["A"],
        QKMS_PG_PASSWORD_B=PASSWORDS["B"],
        QKMS_UID="1234",
        QKMS_GID="1234",
    )
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run(
        [_docker_compose(), "-f", str(COMPOSE), "config"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _ports(service: dict[str, Any]) -> set[str]:
    """Published ports as host_ip:published:target, from Compose v1 strings or v2 mappings."""
    out = set()
    for p in service.get("ports", []):
        if isinstance(p, str):
            out.add(p.removesuffix("/tcp"))
        else:
            out.add(f"{p.get('host_ip', '')}:{p['published']}:{p['target']}")
    return out


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Volumes as {target: (source, read_only)}, from Compose v1 strings or v2 mappings."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            out[parts[1]] = (parts[0], len(parts) > 2 and "ro" in parts[2].split(","))
        else:
            out[v["target"]] = (v["source"], bool(v.get("read_only", False)))
    return out


def _depends(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def _sans(cert: Path) -> tuple[set[str], set[str]]:
    ext = x509.load_pem_x509_certificate(cert.read_bytes()).extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(san.get_values_for_type(x509.DNSName)), {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


# --------------------------------------------------------------------------- provisioning


def test_provisioning_lays_out_both_sites(pilot_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for site, me, other, device_port, role in (
        ("kme-a", "KME-A", "KME-B", 9401, "master"),
        ("kme-b", "KME-B", "KME-A", 9402, "follower"),
    ):
        d = pilot_dir / site
        settings = KmsSettings.load(d / "qkms.toml")
        assert settings.kme.id == me and settings.kme.port == 8443
        assert [(p.kme_id, p.url) for p in settings.peers] == [(other, f"https://{other.lower()}:8443")]
        assert (d / "peers" / f"{other}.json").read_bytes() == (
            pilot_dir / "bundles" / f"{other}.json"
        ).read_bytes()
        # One link, through the device pair, declared at both ends with the same ID; no local link.
        [link] = settings.links
        assert (link.id, link.peer_kme_id, link.source) == ("link-ab", other, "etsi014")
        assert link.options["role"] == role
        assert link.options["url"] == f"https://qkd-devices:{device_port}"
        for name in ("ca_cert", "client_cert", "client_key"):
            assert (d / link.options[name]).is_file(), name  # inside the directory the KME mounts
        # The server certificate names the container, and still localhost/127.0.0.1 for the host.
        dns, ips = _sans(d / "pki" / "kme.pem")
        assert dns == {site, "localhost"} and ips == {"127.0.0.1"}
        # No private key that the running KME does not need: not the CA's, not the SAEs'.
        assert not (d / "pki" / "ca.key").exists()
        assert not list((d / "pki" / "sae").glob("*.key"))
        for key in (
            d / "kek.bin",
            d / "pki" / "kme.key",
            d / "pki" / "kme-client.key",
            d / "device" / f"{site}.key",
        ):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        # In the containers, the environment points each KME at its own PostgreSQL.
        monkeypatch.setenv("QKMS_DATABASE__URL", f"postgresql+psycopg://qkms@postgres-{site[-1]}:5432/qkms")
        env_settings = KmsSettings.load(d / "qkms.toml")
        assert env_settings.database.url.endswith(f"@postgres-{site[-1]}:5432/qkms")
        assert env_settings.kme.id == me and env_settings.database.pool_size == settings.database.pool_size
        monkeypatch.delenv("QKMS_DATABASE__URL")
    for dev in ("a", "b"):
        dns, _ = _sans(pilot_dir / "devices" / f"device-{dev}.pem")
        assert "qkd-devices" in dns
    assert sorted(p.name for p in (pilot_dir / "offline").iterdir()) == [
        "KME-A-ca.key",
        "KME-B-ca.key",
        "device-ca.key",
    ]
    assert not (pilot_dir / "devices" / "ca.key").exists()
    for sae in ("SAE-A1", "SAE-A2", "SAE-B1", "SAE-B2"):
        assert (pilot_dir / "sae" / f"{sae}.pem").is_file()
        assert stat.S_IMODE((pilot_dir / "sae" / f"{sae}.key").stat().st_mode) == 0o600


def test_provisioning_refuses_to_run_twice(pilot_dir: Path) -> None:
    proc = _provision(pilot_dir)
    assert proc.returncode == 2
    assert "already provisioned" in proc.stderr


# --------------------------------------------------------------------------- docker-compose config


def test_compose_config_is_valid_and_as_intended(pilot_dir: Path) -> None:
    proc = _compose_config(pilot_dir)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    services: dict[str, dict[str, Any]] = config["services"]
    assert set(services) == {"postgres-a", "postgres-b", *QKMS_SERVICES, "prometheus", "grafana"}

    for name in QKMS_SERVICES:
        svc = services[name]
        assert Path(svc["build"]["context"]).resolve() == REPO
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert svc["user"] == "1234:1234"
        for source, _ in _mounts(svc).values():
            if source.startswith(str(pilot_dir)):
                assert Path(source).exists(), f"{name} mounts {source}, which provisioning did not create"
    assert services["provision"]["profiles"] == ["provision"]  # one-shot, not part of `up`

    for site, published in (("a", 8443), ("b", 8444)):
        kme, db = services[f"kme-{site}"], services[f"postgres-{site}"]
        assert kme["command"] == ["serve", "--config", "/site/qkms.toml", "--host", "0.0.0.0"]
        assert _ports(kme) == {f"127.0.0.1:{published}:8443"}
        assert _depends(kme) == {f"postgres-{site}": "service_healthy", "qkd-devices": "service_healthy"}
        env = kme["environment"]
        assert env["QKMS_DATABASE__URL"] == f"postgresql+psycopg://qkms@postgres-{site}:5432/qkms"
        assert env["PGPASSWORD"] == PASSWORDS[site.upper()] == db["environment"]["POSTGRES_PASSWORD"]
        assert _mounts(kme) == {"/site": (str(pilot_dir / f"kme-{site}"), True)}
        assert (pilot_dir / f"kme-{site}" / "qkms.toml").is_file()
        # Each KME with its own database, on its own site network: never a database across sites.
        assert db["image"] == "postgres:15"
        assert set(db["networks"]) == {f"site-{site}"}
        assert set(kme["networks"]) == {f"site-{site}", "wan", "ops"}  # ops: operator port (issue 15)
        assert _ports(db) == set()
    for name, svc in services.items():
        if name not in ("qkd-devices", "provision"):
            assert not {"site-a", "site-b"} <= set(svc["networks"]), f"{name} is on both sites' networks"

    devices = services["qkd-devices"]
    assert devices["command"][:3] == ["sim", "device", "serve"]
    assert _mounts(devices) == {"/devices": (str(pilot_dir / "devices"), True)}
    assert set(devices["networks"]) == {"site-a", "site-b"}
    assert _ports(devices) == set()

    demo = services["demo-sae"]
    assert demo["command"][:2] == ["pilot", "exchange"]
    assert _depends(demo) == {"kme-a": "service_healthy", "kme-b": "service_healthy"}
    assert set(demo["networks"]) == {"wan"}
    args = demo["command"]
    for flag in ("--master-ca", "--master-cert", "--master-key", "--slave-ca", "--slave-cert", "--slave-key"):
        in_container = args[args.index(flag) + 1]
        assert in_container.startswith("/sae/")
        assert (pilot_dir / "sae" / in_container.removeprefix("/sae/")).is_file(), flag
    assert args[args.index("--master-url") + 1] == "https://kme-a:8443"
    assert args[args.index("--slave-url") + 1] == "https://kme-b:8443"

    assert _depends(services["provision"]) == {
        "postgres-a": "service_healthy",
        "postgres-b": "service_healthy",
    }
    assert set(config["volumes"]) == {"pg-a-data", "pg-b-data", "prometheus-data", "grafana-data"}


def test_compose_config_needs_the_database_passwords(pilot_dir: Path) -> None:
    proc = _compose_config(pilot_dir, QKMS_PG_PASSWORD_A=None)
    assert proc.returncode != 0
    assert "QKMS_PG_PASSWORD_A" in proc.stderr


# --------------------------------------------------------------------------- the provisioned sites, run


def _to_loopback(config: Path, port: int, peer_port: int, device_port: int) -> None:
    """What the compose network does by name, done by port on 127.0.0.1."""
    data = tomllib.loads(config.read_text())
    data["kme"]["port"] = port
    data["peers"][0]["url"] = f"https://127.0.0.1:{peer_port}"
    data["links"][0]["options"]["url"] = f"https://127.0.0.1:{device_port}"
    if data["links"][0]["options"]["role"] == "master":
        data["links"][0]["options"]["poll_interval_s"] = 0.2
    config.write_text(tomli_w.dumps(data))


@pytest.fixture
def loopback_pilot(pilot_dir: Path, tmp_path: Path) -> Iterator[tuple[Path, dict[str, int]]]:
    run = tmp_path / "pilot"
    shutil.copytree(pilot_dir, run)
    ports = {"A": free_port(), "B": free_port(), "device-A": free_port(), "device-B": free_port()}
    _to_loopback(run / "kme-a" / "qkms.toml", ports["A"], ports["B"], ports["device-A"])
    _to_loopback(run / "kme-b" / "qkms.toml", ports["B"], ports["A"], ports["device-B"])
    with ExitStack() as stack:
        stack.enter_context(
            serve_device_pair(run / "devices", {"A": ports["device-A"], "B": ports["device-B"]})
        )
        for site in ("a", "b"):
            kme = KmeProcess(run / f"kme-{site}" / "qkms.toml", ports[site.upper()]).start()
            stack.callback(kme.stop)
        yield run, ports


def test_provisioned_sites_exchange_keys(loopback_pilot: tuple[Path, dict[str, int]]) -> None:
    """The demo SAE service's command, against the provisioned files (compose names -> 127.0.0.1)."""
    run, ports = loopback_pilot
    sae = run / "sae"
    cmd = [sys.executable, "-m", "kms", "pilot", "exchange"]
    cmd += ["--master-url", f"https://127.0.0.1:{ports['A']}", "--master-ca", str(sae / "KME-A-ca.pem")]
    cmd += ["--master-cert", str(sae / "SAE-A1.pem"), "--master-key", str(sae / "SAE-A1.key")]
    cmd += ["--slave-url", f"https://127.0.0.1:{ports['B']}", "--slave-ca", str(sae / "KME-B-ca.pem")]
    cmd += ["--slave-cert", str(sae / "SAE-B1.pem"), "--slave-key", str(sae / "SAE-B1.key")]
    cmd += ["--number", "4", "--wait", "120"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=200, check=False)
    logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in run.glob("*/*.log"))
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs
    assert "both ends matched: 4/4 keys identical" in proc.stdout
    assert "answered 200 (the same keys again: a redelivery inside the window)" in proc.stdout
