"""HTTP hardening over a real server and real TLS, with raw sockets where httpx cannot send the input:
header floods, malformed requests, redirects, slow clients, and refused authentications recorded.

Every hostile request must get an ETSI Error body (JSON, 400 or 401) or a clean close: never
``text/plain``, never a redirect, never a 5xx.
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w

from kms.api.denials import Denial, DenialAggregator
from kms.config import KmsSettings
from kms.crypto import pki
from kms.lab.launcher import KmeProcess, client_ssl_context, free_port
from kms.provision.workdir import auditor_credential_paths, init_workdir, sae_credential_paths
from tests.conftest import database_url

M, S, AUDITOR = "SAE-M", "SAE-S", "AUDITOR-1"
# Short deadlines so the slow-client tests stay short; the limits are the shipped defaults.
SERVER = {
    "idle_timeout_seconds": 2.0,
    "header_timeout_seconds": 1.5,
    "body_timeout_seconds": 1.5,
    "denial_window_seconds": 60.0,
}
MAX_HEAD = 32 * 1024  # the default server.max_head_bytes


@dataclass
class Kme:
    workdir: Path
    process: KmeProcess

    @property
    def ca(self) -> Path:
        return self.workdir / "pki" / "ca.pem"

    def ctx(self, cert: Path, key: Path) -> ssl.SSLContext:
        return client_ssl_context(self.ca, cert, key)

    def sae_ctx(self, sae_id: str = M) -> ssl.SSLContext:
        return self.ctx(*sae_credential_paths(self.workdir, sae_id))

    def client(self, cert: Path, key: Path) -> httpx.Client:
        return self.process.client(self.ca, cert, key)

    def audit_records(self) -> list[dict[str, Any]]:
        with self.client(*auditor_credential_paths(self.workdir, AUDITOR)) as auditor:
            resp = auditor.get("/api/v1/audit/events", params={"limit": 1000})
        assert resp.status_code == 200, resp.text
        records: list[dict[str, Any]] = resp.json()["records"]
        return records

    def log(self) -> str:
        assert self.process.log_path is not None
        return self.process.log_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        assert self.process.proc is not None
        for line in Path(f"/proc/{self.process.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def start_kme(workdir: Path, db_url: str | None = None) -> Kme:
    """A KME with no link (these tests need no keys), an auditor, and the test deadlines."""
    result = init_workdir(
        workdir,
        "KME-H",
        [M, S],
        port=free_port(),
        database_url=db_url,
        link_source=None,
        auditor_ids=[AUDITOR],
    )
    config = tomllib.loads(result.config_path.read_text())
    config["server"] = SERVER
    result.config_path.write_text(tomli_w.dumps(config))
    settings = KmsSettings.load(result.config_path)
    return Kme(workdir, KmeProcess(result.config_path, settings.kme.port).start())


@pytest.fixture(scope="module")
def kme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kme]:
    running = start_kme(tmp_path_factory.mktemp("hardening") / "kme")
    try:
        yield running
    finally:
        running.process.stop()


# -- raw TLS ---------------------------------------------------------------------------------------
def connect(kme: Kme, ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", kme.process.port), timeout=10)
    return (ctx or kme.sae_ctx()).wrap_socket(raw, server_hostname="127.0.0.1")


@dataclass
class Answer:
    raw: bytes
    closed: bool  # the server closed the connection

    @property
    def status(self) -> int:
        return int(self.raw.split(b" ", 2)[1])

    @property
    def headers(self) -> dict[str, str]:
        head = self.raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}

    @property
    def body(self) -> bytes:
        return self.raw.split(b"\r\n\r\n", 1)[1]


def read_answer(sock: ssl.SSLSocket, within: float) -> Answer:
    """Everything the server sends until it closes the connection (or ``within`` seconds pass)."""
    deadline = time.monotonic() + within
    data = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except (ssl.SSLError, ConnectionError):
            return Answer(data, True)
        if not chunk:
            return Answer(data, True)
        data += chunk
    return Answer(data, False)


def poll_answer(sock: ssl.SSLSocket, wait: float) -> Answer | None:
    """The server's answer if it has started one within ``wait`` seconds, else None. (A socket can
    be readable with no application data: TLS 1.3 session tickets.)"""
    if not select.select([sock], [], [], wait)[0]:
        return None
    sock.settimeout(0.0)
    try:
        first = sock.recv(65536)
    except ssl.SSLWantReadError:
        return None
    except (ssl.SSLError, ConnectionError):
        return Answer(b"", True)
    if not first:
        return Answer(b"", True)
    rest = read_answer(sock, 5.0)
    return Answer(first + rest.raw, rest.closed)


def exchange(kme: Kme, request: bytes, within: float = 5.0) -> Answer:
    with connect(kme) as sock:
        sock.sendall(request)
        return read_answer(sock, within)


def assert_error_body(answer: Answer, statuses: tuple[int, ...] = (400,)) -> dict[str, Any]:
    """An ETSI Error answer: JSON ``{"message", "details"?}``, no redirect, no stack trace."""
    assert answer.raw, "no answer at all"
    assert answer.status in statuses, answer.raw[:300]
    assert answer.headers.get("content-type", "").startswith("application/json"), answer.raw[:300]
    assert "location" not in answer.headers
    body = json.loads(answer.body)
    assert isinstance(body["message"], str) and body["message"]
    assert set(body) <= {"message", "details"}
    assert b"Traceback" not in answer.raw
    return body  # type: ignore[no-any-return]


def get(path: bytes, *extra: bytes) -> bytes:
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: 127.0.0.1", *extra, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


# -- finding 3: header floods ----------------------------------------------------------------------
def test_header_flood_is_cut_with_an_error_and_does_not_grow_the_server(kme: Kme) -> None:
    """16 MiB of header lines that never end: the server answers 400 and closes after the head limit,
    long before it has read them all, and its memory barely moves (it grew by what was sent)."""
    exchange(kme, get(b"/api/v1/keys/SAE-S/status"))  # warm up the connection path
    before = kme.rss_kib()
    line = b"X-Flood: " + b"a" * 1000 + b"\r\n"
    chunk = line * 64  # about 64 KiB
    sent, total = 0, 16 * 1024 * 1024
    with connect(kme) as sock:
        sock.sendall(b"GET /api/v1/keys/SAE-S/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        answer = Answer(b"", False)
        while sent < total:
            try:
                sock.sendall(chunk)
            except (ssl.SSLError, ConnectionError):
                answer = read_answer(sock, 2.0)
                break
            sent += len(chunk)
            polled = poll_answer(sock, 0.02)
            if polled is not None:
                answer = polled
                break
    grown = kme.rss_kib() - before
    assert sent < total // 4, f"the server read {sent} bytes of headers"
    if answer.raw:  # the answer can be lost to the reset that the unread flood provokes
        assert "exceed" in str(assert_error_body(answer)["message"])
    assert answer.closed
    assert grown < 4 * 1024, f"server RSS grew by {grown} KiB"
    assert exchange(kme, get(b"/api/v1/keys/SAE-S/status")).status == 200  # still serving


# -- finding 4: malformed and hostile requests -----------------------------------------------------
POST_HEAD = (
    b"POST /api/v1/keys/SAE-S/enc_keys HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
)
HOSTILE: dict[str, bytes] = {
    "trailing-slash-evil-host": get(b"/api/v1/keys/SAE-S/status/", b"X-Forwarded-Proto: http").replace(
        b"Host: 127.0.0.1", b"Host: evil.example"
    ),
    "trailing-slash-enc-keys": get(b"/api/v1/keys/SAE-S/enc_keys/"),
    "raw-non-ascii-path": get(b"/api/v1/keys/SAE-\xc3\xa9/status"),
    "space-in-path": get(b"/api/v1/keys/SAE S/status"),
    "method-FOO": get(b"/api/v1/keys/SAE-S/status").replace(b"GET", b"FOO", 1),
    "cl-and-te": POST_HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate-content-length": POST_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "url-800-kb": get(b"/api/v1/keys/SAE-S/enc_keys?number=1&x=" + b"a" * 800_000),
    "url-over-limit": get(b"/api/v1/keys/SAE-S/enc_keys?x=" + b"a" * 17_000),
    "header-line-over-limit": get(b"/api/v1/keys/SAE-S/status", b"X-Big: " + b"b" * 9000),
    "too-many-headers": get(b"/api/v1/keys/SAE-S/status", *(b"X-H%d: 1" % i for i in range(100))),
    "space-in-header-name": get(b"/api/v1/keys/SAE-S/status", b"Bad Name: x"),
    "nul-in-header-value": get(b"/api/v1/keys/SAE-S/status", b"X-Nul: a\x00b"),
    "obs-fold": get(b"/api/v1/keys/SAE-S/status", b"X-Fold: a", b" folded"),
    "bad-chunk-size": POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "negative-content-length": POST_HEAD + b"Content-Length: -1\r\n\r\n",
    "huge-content-length": POST_HEAD + b"Content-Length: 99999999999999999999999\r\n\r\n",
    "http-0.9": b"GET /api/v1/keys/SAE-S/status\r\n\r\n",
    "http-2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "bad-version": b"GET /api/v1/keys/SAE-S/status HTTP/7.3\r\nHost: x\r\n\r\n",
    "percent-non-utf8": get(b"/api/v1/keys/%ff%fe/status"),
    "dot-segments": get(b"/api/v1/keys/../audit/events"),
    "unknown-path": get(b"/admin"),
    "delete-method": get(b"/api/v1/keys/SAE-S/status").replace(b"GET", b"DELETE", 1),
    "options-star": b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "absolute-form-other-host": get(b"https://evil.example/api/v1/keys/SAE-S/status/"),
}


FINDING_4 = {  # each of these was answered text/plain 400 or 307 before the fix
    "trailing-slash-evil-host",
    "raw-non-ascii-path",
    "space-in-path",
    "method-FOO",
    "cl-and-te",
    "duplicate-content-length",
    "url-800-kb",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_request_gets_an_error_body_or_a_clean_close(kme: Kme, name: str) -> None:
    answer = exchange(kme, HOSTILE[name])
    assert answer.closed, "the server left the connection open"
    if answer.raw or name in FINDING_4:
        assert_error_body(answer, (400, 401))


def test_trailing_slash_is_an_error_not_a_redirect(kme: Kme) -> None:
    cert, key = sae_credential_paths(kme.workdir, M)
    with kme.client(cert, key) as sae:
        for path in (
            "/api/v1/keys/SAE-S/status/",
            "/api/v1/keys/SAE-S/enc_keys/",
            "/api/v1/keys/SAE-M/dec_keys/",
        ):
            resp = sae.get(path, headers={"Host": "evil.example", "X-Forwarded-Proto": "http"})
            assert resp.status_code == 400 and "location" not in resp.headers, (path, resp.headers)
            assert resp.json()["message"] == "no such endpoint in ETSI GS QKD 014"
        assert sae.get("/api/v1/keys/SAE-S/status").status_code == 200


# -- slow clients ------------------------------------------------------------------------------------
def _cut_while_trickling(
    sock: ssl.SSLSocket, prefix: bytes, drip: bytes, bound: float
) -> tuple[Answer, float]:
    """Send ``prefix``, then one byte of ``drip`` every 0.2 s; return what the server answered and
    when, or fail after ``bound`` seconds of trickling without being cut."""
    start = time.monotonic()
    sock.sendall(prefix)
    for i in range(int(bound / 0.2)):
        answer = poll_answer(sock, 0.2)
        if answer is not None:
            return answer, time.monotonic() - start
        try:
            sock.sendall(drip[i % len(drip) : i % len(drip) + 1])
        except (ssl.SSLError, ConnectionError):
            return read_answer(sock, 2.0), time.monotonic() - start
    raise AssertionError(f"a client trickling for {bound} s was not cut")


def test_client_trickling_headers_is_cut(kme: Kme) -> None:
    with connect(kme) as sock:
        answer, after = _cut_while_trickling(
            sock, b"GET /api/v1/keys/SAE-S/status HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"abcdef", bound=8.0
        )
    assert "headers not complete" in str(assert_error_body(answer)["message"])
    assert answer.closed and after >= SERVER["header_timeout_seconds"] * 0.9


def test_client_trickling_a_body_is_cut(kme: Kme) -> None:
    body = b'{"number": 1, "size": 256}' + b" " * 200
    with connect(kme) as sock:
        answer, _ = _cut_while_trickling(
            sock, POST_HEAD + b"Content-Length: %d\r\n\r\n" % len(body), body, bound=8.0
        )
    assert "body not complete" in str(assert_error_body(answer)["message"])
    assert answer.closed


def test_connection_that_sends_nothing_is_closed(kme: Kme) -> None:
    with connect(kme) as sock:
        answer = read_answer(sock, 8.0)
    assert answer.closed and answer.raw == b""


def test_kept_alive_connection_dripping_blank_lines_is_cut(kme: Kme) -> None:
    """After one answered request, CRLFs every 0.2 s (which start no request) do not hold the
    connection open past the header deadline."""
    with connect(kme) as sock:
        sock.sendall(b"GET /api/v1/keys/SAE-S/status HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 5
        first = b""
        while b"}" not in first and time.monotonic() < deadline:
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        answer, _ = _cut_while_trickling(sock, b"", b"\r\n", bound=8.0)
    assert answer.closed


def test_ordinary_requests_still_work_on_one_kept_alive_connection(kme: Kme) -> None:
    cert, key = sae_credential_paths(kme.workdir, M)
    with kme.client(cert, key) as sae:
        for _ in range(5):
            assert sae.get("/api/v1/keys/SAE-S/status").status_code == 200
            time.sleep(0.3)
        long_ok = sae.get("/api/v1/keys/SAE-S/status", headers={"X-Long": "v" * 7000})
        assert long_ok.status_code == 200
        # The default URL limit leaves room for a GET naming max_key_per_request (128) key_IDs:
        # refused for what the keys are (not found), not for the URL's length.
        ids = [str(uuid.uuid4()) for _ in range(128)]
        many = sae.get("/api/v1/keys/SAE-S/dec_keys", params={"key_ID": ids})
        assert many.status_code == 400 and "not found" in many.json()["message"]


# -- finding 5: refused authentications are logged and audited -------------------------------------
def _unpinned(kme: Kme, name: str, role: str = "sae") -> tuple[Path, Path, str]:
    """A certificate from the site's own CA with a configured SAE's CN, but not the pinned one."""
    ca = pki.load_credential(kme.workdir / "pki" / "ca.pem", kme.workdir / "pki" / "ca.key")
    cred = pki.issue_client_cert(ca, M, role=role)
    cert, key = kme.workdir / f"{name}.pem", kme.workdir / f"{name}.key"
    pki.write_credential(cred, cert, key)
    return cert, key, cred.fingerprint_sha256


def _denials(kme: Kme, fingerprint: str) -> list[dict[str, Any]]:
    return [
        r
        for r in kme.audit_records()
        if r["action"] == "access.denied" and r["data"].get("fingerprint") == fingerprint
    ]


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def dkme(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kme]:
    running = start_kme(
        tmp_path_factory.mktemp(f"denials-{request.param}") / "kme", database_url(request.param, request)
    )
    try:
        yield running
    finally:
        running.process.stop()


def test_unpinned_certificate_with_a_configured_cn_is_audited_and_logged(dkme: Kme) -> None:
    cert, key, fingerprint = _unpinned(dkme, "unpinned")
    with dkme.client(cert, key) as impostor:
        resp = impostor.get("/api/v1/keys/SAE-S/status")
    assert resp.status_code == 401
    (record,) = _denials(dkme, fingerprint)
    assert record["data"]["common_name"] == M and record["data"]["path"] == "/api/v1/keys/SAE-S/status"
    assert record["data"]["reason"] == resp.json()["message"]
    assert "access_denied" in dkme.log() and fingerprint in dkme.log()


def test_kme_client_certificate_on_the_key_api_is_audited_and_logged(dkme: Kme) -> None:
    cert, key = dkme.workdir / "pki" / "kme-client.pem", dkme.workdir / "pki" / "kme-client.key"
    fingerprint = pki.fingerprint_sha256(cert.read_bytes())
    with dkme.client(cert, key) as kme_client:
        resp = kme_client.post("/api/v1/keys/SAE-S/enc_keys", json={"number": 1})
    assert resp.status_code == 401
    (record,) = _denials(dkme, fingerprint)
    assert record["data"]["role"] == "kme" and record["data"]["method"] == "POST"
    assert fingerprint in dkme.log()


def test_a_flood_of_denials_is_aggregated_and_counted_at_stop(dkme: Kme) -> None:
    """30 refusals of one certificate within the window: one record at once; the 29 repeats are
    recorded as a summary when the server stops (and not one record each)."""
    cert, key, fingerprint = _unpinned(dkme, "flood")
    with dkme.client(cert, key) as impostor:
        statuses = {impostor.get("/api/v1/keys/SAE-S/status").status_code for _ in range(30)}
    assert statuses == {401}
    (first,) = _denials(dkme, fingerprint)
    assert first["data"]["repeats"] == 0
    dkme.process.stop()
    dkme.process.start()
    records = _denials(dkme, fingerprint)
    assert len(records) == 2 and records[1]["data"]["summary"] is True
    assert 1 + records[1]["data"]["repeats"] == 30


# -- the aggregation rule, with a clock of our own ---------------------------------------------------
def _d(fingerprint: str, reason: str = "unpinned") -> Denial:
    return Denial(fingerprint, "CN", "sae", reason, "GET", "/api/v1/keys/SAE-S/status")


def test_aggregator_records_once_per_certificate_and_reason_per_window() -> None:
    now = [0.0]
    agg = DenialAggregator(window_seconds=60.0, clock=lambda: now[0])
    assert [d.repeats for d in agg.note(_d("a"))] == [0]
    assert agg.note(_d("a")) == [] and agg.note(_d("a")) == []
    assert [d.reason for d in agg.note(_d("a", "other reason"))] == ["other reason"]
    now[0] = 61.0
    (next_record,) = agg.note(_d("a"))
    assert next_record.repeats == 2 and not next_record.summary  # the two counted ones
    agg.note(_d("a"))
    (summary,) = agg.flush()
    assert summary.summary and summary.repeats == 1 and agg.flush() == []


def test_aggregator_is_bounded_and_overflows_into_one_bucket() -> None:
    now = [0.0]
    agg = DenialAggregator(window_seconds=60.0, max_tracked=4, clock=lambda: now[0])
    written = [r for i in range(4) for r in agg.note(_d(f"fp{i}"))]
    agg.note(_d("fp0"))  # counted
    written += [r for i in range(4, 100) for r in agg.note(_d(f"fp{i}"))]
    assert len(written) == 5 and written[4].fingerprint == "*"  # then one record for 96 more
    assert len(agg._windows) == 5
    now[0] = 61.0
    evicted = agg.note(_d("fresh"))
    summaries = {(r.fingerprint, r.repeats) for r in evicted if r.summary}
    assert summaries == {("fp0", 1), ("*", 95)}  # 96 overflowed: one recorded, 95 counted
    assert evicted[-1].fingerprint == "fresh" and len(agg._windows) <= 5
