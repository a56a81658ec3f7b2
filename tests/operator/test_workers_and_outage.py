"""The operator listener of a KME with two worker processes (one serves the port; the figures are
the whole KME's and equal ``qkms status``), and of a KME whose PostgreSQL stops or hangs under it
(health, metrics and the web console answer in time and say so; ready, and sign-in works, again once
it is back)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from kms.storage.database import Database
from kms.storage.schema import links
from tests.conftest import database_url
from tests.operator.harness import SAES, OperatorKme, child_pids, operator_kme
from tests.operator.test_console import _login, add_account
from tests.operator.test_operator_listener import samples, value
from tests.support.postgres import PostgresServer, postgres_available

LINK = "link-local-1"
NAME, PASSWORD = "odile", "outage-password-1"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def two_workers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorKme]:
    workdir: Path = tmp_path_factory.mktemp(f"operator-workers-{request.param}")
    with operator_kme(workdir, database_url(request.param, request), workers=2) as running:
        yield running


def status_stored_bits(kme: OperatorKme) -> int:
    """The link's stored bits as ``qkms status`` prints them (the real CLI, a child process)."""
    out = subprocess.run(
        [sys.executable, "-m", "kms", "status", "--config", str(kme.workdir / "qkms.toml")],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "300"},
    ).stdout
    row = next(line for line in out.splitlines() if LINK in line)
    cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
    # link, peer KME, adapter, state, active blocks, keys, stored bits, ...
    return int(cells[6])


def scrape(kme: OperatorKme) -> str:
    with kme.operator(kme.token) as client:
        resp = client.get("/metrics")
    assert resp.status_code == 200, resp.text
    return resp.text


def test_one_process_serves_the_operator_port(two_workers: OperatorKme) -> None:
    deadline = time.monotonic() + 30
    while True:  # the second worker may still be starting
        log = two_workers.process.log_tail(400)
        serving = [line for line in log.splitlines() if '"event":"operator_listener"' in line]
        standby = [line for line in log.splitlines() if "operator_listener_standby" in line]
        if standby or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(serving) == 1 and len(standby) == 1, log
    text = scrape(two_workers)
    assert value(text, "qkms_api_processes") == 2
    with two_workers.operator() as client:
        ready = client.get("/v1/health/ready")
    assert ready.status_code == 200 and ready.json()["role"] in ("leader", "standby")


def test_pool_figure_is_one_and_equals_qkms_status(two_workers: OperatorKme) -> None:
    # The filler stops at max_pool_bits: wait until the pool holds still, then compare.
    deadline = time.monotonic() + 30
    previous = None
    while True:
        own = value(scrape(two_workers), "qkms_link_pool_bytes", link=LINK, owner="own")
        if own == previous:
            break
        assert time.monotonic() < deadline, "pool never settled"
        previous = own
        time.sleep(1.0)
    figures = {value(scrape(two_workers), "qkms_link_pool_bytes", link=LINK, owner="own") for _ in range(6)}
    assert figures == {own}
    assert status_stored_bits(two_workers) == own * 8  # qkms status counts bits, metrics bytes
    assert own > 0


def test_requests_of_both_workers_are_summed(two_workers: OperatorKme) -> None:
    name = "qkms_api_requests_total"
    labels = (("endpoint", "status"), ("status", "200"))
    before = samples(scrape(two_workers)).get((name, labels), 0.0)
    for _ in range(24):  # a fresh connection each: the kernel spreads them over both workers
        with two_workers.sae(SAES[0]) as client:
            resp = client.get(f"/api/v1/keys/{SAES[1]}/status")
            assert resp.status_code == 200
    # Each worker folds its counts into the shared files every FLUSH_SECONDS (the scraped one at
    # once): the other's last requests may show a moment later, never more than were made.
    deadline = time.monotonic() + 5
    while (
        after := samples(scrape(two_workers))[(name, labels)]
    ) - before < 24 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after - before == 24


def _cluster_pids(server: PostgresServer) -> list[int]:
    postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    return [postmaster] + [pid for pid, _ in child_pids(postmaster)]


