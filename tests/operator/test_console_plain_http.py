"""The web console is never served over plain HTTP (DECISIONS.md D-36 (1)): a real KME (``qkms
serve``, no link) whose operator listener has ``tls = false`` answers every ``/console`` path, GET
and POST, with 404 and the message saying why, sets no cookie and starts no session, while health
and metrics still answer over plain HTTP. (A TLS listener's plain-HTTP refusal is checked on the
TLS KME of ``test_console.py``.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from kms.operator.app import NO_PLAIN_CONSOLE
from kms.storage.database import Database
from kms.storage.schema import audit_records, console_sessions
from tests.operator.harness import OperatorKme, operator_kme
from tests.operator.test_console import add_account

NAME, PASSWORD = "pola", "plain-password-12"
PATHS = ("/console", "/console/", "/console/login", "/console/links/link-local-1", "/console/audit")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorKme]:
    workdir: Path = tmp_path_factory.mktemp("console-plain") / "kme"
    operator = {"tls": False, "unauthenticated_metrics": True}
    with operator_kme(workdir, operator=operator, link_source=None) as running:
        config = str(workdir / "qkms.toml")
        add_account(config, NAME, "operator", PASSWORD)
        yield running


def test_plain_http_serves_no_console_but_health_and_metrics(plain: OperatorKme) -> None:
    assert not plain.settings.operator.tls and plain.settings.operator.console
    with plain.operator() as client:
        assert str(client.base_url).startswith("http://")
        answers = [client.get(p) for p in PATHS]
        # A sign-in that would succeed were the console mounted: right password, CSRF cookie and field.
        form = {"csrf": "t" * 32, "name": NAME, "password": PASSWORD}
        login = client.post("/console/login", data=form, headers={"Cookie": f"qkms_login={'t' * 32}"})
        answers += [login, client.post("/console/links/link-local-1/suspend", data={"reason": "x"})]
        for resp in answers:
            assert resp.status_code == 404, (resp.request.url, resp.text)
            assert resp.json() == {"message": NO_PLAIN_CONSOLE}
            assert "set-cookie" not in resp.headers
        assert "TLS" in NO_PLAIN_CONSOLE
        assert client.get("/v1/health/live").status_code == 200
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and "qkms_database_up" in metrics.text
    database = Database(plain.settings.database.url)
    try:
        with database.read() as conn:
            assert conn.execute(select(func.count()).select_from(console_sessions)).scalar_one() == 0
            logins = (
                select(func.count())
                .select_from(audit_records)
                .where(audit_records.c.action == "console.login")
            )
            assert conn.execute(logins).scalar_one() == 0
    finally:
        database.dispose()
