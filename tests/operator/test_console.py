"""The web console (issue 15 part 3, DECISIONS.md D-36) of a real KME (``qkms serve``, its pool
filled by the simulated QKD link, TLS with the project's certificates on 127.0.0.1), one KME for
the module. Plain HTTPS checks (httpx, the site CA verified): no session, a stale session, a
missing CSRF token and lockout are refused and audited, and an SAE certificate opens nothing. In a
real browser (Debian's chromium and chromedriver, driven by Selenium with the driver path given, no
download): an operator signs in, sees the figures ``qkms status`` and the database hold, suspends
and resumes a link; an auditor is refused. Screenshots go to the test's tmp dir (and to
``QKMS_CONSOLE_SCREENSHOT_DIR`` when set)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from sqlalchemy import distinct, func, select, update

from kms.config import KmsSettings
from kms.lab.launcher import KmeProcess, client_ssl_context, free_port
from kms.provision.workdir import init_workdir, sae_credential_paths
from kms.storage import operator_queries
from kms.storage.database import Database
from kms.storage.schema import audit_records, console_accounts, console_sessions, key_blocks, links
from tests.operator.harness import OperatorKme

M, S = "SAE-M", "SAE-S"
LINK = "link-local-1"
PASSWORDS = {"olga": "operator-password-1", "aldo": "auditor-password-1", "locky": "lockout-password-1"}
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
ENV = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}


def _qkms(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "kms", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def add_account(config: str, name: str, role: str, password: str) -> None:
    """``qkms operator add`` as an operator would run it, the password on stdin."""
    out = _qkms(
        "operator", "add", "--config", config, name, "--role", role, "--password-stdin", stdin=password + "\n"
    )
    assert f"console account {name} added ({role})" in out


@pytest.fixture(scope="module")
def kme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorKme]:
    workdir = tmp_path_factory.mktemp("console") / "kme"
    result = init_workdir(
        workdir,
        "KME-CON",
        [M, S],
        port=free_port(),
        link_source="simulated",
        pool_overrides={"max_pool_bits": 64 * 1024},
    )
    config = tomllib.loads(result.config_path.read_text())
    config["links"][0]["options"].update({"pacing": "fast", "seed": 5})
    config["operator"] = {
        "enabled": True,
        "port": free_port(),
        "unauthenticated_metrics": True,
        "db_metrics_max_age_seconds": 0,
        "max_failed_logins": 3,
    }
    result.config_path.write_text(tomli_w.dumps(config))
    settings = KmsSettings.load(result.config_path)
    proc = KmeProcess(result.config_path, settings.kme.port)
    proc.start()
    running = OperatorKme(workdir, settings, proc, "", settings.operator.port)
    try:
        running.wait_operator()
        for name, role in (("olga", "operator"), ("aldo", "auditor"), ("locky", "operator")):
            add_account(str(result.config_path), name, role, PASSWORDS[name])
        with running.sae(M) as client:
            proc.wait_for_keys(client, S, minimum=8)
            for _ in range(3):
                assert client.post(f"/api/v1/keys/{S}/enc_keys", json={"number": 2}).status_code == 200
        yield running
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def db(kme: OperatorKme) -> Iterator[Database]:
    database = Database(kme.settings.database.url)
    yield database
    database.dispose()


def _records(db: Database, action: str) -> list[Any]:
    with db.read() as conn:
        return list(
            conn.execute(
                select(audit_records).where(audit_records.c.action == action).order_by(audit_records.c.seq)
            )
        )


def _login(client: httpx.Client, name: str, password: str) -> httpx.Response:
    form = client.get("/console/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert token, form.text
    return client.post("/console/login", data={"csrf": token.group(1), "name": name, "password": password})


def test_console_needs_a_session_and_an_sae_certificate_opens_nothing(kme: OperatorKme) -> None:
    with kme.operator() as client:
        resp = client.get("/console/")
        assert resp.status_code == 303 and resp.headers["location"] == "/console/login"
        assert client.post(f"/console/links/{LINK}/suspend", data={"reason": "x"}).status_code == 401
        assert client.get("/v1/health/live").status_code == 200  # health as before, no credentials
    cert, key = sae_credential_paths(kme.workdir, M)
    with httpx.Client(
        base_url=f"https://127.0.0.1:{kme.operator_port}", verify=client_ssl_context(kme.ca, cert, key)
    ) as sae:
        assert sae.get("/console/").status_code == 303
        assert sae.get("/console/audit").headers["location"] == "/console/login"


def test_plain_http_to_the_tls_listener_gets_no_answer(kme: OperatorKme) -> None:
    """Plain HTTP to the TLS operator port fails the TLS handshake: the connection is closed without
    a byte of HTTP (no page, no cookie); the listener goes on serving TLS."""
    for request in (b"GET /console/ HTTP/1.1\r\n", b"POST /console/login HTTP/1.1\r\nContent-Length: 0\r\n"):
        with socket.create_connection(("127.0.0.1", kme.operator_port), timeout=5) as sock:
            sock.sendall(request + b"Host: 127.0.0.1\r\n\r\n")
            try:
                answer = sock.recv(4096)
            except ConnectionResetError:
                answer = b""
        assert answer == b"", answer
    plain = httpx.Client(base_url=f"http://127.0.0.1:{kme.operator_port}", timeout=5)
    with plain, pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
        plain.get("/console/login")
    with kme.operator() as client:
        assert client.get("/console/login").status_code == 200


def test_missing_csrf_and_stale_sessions_are_refused_and_audited(kme: OperatorKme, db: Database) -> None:
    refused_before = len(_records(db, "console.refused"))
    with kme.operator() as client:
        no_token = client.post("/console/login", data={"name": "olga", "password": PASSWORDS["olga"]})
        assert no_token.status_code == 403 and "CSRF token is missing or wrong" in no_token.text
        assert _login(client, "olga", PASSWORDS["olga"]).status_code == 303
        assert "Overview" in client.get("/console/").text
        forged = client.post(f"/console/links/{LINK}/suspend", data={"reason": "no token"})
        assert forged.status_code == 403 and "CSRF token is missing or wrong" in forged.text
        with db.write() as conn:  # the session's end passes
            conn.execute(update(console_sessions).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
        stale = client.get("/console/")
        assert stale.status_code == 401 and "your session has expired or ended" in stale.text
        assert client.get("/console/").status_code == 303  # the cookie is gone, the row too
        assert _login(client, "olga", PASSWORDS["olga"]).status_code == 303
        with db.write() as conn:  # unused for longer than session_idle_minutes (30)
            conn.execute(
                update(console_sessions).values(last_seen_at=datetime.now(UTC) - timedelta(minutes=31))
            )
        assert client.get("/console/").status_code == 401
        assert _login(client, "olga", PASSWORDS["olga"]).status_code == 303
        token = client.cookies["qkms_session"]
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/console/").text)
        assert csrf and client.post("/console/logout", data={"csrf": csrf.group(1)}).status_code == 303
        reused = client.get("/console/keys", headers={"Cookie": f"qkms_session={token}"})
        assert reused.status_code == 401 and "sign in again" in reused.text
    with db.read() as conn:
        assert conn.execute(select(console_sessions)).first() is None
        assert conn.execute(select(links.c.state).where(links.c.id == LINK)).scalar_one() == "active"
    refusals = [r.data for r in _records(db, "console.refused")[refused_before:]]
    assert len(refusals) == 5 and "CSRF" in refusals[0] and "CSRF" in refusals[1]
    assert '"session expired"' in refusals[2] and '"session expired"' in refusals[3]
    assert '"no such session"' in refusals[4]
    assert [r.actor for r in _records(db, "console.logout")][-1:] == ["console:olga"]


def test_wrong_passwords_lock_the_account(kme: OperatorKme, db: Database) -> None:
    failures_before = len(_records(db, "console.login"))
    with kme.operator() as client:
        answers = [_login(client, "locky", "wrong-password-123") for _ in range(3)]
        assert [a.status_code for a in answers] == [401, 401, 401]
        assert "wrong name or password" in answers[0].text and "now locked" in answers[2].text
        locked = _login(client, "locky", PASSWORDS["locky"])
        assert locked.status_code == 401 and "locked after repeated failed logins" in locked.text
        unknown = _login(client, "nobody", "whatever-password")
        assert unknown.status_code == 401 and "wrong name or password" in unknown.text
    with db.read() as conn:
        row = conn.execute(select(console_accounts).where(console_accounts.c.name == "locky")).one()
    assert row.locked_until is not None
    logins = _records(db, "console.login")[failures_before:]
    assert [(r.subject, '"refused"' in r.data) for r in logins] == [("locky", True)] * 4 + [("nobody", True)]
    assert '"locked":true' in logins[2].data and '"reason":"locked"' in logins[3].data
    assert PASSWORDS["locky"] not in "".join(r.data for r in logins)
    listed = _qkms("operator", "list", "--config", str(kme.workdir / "qkms.toml"))
    assert re.search(r"locky\s+│\s+operator", listed) and "scrypt" not in listed
    _qkms("operator", "remove", "--config", str(kme.workdir / "qkms.toml"), "locky")
    assert "locky" not in _qkms("operator", "list", "--config", str(kme.workdir / "qkms.toml"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, kme: OperatorKme) -> Iterator[Any]:
    """Headless Debian chromium through its own chromedriver; Selenium Manager stays offline. The
    browser trusts exactly the KME's server key (its SPKI pinned), nothing else."""
    if not (shutil.which(CHROMEDRIVER) and shutil.which(CHROMIUM)):
        if os.environ.get("QKMS_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium and chromium-driver are required (QKMS_REQUIRE_CHROMIUM=1)")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    pytest.importorskip("selenium")
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"
    cert = x509.load_pem_x509_certificate(kme.settings.tls.server_cert.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1360,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        f"--ignore-certificate-errors-spki-list={base64.b64encode(hashlib.sha256(spki).digest()).decode()}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"console-{name}.png"
    assert driver.save_screenshot(str(path))
    if target := os.environ.get("QKMS_CONSOLE_SCREENSHOT_DIR"):
        shutil.copy(path, Path(target) / f"console-{name}.png")


def _sign_in(driver: Any, kme: OperatorKme, name: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"https://127.0.0.1:{kme.operator_port}/console/")
    assert driver.current_url.endswith("/console/login")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(PASSWORDS[name])
    driver.find_element(By.ID, "sign-in").click()
    assert driver.find_element(By.ID, "who").text.startswith(name)


def _status_rows(kme: OperatorKme) -> list[list[str]]:
    out = _qkms("status", "--config", str(kme.workdir / "qkms.toml"))
    return [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.count("│") >= 2]


def _cell(driver: Any, row_id: str, cls: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, f"#{row_id} td.{cls}").get_attribute("data-value"))


