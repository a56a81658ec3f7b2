"""Structured logs of a real ``qkms serve`` (issue 15 part 5, DECISIONS.md D-37): with its output to a
file (not a terminal) every line is a JSON object; every API request, on the lean hot path and on
FastAPI's routes alike, gets one ``request`` line with its request ID, caller, endpoint, status and
latency; the client's ``X-Request-ID`` comes back when well formed and is replaced when not; lines
logged while serving a request name it; and no key delivered in the run, errors included, appears in
the log in any form."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kms.lab.launcher import client_ssl_context
from kms.provision.workdir import auditor_credential_paths
from kms.runtime.logs import resolve_format
from tests.kme_harness import RunningKme, running_kme

M, S, T = "SAE-M", "SAE-S", "SAE-T"
AUDITOR = "AUDITOR-1"
GENERATED = re.compile(r"^[0-9a-f]{24}$")


@pytest.fixture(scope="module")
def kme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKme]:
    with running_kme(tmp_path_factory.mktemp("request-logs"), fill_keys=64, auditors=(AUDITOR,)) as running:
        yield running


@pytest.fixture(scope="module")
def run(kme: RunningKme) -> dict[str, Any]:
    """A run of requests, successes and errors, each with its own X-Request-ID; then the log."""
    master, slave, other = kme.client(M), kme.client(S), kme.client(T)
    sent: dict[str, httpx.Response] = {}
    keys: list[str] = []

    def call(rid: str, client: httpx.Client, method: str, url: str, **kw: Any) -> httpx.Response:
        resp = client.request(method, url, headers={"X-Request-ID": rid, **kw.pop("headers", {})}, **kw)
        sent[rid] = resp
        if resp.status_code == 200 and "keys" in resp.json():
            keys.extend(k["key"] for k in resp.json()["keys"])
        return resp

    hot = call("hot-enc-1", master, "POST", f"/api/v1/keys/{S}/enc_keys", json={"number": 3})
    ids = [{"key_ID": k["key_ID"]} for k in hot.json()["keys"]]
    call("fastapi-enc-1", master, "GET", f"/api/v1/keys/{S}/enc_keys?number=2&size=512")
    call("hot-dec-1", slave, "POST", f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": ids})
    call("status-1", master, "GET", f"/api/v1/keys/{S}/status")
    # Errors: too many keys (400), malformed JSON (hot path hands it to FastAPI: 400), keys already
    # consumed (400), keys of another pair (401), an auditor on the key API (401, audited).
    call("err-too-many", master, "POST", f"/api/v1/keys/{S}/enc_keys", json={"number": 100_000})
    call(
        "err-json",
        master,
        "POST",
        f"/api/v1/keys/{S}/enc_keys",
        content=b'{"number": ',
        headers={"content-type": "application/json"},
    )
    call("err-consumed", slave, "POST", f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": ids})
    call("err-not-yours", other, "POST", f"/api/v1/keys/{M}/dec_keys", json={"key_IDs": ids})
    cert, key = auditor_credential_paths(kme.workdir, AUDITOR)
    with httpx.Client(base_url=kme.process.base_url, verify=client_ssl_context(kme.ca, cert, key)) as aud:
        call("aud-on-keys", aud, "POST", f"/api/v1/keys/{S}/enc_keys", json={"number": 1})
        call("aud-events", aud, "GET", "/api/v1/audit/events?limit=5")
    # Ill-formed request IDs: too long, characters a log line or header could be forged with.
    bad_ids = {"x" * 65: "long", 'a"b': "quote", "a b": "space", "a\\nb": "escape"}
    replaced = {}
    for bad in bad_ids:
        resp = master.get(f"/api/v1/keys/{S}/status", headers={"X-Request-ID": bad})
        replaced[bad] = resp.headers.get("x-request-id", "")
    plain = master.get(f"/api/v1/keys/{S}/status")
    lines = _wait_for_lines(kme, {*sent, plain.headers["x-request-id"]})
    return {"sent": sent, "keys": keys, "lines": lines, "replaced": replaced, "plain": plain}


def _wait_for_lines(kme: RunningKme, request_ids: set[str]) -> list[dict[str, Any]]:
    """Every line of the log, parsed (a line that is not JSON fails), once each request has its line."""
    assert kme.process.log_path is not None
    deadline = time.monotonic() + 10
    while True:
        text = kme.process.log_path.read_text()
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        logged = {x.get("request_id") for x in lines if x.get("event") == "request"}
        if request_ids <= logged or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def request_line(run: dict[str, Any], rid: str) -> dict[str, Any]:
    (line,) = [x for x in run["lines"] if x.get("event") == "request" and x.get("request_id") == rid]
    return line


def test_every_line_is_json_with_time_level_and_event(run: dict[str, Any]) -> None:
    lines = run["lines"]
    assert len(lines) > len(run["sent"])
    for line in lines:
        assert list(line)[:3] == ["timestamp", "level", "event"], line
    assert any(x.get("logger") == "uvicorn.error" for x in lines)  # library lines are JSON too


def test_each_request_has_one_line_with_its_id_caller_status_and_latency(run: dict[str, Any]) -> None:
    callers = {"aud-on-keys": None, "aud-events": ("auditor_id", AUDITOR)}
    for rid, resp in run["sent"].items():
        assert resp.headers["x-request-id"] == rid
        line = request_line(run, rid)
        assert line["status"] == resp.status_code, (rid, line)
        assert 0 < line["latency_ms"] < 30_000 and line["level"] == "info"
        caller = callers.get(
            rid, ("sae_id", {"hot-dec-1": S, "err-consumed": S, "err-not-yours": T}.get(rid, M))
        )
        if caller is None:
            assert not {"sae_id", "auditor_id"} & set(line), line  # refused before it was identified
        else:
            assert line[caller[0]] == caller[1], line
        if resp.status_code != 200:
            assert line["error"] == resp.json()["message"][:200], line
        else:
            assert "error" not in line
    assert request_line(run, "hot-enc-1")["endpoint"] == "enc_keys"
    assert request_line(run, "hot-dec-1")["endpoint"] == "dec_keys"
    assert request_line(run, "aud-events")["endpoint"] == "audit"
    assert run["sent"]["err-not-yours"].status_code == 401


def test_hot_path_and_fastapi_path_log_alike(run: dict[str, Any]) -> None:
    hot, routed = request_line(run, "hot-enc-1"), request_line(run, "fastapi-enc-1")
    assert set(hot) == set(routed)
    assert (hot["method"], routed["method"]) == ("POST", "GET")
    assert hot["endpoint"] == routed["endpoint"] == "enc_keys"


def test_ill_formed_request_ids_are_replaced(run: dict[str, Any]) -> None:
    for bad, given in run["replaced"].items():
        assert GENERATED.match(given), (bad, given)
        assert request_line(run, given)["status"] == 200
    assert GENERATED.match(run["plain"].headers["x-request-id"])  # none sent: one is made
    ids = [x["request_id"] for x in run["lines"] if x.get("event") == "request"]
    assert len(ids) == len(set(ids))


def test_lines_logged_while_serving_name_the_request(run: dict[str, Any]) -> None:
    """The auditor's refusal is logged by the denial recorder (in a thread) under the request's ID."""
    denied = [x for x in run["lines"] if x.get("event") == "access_denied"]
    assert [x.get("request_id") for x in denied] == ["aud-on-keys"], denied


def test_no_key_material_in_the_log(kme: RunningKme, run: dict[str, Any]) -> None:
    assert len(run["keys"]) >= 8
    assert kme.process.log_path is not None
    log = kme.process.log_path.read_text()
    for key in run["keys"]:
        raw = base64.b64decode(key)
        assert key not in log and key[:16] not in log
        assert raw.hex() not in log and raw.hex()[:16] not in log


def test_auto_means_console_on_a_terminal_and_json_elsewhere(tmp_path: Path) -> None:
    primary, secondary = os.openpty()
    try:
        with os.fdopen(secondary, "w", closefd=False) as tty:
            assert resolve_format("auto", tty) == "console"
            assert resolve_format("json", tty) == "json"
    finally:
        os.close(primary)
        os.close(secondary)
    with (tmp_path / "file").open("w") as plain:
        assert resolve_format("auto", plain) == "json"
        assert resolve_format("console", plain) == "console"


def test_bad_log_format_is_one_line(kme: RunningKme) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kms",
            "serve",
            "--config",
            str(kme.process.config_path),
            "--log-format",
            "xml",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "--log-format must be auto, json or console" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
