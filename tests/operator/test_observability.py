"""What ships in docker/observability/ is checked against the real thing: the alert rules by
``promtool check rules`` and ``promtool test rules``, a real KME's /metrics by ``promtool check
metrics``, and every metric name the Grafana dashboard and the alert rules query is one that a real
KME exports. ``promtool`` (Debian's prometheus package) missing is a skip, unless
QKMS_REQUIRE_PROMTOOL=1 (scripts/test.sh), where it fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kms.lab.launcher import free_port
from tests.operator.harness import SAES, OperatorKme, operator_kme

REPO = Path(__file__).resolve().parents[2]
OBS = REPO / "docker" / "observability"
RULES = OBS / "qkms-alerts.yml"
DASHBOARD = OBS / "grafana" / "dashboards" / "qkms.json"
NAME = re.compile(r"\b(qkms_[a-z0-9_]+)\b")


def promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        why = "promtool is not installed (Debian package prometheus; scripts/test.sh installs it)"
        if os.environ.get("QKMS_REQUIRE_PROMTOOL") == "1":
            pytest.fail(f"promtool is required (QKMS_REQUIRE_PROMTOOL=1): {why}")
        pytest.skip(why)
    return exe


def run(*args: str, stdin: str | None = None, cwd: Path = OBS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, cwd=cwd, timeout=60, check=False)


@pytest.fixture(scope="module")
def kme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorKme]:
    """With audit to SIEM on: a file sink that keeps up and a syslog receiver that is down."""
    siem = {
        "file": "siem/audit.jsonl",
        "syslog": {"host": "127.0.0.1", "port": free_port(), "transport": "tcp"},
    }
    with operator_kme(tmp_path_factory.mktemp("observability"), sections={"siem": siem}) as running:
        yield running


@pytest.fixture(scope="module")
def scraped(kme: OperatorKme) -> str:
    """A scrape after keys were delivered, a checkpoint signed and the draw measured."""
    with kme.sae(SAES[0]) as master, kme.sae(SAES[1]) as slave:
        keys = master.post(f"/api/v1/keys/{SAES[1]}/enc_keys", json={"number": 2}).json()["keys"]
        body = {"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
        assert slave.post(f"/api/v1/keys/{SAES[0]}/dec_keys", json=body).status_code == 200
    deadline = time.monotonic() + 30
    with kme.operator(kme.token) as client:
        while True:
            text = client.get("/metrics").text
            if "qkms_audit_checkpoint_age_seconds " in text and "qkms_link_pool_seconds_until_empty{" in text:
                return text
            assert time.monotonic() < deadline, text
            time.sleep(1.0)


def exported_names(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    exe = promtool()
    checked = run(exe, "check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 11 rules found" in checked.stdout
    tested = run(exe, "test", "rules", "qkms-alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_alert_unit_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The rule tests are strict: a QBER threshold moved from 11 % to 20 % fails them."""
    exe = promtool()
    for name in ("qkms-alerts.yml", "qkms-alerts.test.yml"):
        shutil.copy(OBS / name, tmp_path / name)
    rules = tmp_path / "qkms-alerts.yml"
    rules.write_text(rules.read_text().replace("qkms_link_qber_ratio > 0.11", "qkms_link_qber_ratio > 0.2"))
    tested = run(exe, "test", "rules", "qkms-alerts.test.yml", cwd=tmp_path)
    assert tested.returncode != 0 and "QkmsLinkQberHigh" in tested.stdout + tested.stderr


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    exe = promtool()
    config = (OBS / "prometheus.yml").read_text()
    ca = tmp_path / "ca.pem"
    ca.write_text("")  # promtool checks the file exists, not its contents
    config = config.replace("/etc/prometheus/qkms-alerts.yml", str(RULES))
    config = re.sub(r"/etc/prometheus/ca/KME-[AB]-ca\.pem", str(ca), config)
    (tmp_path / "prometheus.yml").write_text(config)
    checked = run(exe, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_real_metrics_pass_promtool_check_metrics(scraped: str) -> None:
    checked = run(promtool(), "check", "metrics", stdin=scraped)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""


def test_siem_lag_per_sink(kme: OperatorKme, scraped: str) -> None:
    """The file sink catches up with the audit head; the syslog sink, whose receiver is down, ships
    nothing and falls behind by every record, for as long as the oldest has waited."""
    deadline = time.monotonic() + 30
    with kme.operator(kme.token) as client:
        while True:
            text = client.get("/metrics").text
            got = {
                (s.name, s.labels.get("sink")): s.value
                for f in text_string_to_metric_families(text)
                for s in f.samples
            }
            head = got[("qkms_audit_head_sequence", None)]
            if got[("qkms_siem_lag_records", "file")] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert got[("qkms_siem_lag_records", "file")] == 0 and got[("qkms_siem_lag_seconds", "file")] == 0, text
    assert got[("qkms_siem_shipped_sequence", "file")] >= head > 0
    assert got[("qkms_siem_shipped_sequence", "syslog")] == 0
    assert got[("qkms_siem_lag_records", "syslog")] >= head
    assert got[("qkms_siem_lag_seconds", "syslog")] > 0


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def test_every_dashboard_query_names_an_exported_metric(scraped: str) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    exported = exported_names(scraped)
    for expr in exprs:
        names = NAME.findall(expr)
        assert names, f"query names no qkms metric: {expr}"
        # Peer families have samples only on a KME with peers: test_peer_metrics.py checks those.
        missing = [n for n in names if n not in exported and not n.startswith("qkms_peer_")]
        assert not missing, f"{expr}: {missing} not exported by the KME"


def test_every_alert_rule_names_an_exported_metric(scraped: str) -> None:
    rules = [r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]]
    exported = exported_names(scraped)
    for rule in rules:
        names = NAME.findall(rule["expr"])
        if rule["alert"] == "QkmsDown":
            assert names == [] and "up{" in rule["expr"]
            continue
        assert names and all(n in exported for n in names), (rule["alert"], names)


def test_compose_provisions_prometheus_and_grafana() -> None:
    compose = yaml.safe_load((REPO / "docker" / "compose.two-site.yml").read_text())
    services = compose["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    for svc in (prometheus, grafana):
        assert svc["networks"] == ["ops"]
        for port in svc["ports"]:
            assert port.startswith("127.0.0.1:")
        for volume in svc["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / "docker" / source).exists(), source
    # Prometheus sees only the sites' public CA certificates of the pilot directory, never a key.
    pilot_mounts = [v for v in prometheus["volumes"] if v.startswith("${QKMS_PILOT_DIR")]
    assert pilot_mounts and all(v.rsplit(":", 2)[0].endswith("-ca.pem") for v in pilot_mounts)
    for site in ("a", "b"):
        env = services[f"kme-{site}"]["environment"]
        assert env["QKMS_OPERATOR__ENABLED"] == "true" and env["QKMS_OPERATOR__PORT"] == "9443"
        assert "ops" in services[f"kme-{site}"]["networks"]
        assert not any(str(p).endswith(":9443") for p in services[f"kme-{site}"]["ports"])  # not on the host
    targets = yaml.safe_load((OBS / "prometheus.yml").read_text())["scrape_configs"]
    assert {t["static_configs"][0]["targets"][0] for t in targets} == {"kme-a:9443", "kme-b:9443"}