@pytest.mark.postgres
def test_health_and_metrics_answer_when_postgres_stops_or_hangs(tmp_path: Path) -> None:
    ok, why = postgres_available()
    if not ok:  # its own cluster: stopping the session's would disturb other tests
        if os.environ.get("QKMS_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required (QKMS_REQUIRE_POSTGRES=1) but unavailable: {why}")
        pytest.skip(why)
    with PostgresServer() as server:
        url = server.create_database("qkms_outage")
        with (
            operator_kme(tmp_path / "kme", url, operator={"health_timeout_seconds": 1.0}) as kme,
            kme.operator(kme.token, timeout=10) as client,
            kme.operator(timeout=10) as console,
        ):
            assert client.get("/v1/health/ready").status_code == 200
            config = str(kme.workdir / "qkms.toml")
            add_account(config, NAME, "operator", PASSWORD)
            assert _login(console, NAME, PASSWORD).status_code == 303
            csrf = re.search(r'name="csrf" value="([^"]+)"', console.get(f"/console/links/{LINK}").text)
            assert csrf

            pids = _cluster_pids(server)
            for pid in pids:  # a hung database: connections accepted, nothing answered
                os.kill(pid, signal.SIGSTOP)
            try:
                _expect_database_down(client, ("no answer within 1 s",))
                _expect_console_down(console, csrf.group(1), ("did not answer within 1 s",))
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)

            server.halt("fast")  # a stopped database: connections refused
            try:
                # A probe still waiting on the hung call of before may report that one instead.
                _expect_database_down(client, ("unreachable", "no answer within 1 s"))
                _expect_console_down(console, csrf.group(1), ("unreachable", "did not answer within 1 s"))
            finally:
                server.resume()

            deadline = time.monotonic() + 30
            while client.get("/v1/health/ready").status_code != 200:
                assert time.monotonic() < deadline, "not ready again after PostgreSQL came back"
                time.sleep(0.5)
            assert value(client.get("/metrics").text, "qkms_database_up") == 1
            console.cookies.clear()
            assert _login(console, NAME, PASSWORD).status_code == 303
            assert console.get(f"/console/links/{LINK}").status_code == 200
            database = Database(url)
            try:  # the suspend tried while the database was down did nothing
                with database.read() as conn:
                    assert (
                        conn.execute(select(links.c.state).where(links.c.id == LINK)).scalar_one() == "active"
                    )
            finally:
                database.dispose()


def _expect_database_down(client: httpx.Client, why: tuple[str, ...]) -> None:
    for _ in range(3):  # the same within the time limit every time (no pile-up of stuck probes)
        started = time.monotonic()
        ready = client.get("/v1/health/ready")
        assert time.monotonic() - started < 4.0, ready.text
        assert ready.status_code == 503, ready.text
        checks = {c["name"]: c for c in ready.json()["checks"]}
        assert not checks["database"]["ok"], ready.text
        assert any(w in checks["database"]["detail"] for w in why), ready.text
        assert client.get("/v1/health/live").status_code == 200
        started = time.monotonic()
        metrics = client.get("/metrics")
        assert time.monotonic() - started < 4.0, "metrics took too long"
        assert metrics.status_code == 200
        assert value(metrics.text, "qkms_database_up") == 0
        assert ("qkms_link_pool_bytes", (("link", LINK), ("owner", "own"))) not in samples(metrics.text)


def _expect_console_down(console: httpx.Client, csrf: str, why: tuple[str, ...]) -> None:
    """Each console page answers 503 in time with a page saying the database is down: no stack
    trace, no token or key material, no cookie set."""
    sends: list[Callable[[], httpx.Response]] = [
        lambda: console.get("/console/login"),
        lambda: console.get("/console/"),
        lambda: console.post(f"/console/links/{LINK}/suspend", data={"csrf": csrf, "reason": "outage"}),
        lambda: console.post(
            "/console/login",
            data={"csrf": "t" * 32, "name": NAME, "password": PASSWORD},
            headers={"Cookie": f"qkms_login={'t' * 32}"},
        ),
    ]
    for send in sends:
        started = time.monotonic()
        page = send()
        assert time.monotonic() - started < 4.0, page.text
        assert page.status_code == 503, (page.request.url, page.status_code, page.text)
        assert page.headers["content-type"].startswith("text/html"), page.headers
        assert any(w in page.text for w in why), page.text
        assert "Traceback" not in page.text and 'File "' not in page.text, page.text
        assert re.search(r"[A-Za-z0-9+/=_-]{24,}", page.text) is None, page.text  # no token, no key
        assert PASSWORD not in page.text and "set-cookie" not in page.headers