def test_operator_sees_what_status_says_and_suspends_and_resumes(
    kme: OperatorKme, db: Database, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    _sign_in(browser, kme, "olga")
    for _ in range(20):  # the pool fills to its limit, then holds still
        before = _status_rows(kme)
        browser.refresh()
        page_link = [_cell(browser, f"link-{LINK}", c) for c in ("state", "keys", "stored", "mirror")]
        page_keys = {
            r.find_element(By.CSS_SELECTOR, "td").text: r.find_element(
                By.CSS_SELECTOR, "td.count"
            ).get_attribute("data-value")
            for r in browser.find_elements(By.CSS_SELECTOR, "#keys-by-state tbody tr")
        }
        link_row = next(r for r in before if r[0] == LINK and len(r) == 9)
        if page_link == [link_row[3], link_row[5], link_row[6], link_row[7]]:
            break
    # status: link, peer, adapter, state, active blocks, keys, stored bits, mirror, unconfirmed
    assert page_link == [link_row[3], link_row[5], link_row[6], link_row[7]]
    assert page_keys == {r[0]: r[1] for r in before if len(r) == 2 and r[1].isdigit()}
    with db.read() as conn:
        qber = operator_queries.newest_block_qber(conn, LINK)
    assert qber is not None and float(_cell(browser, f"link-{LINK}", "qber")) == pytest.approx(qber)
    assert len(browser.find_elements(By.CSS_SELECTOR, f"#link-{LINK} svg.spark :is(polyline, circle)")) >= 2
    _shot(browser, tmp_path, "overview")

    browser.find_element(By.LINK_TEXT, LINK).click()
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Link {LINK}"
    with db.read() as conn:  # blocks of the last hour, each stored as one or more pieces
        blocks = conn.execute(
            select(func.count(distinct(key_blocks.c.source_block_id))).where(key_blocks.c.link_id == LINK)
        ).scalar_one()
    assert blocks > 0 and browser.find_element(By.ID, "block-totals").text.split()[2] == str(blocks)
    _shot(browser, tmp_path, "link")
    for verb, state in (("suspend", "suspended"), ("resume", "active")):
        browser.find_element(By.ID, "reason").send_keys(f"browser test {verb}")
        browser.find_element(By.ID, f"{verb}-link").click()
        assert browser.find_element(By.ID, "notice").text.startswith(
            f"The link was {state if verb == 'suspend' else 'resumed'}"
        )
        assert browser.find_element(By.CSS_SELECTOR, "#link-facts td.state").text == state
        assert next(r for r in _status_rows(kme) if r[0] == LINK and len(r) == 9)[3] == state
    actions = [r for r in _records(db, "console.action") if r.actor == "console:olga"]
    assert [('"link.suspend"' in r.data, '"link.resume"' in r.data) for r in actions[-2:]] == [
        (True, False),
        (False, True),
    ]
    assert "console olga: browser test suspend" in _records(db, "link.suspended")[-1].data


def test_topology_audit_and_an_auditor_refused(
    kme: OperatorKme, db: Database, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    from kms.storage.link_state_repository import StoredRecord, store_newer
    from kms.storage.schema import keys

    record = (
        '{"origin": "KME-FAR", "seq": 1, "issued_at": 1.0, "links": [["KME-CON", "link-far", "down", 0]]}'
    )
    with db.write() as conn:
        store_newer(conn, [StoredRecord("KME-FAR", 1, 1.0, record)], datetime.now(UTC))
        key_id = conn.execute(select(keys.c.key_id).limit(1)).scalar_one()
    browser.find_element(By.LINK_TEXT, "topology").click()
    far = browser.find_element(By.CSS_SELECTOR, '#topology line[data-link="link-far"]')
    assert far.get_attribute("data-state") == "down"
    assert (
        browser.find_element(By.CSS_SELECTOR, f'#topology line[data-link="{LINK}"]').get_attribute(
            "data-state"
        )
        == "active"
    )
    browser.find_element(By.LINK_TEXT, "audit").click()
    assert browser.find_element(By.ID, "chain-status").text == "verified"
    browser.find_element(By.ID, "key-id").send_keys(key_id)
    browser.find_element(By.ID, "lookup").click()
    assert key_id in browser.find_element(By.ID, "provenance").text
    _shot(browser, tmp_path, "audit")
    browser.find_element(By.ID, "logout").click()

    _sign_in(browser, kme, "aldo")
    browser.get(f"https://127.0.0.1:{kme.operator_port}/console/links/{LINK}")
    browser.find_element(By.ID, "suspend-link").click()
    assert "aldo is an auditor: auditors read only" in browser.find_element(By.ID, "notice").text
    assert next(r for r in _status_rows(kme) if r[0] == LINK and len(r) == 9)[3] == "active"
    refused = _records(db, "console.refused")[-1]
    assert refused.actor == "console:aldo" and '"link.suspend"' in refused.data
    browser.find_element(By.ID, "logout").click()
