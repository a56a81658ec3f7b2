"""A lost answer over the real server (issue 13, finding 7): the slave's retry gets the same keys.

A real ``qkms serve`` on 127.0.0.1 over mTLS, on SQLite and on PostgreSQL, with a short redelivery
window. The slave sends Get key with key IDs on a raw TLS connection and closes it without reading
a byte: the KME consumes the keys and the answer is lost. Its retry inside the window gets identical
bytes (compared by SHA-256, never printed), recorded in the audit as ``keys.redelivered``; another
SAE gets 401; after the window the sweep zeroises the material and a retry gets 400.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from kms.provision.workdir import sae_credential_paths
from kms.storage import pool_repository as pool
from kms.storage.schema import audit_records, keys
from tests.conftest import database_url
from tests.kme_harness import RunningKme, running_kme

M, S, T = "SAE-M", "SAE-S", "SAE-T"
WINDOW = 4.0
POOL = {"redelivery_seconds": WINDOW, "expiry_sweep_seconds": 0.2}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def rkme(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKme]:
    workdir = tmp_path_factory.mktemp(f"redelivery-{request.param}")
    url = database_url(request.param, request)
    with running_kme(workdir, url, saes=(M, S, T), pool=POOL, fill_keys=64) as running:
        yield running


def _query(kme: RunningKme, stmt: Any) -> list[Any]:
    engine = create_engine(kme.settings.database.url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(stmt))
    finally:
        engine.dispose()


def _rows(kme: RunningKme, ids: list[str]) -> dict[str, dict[str, Any]]:
    engine = create_engine(kme.settings.database.url)
    try:
        with engine.connect() as conn:
            return pool.key_records(conn, ids)
    finally:
        engine.dispose()


def _digests(answer: dict[str, Any]) -> dict[str, str]:
    return {k["key_ID"]: hashlib.sha256(base64.b64decode(k["key"])).hexdigest() for k in answer["keys"]}


def _send_and_vanish(kme: RunningKme, sae: str, master: str, ids: list[str]) -> None:
    """POST dec_keys on a fresh TLS connection and close it without reading the answer."""
    cert, key = sae_credential_paths(kme.workdir, sae)
    ctx = ssl.create_default_context(cafile=str(kme.ca))
    ctx.load_cert_chain(str(cert), str(key))
    body = json.dumps({"key_IDs": [{"key_ID": i} for i in ids]}).encode()
    head = (
        f"POST /api/v1/keys/{master}/dec_keys HTTP/1.1\r\nHost: 127.0.0.1:{kme.settings.kme.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    raw = socket.create_connection(("127.0.0.1", kme.settings.kme.port), timeout=10)
    with raw, ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(head + body)


def _wait(kme: RunningKme, ids: list[str], done: Any, seconds: float = 20.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + seconds
    rows = _rows(kme, ids)
    while not done(rows) and time.monotonic() < deadline:
        time.sleep(0.1)
        rows = _rows(kme, ids)
    return rows


def _issue(kme: RunningKme, number: int) -> tuple[list[str], dict[str, str]]:
    resp = kme.client(M).post(f"/api/v1/keys/{S}/enc_keys", json={"number": number})
    assert resp.status_code == 200
    answer = resp.json()
    return [k["key_ID"] for k in answer["keys"]], _digests(answer)


def _consumed(rows: dict[str, dict[str, Any]]) -> bool:
    return all(r["state"] == "consumed" for r in rows.values())


def test_a_lost_answer_is_redelivered_then_zeroised_after_the_window(rkme: RunningKme) -> None:
    ids, issued = _issue(rkme, 4)
    _send_and_vanish(rkme, S, M, ids)
    rows = _wait(rkme, ids, _consumed)
    assert _consumed(rows) and all(r["material"] is not None for r in rows.values())  # held, sealed

    retry = rkme.client(S).post(f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": [{"key_ID": i} for i in ids]})
    assert retry.status_code == 200
    assert _digests(retry.json()) == issued
    redelivered = [
        (r.actor, r.subject, json.loads(r.data))
        for r in _query(rkme, select(audit_records).where(audit_records.c.action == "keys.redelivered"))
    ]
    assert (f"sae:{S}", f"{M}->{S}", {"key_IDs": ids}) in redelivered

    other = rkme.client(T).post(f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": [{"key_ID": ids[0]}]})
    assert other.status_code == 401 and set(other.json()) >= {"message"}

    rows = _wait(rkme, ids, lambda rs: all(r["material"] is None for r in rs.values()), WINDOW + 20)
    assert all(r["material"] is None and r["state"] == "consumed" for r in rows.values())
    late = rkme.client(S).post(f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": [{"key_ID": i} for i in ids]})
    assert late.status_code == 400
    assert late.json()["details"] == [{"key_ID": i, "reason": "key is consumed"} for i in ids]


def test_only_the_served_slave_refetches_and_every_window_ends(rkme: RunningKme) -> None:
    ids, issued = _issue(rkme, 2)
    ok = rkme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": ids[0]})
    assert ok.status_code == 200 and _digests(ok.json()) == {ids[0]: issued[ids[0]]}
    again = rkme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": ids[0]})
    assert again.status_code == 200 and _digests(again.json()) == {ids[0]: issued[ids[0]]}
    assert rkme.client(T).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": ids[0]}).status_code == 401
    # The other key of the request is no retry: it is served (and consumed) as usual.
    rest = rkme.client(S).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": ids[1]})
    assert rest.status_code == 200 and _digests(rest.json()) == {ids[1]: issued[ids[1]]}
    # Once every window has passed and the sweep ran, no consumed key holds material.
    _wait(rkme, ids[:1], lambda rs: all(r["material"] is None for r in rs.values()), WINDOW + 20)
    engine = create_engine(rkme.settings.database.url)
    try:
        with engine.connect() as conn:
            assert pool.consumed_material_overdue(conn, datetime.now(UTC) - timedelta(seconds=1)) == []
            held = conn.execute(
                select(keys.c.key_id).where(keys.c.state == "consumed", keys.c.material.is_not(None))
            ).all()
    finally:
        engine.dispose()
    assert ids[0] not in {r[0] for r in held}
