"""The operator listener of a real KME (``qkms serve`` over TLS on 127.0.0.1, SQLite and PostgreSQL):
health, metrics behind a bearer token, requests counted, no key material or key IDs in metrics, and
the ETSI port serving none of it (D-11)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import database_url
from tests.operator.harness import SAES, OperatorKme, operator_kme

CHECKS = {"database", "migrations", "audit", "key_supply", "kek"}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def kme(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorKme]:
    workdir: Path = tmp_path_factory.mktemp(f"operator-{request.param}")
    with operator_kme(workdir, database_url(request.param, request)) as running:
        yield running


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def test_live_and_ready_without_credentials(kme: OperatorKme) -> None:
    with kme.operator() as client:
        live = client.get("/v1/health/live")
        ready = client.get("/v1/health/ready")
    assert live.status_code == 200 and live.json()["status"] == "live"
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["ready"] is True and body["role"] == "leader"
    assert {c["name"] for c in body["checks"]} == CHECKS
    assert all(c["ok"] for c in body["checks"])


def test_ready_codes_overridable_and_bad_codes_refused(kme: OperatorKme) -> None:
    with kme.operator() as client:
        assert client.get("/v1/health/ready", params={"readycode": "204"}).status_code == 204
        for bad in ("99", "600", "abc", "-1"):
            resp = client.get("/v1/health/ready", params={"readycode": bad})
            assert resp.status_code == 400
            assert resp.json() == {
                "message": "query parameter readycode must be an HTTP status code from 200 to 599"
            }


def test_unknown_paths_and_methods_get_error_json(kme: OperatorKme) -> None:
    with kme.operator() as client:
        missing = client.get("/v1/sys/health")
        wrong_method = client.post("/v1/health/ready")
    assert missing.status_code == 404 and missing.json() == {"message": "no such operator endpoint"}
    assert wrong_method.status_code == 405 and set(wrong_method.json()) == {"message"}


def test_metrics_need_the_bearer_token(kme: OperatorKme) -> None:
    for token in (None, "wrong-token-of-enough-length", kme.token + "x"):
        with kme.operator(token) as client:
            resp = client.get("/metrics")
        assert resp.status_code == 401
        assert resp.json() == {"message": "metrics need the operator's bearer token"}
        assert resp.headers["www-authenticate"] == "Bearer"
    with kme.operator() as client:
        basic = client.get("/metrics", headers={"Authorization": f"Basic {kme.token}"})
    assert basic.status_code == 401


def test_etsi_port_serves_no_operator_endpoint(kme: OperatorKme) -> None:
    with kme.sae(SAES[0]) as client:
        for path in ("/metrics", "/v1/health/ready", "/v1/health/live"):
            resp = client.get(path)
            # The ETSI API answers an unknown path with its 400 Error.
            assert resp.status_code == 400, path
            assert "qkms_" not in resp.text and "ready" not in resp.text


def test_requests_and_keys_counted_without_key_ids_or_material(kme: OperatorKme) -> None:
    with kme.operator(kme.token) as op:
        before = op.get("/metrics").text
    enc_before = samples(before).get(
        ("qkms_api_requests_total", (("endpoint", "enc_keys"), ("status", "200"))), 0.0
    )
    pair = (("master_sae", SAES[0]), ("policy", "qkd"), ("slave_sae", SAES[1]))
    delivered_before = samples(before).get(("qkms_pair_keys_delivered_total", pair), 0.0)
    ids, materials = [], []
    with kme.sae(SAES[0]) as master, kme.sae(SAES[1]) as slave:
        for _ in range(3):
            enc = master.post(f"/api/v1/keys/{SAES[1]}/enc_keys", json={"number": 2})
            assert enc.status_code == 200, enc.text
            keys = enc.json()["keys"]
            ids += [k["key_ID"] for k in keys]
            materials += [k["key"] for k in keys]
            dec = slave.post(
                f"/api/v1/keys/{SAES[0]}/dec_keys", json={"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}
            )
            assert dec.status_code == 200
        refused = master.post(f"/api/v1/keys/{SAES[1]}/enc_keys", json={"number": 0})
        assert refused.status_code == 400
    with kme.operator(kme.token) as op:
        after = op.get("/metrics")
    assert after.status_code == 200
    assert after.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = after.text
    assert value(text, "qkms_api_requests_total", endpoint="enc_keys", status="200") == enc_before + 3
    assert value(text, "qkms_api_requests_total", endpoint="dec_keys", status="200") >= 3
    assert value(text, "qkms_api_requests_total", endpoint="enc_keys", status="400") >= 1
    assert value(text, "qkms_api_request_duration_seconds_count", endpoint="enc_keys") >= enc_before + 4
    assert value(
        text, "qkms_pair_keys_delivered_total", master_sae=SAES[0], slave_sae=SAES[1], policy="qkd"
    ) == (delivered_before + 6)
    assert (
        value(text, "qkms_pair_keys", master_sae=SAES[0], slave_sae=SAES[1], policy="qkd", state="consumed")
        >= 6
    )
    assert value(text, "qkms_database_up") == 1
    assert value(text, "qkms_audit_head_sequence") > 0
    assert value(text, "qkms_link_secret_bytes_total", link="link-local-1") >= value(
        text, "qkms_link_pool_bytes", link="link-local-1", owner="own"
    )
    for key_id in ids:
        assert key_id not in text
    for material in materials:
        assert material not in text
        assert base64.b64decode(material).hex() not in text
