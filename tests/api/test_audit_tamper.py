"""Rewriting the audit trail with full write access to the database (issue 13, finding 2).

A security team with the KME stopped and the database in hand deleted every checkpoint; truncated
the records and dropped the later checkpoints; deleted the ``access.denied`` records, renumbered,
re-chained and dropped the later checkpoints — and ``qkms audit verify`` called each trail intact,
and a restarted KME signed the forged history. Here each attack runs on a copy of a real KME's
stopped database (SQLite file, or a PostgreSQL database cloned by TEMPLATE) and must be named by
``qkms audit verify`` and refused by the KME at start (exit 3). The family at the end tampers with
records, checkpoints, keys and anchors one way each and checks every one is detected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w
from sqlalchemy import Connection, create_engine, text

from kms.audit.integrity import AuditIntegrityError
from kms.config import KmsSettings
from kms.crypto.pqc.base import SignatureAlgorithm
from kms.crypto.pqc.registry import get_signature_provider
from kms.domain.audit_chain import GENESIS, record_hash
from kms.lab.launcher import KmeProcess, free_port
from kms.runtime.assembly import build_runtime
from kms.service.audit_checkpoints import anchor_file, tail_window
from kms.service.audit_queries import AuditService
from kms.service.audit_startup import check_audit_at_start
from tests.conftest import database_url
from tests.kme_harness import running_kme
from tests.support.postgres import PostgresServer

M, S, T = "SAE-M", "SAE-S", "SAE-T"
_clones = iter(range(1_000_000))


@dataclasses.dataclass(frozen=True)
class Site:
    """A stopped KME whose audit holds several chained, anchored checkpoints and some denials."""

    workdir: Path
    url: str
    pg: PostgresServer | None


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    workdir = tmp_path_factory.mktemp(f"tamper-{request.param}") / "kme"
    url = database_url(request.param, request)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("QKMS_AUDIT__CHECKPOINT_SECONDS", "0.2")
        env.setenv("QKMS_AUDIT__CHECKPOINT_RECORDS", "4")
        with running_kme(workdir, url, saes=(M, S, T), fill_keys=64) as kme:
            for i in range(9):
                key_id = kme.client(M).get(f"/api/v1/keys/{S}/enc_keys").json()["keys"][0]["key_ID"]
                if i % 3 == 0:  # T is not the key's slave: 401, audited as access.denied
                    denied = kme.client(T).get(f"/api/v1/keys/{M}/dec_keys", params={"key_ID": key_id})
                    assert denied.status_code == 401
                time.sleep(0.25)
            settings = kme.settings
    # Stopped (clean stop: the last checkpoint covers every record).
    pg = request.getfixturevalue("pg_server") if request.param == "postgres" else None
    yield Site(workdir, settings.database.url, pg)


def _clone(site: Site, tmp_path: Path) -> Path:
    """A copy of the stopped site (directory, anchors and database) on a fresh port; its config path."""
    workdir = tmp_path / "kme"
    shutil.copytree(site.workdir, workdir)
    config_path = workdir / "qkms.toml"
    config = tomllib.loads(config_path.read_text())
    config["kme"]["port"] = free_port()
    if site.pg is not None:
        name = f"qkms_tamper_{next(_clones)}"
        source = site.url.rsplit("/", 1)[1]
        engine = create_engine(site.pg.dsn("postgres"), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{source}"'))
        engine.dispose()
        config["database"]["url"] = site.pg.dsn(name)
    config_path.write_text(tomli_w.dumps(config))
    return config_path


def _tamper(config: Path, change: Callable[[Connection], None]) -> None:
    engine = create_engine(KmsSettings.load(config).database.url)
    try:
        with engine.begin() as conn:
            change(conn)
    finally:
        engine.dispose()


def _qkms_verify(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kms", "audit", "verify", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )


def _start_refused(config: Path) -> str:
    """Start the KME on ``config``; it must exit 3 without listening. Returns its log."""
    proc = KmeProcess(config, KmsSettings.load(config).kme.port)
    try:
        proc.start(timeout=60)
    except RuntimeError as exc:
        message = str(exc)
        assert "exited with 3" in message and "audit_start_refused" in message, message
        return message
    finally:
        proc.stop()
    pytest.fail("the KME started (and would sign) on a rewritten audit trail")


def _set_head(conn: Connection) -> None:
    """Make audit_head agree with the last stored record, as a careful attacker would."""
    last = conn.execute(text("SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1")).one()
    conn.execute(
        text("UPDATE audit_head SET seq = :s, hash = :h WHERE id = 1"), {"s": last.seq, "h": last.hash}
    )


def _rechain(conn: Connection, keep: Callable[[str], bool]) -> int:
    """Drop the records whose action ``keep`` rejects, renumber from there and re-chain; drop every
    checkpoint from the first changed seq on. Returns the first changed seq."""
    rows = conn.execute(
        text("SELECT seq, at, actor, action, subject, data FROM audit_records ORDER BY seq")
    ).all()
    first = next(r.seq for r in rows if not keep(r.action))
    conn.execute(text("DELETE FROM audit_records WHERE seq >= :s"), {"s": first})
    prev = bytes.fromhex(
        conn.execute(text("SELECT hash FROM audit_records WHERE seq = :s"), {"s": first - 1}).scalar_one()
        if first > 1
        else GENESIS.hex()
    )
    seq = first - 1
    for r in rows:
        if r.seq < first or not keep(r.action):
            continue
        seq += 1
        body = {"seq": seq, "at": r.at, "actor": r.actor, "action": r.action, "subject": r.subject}
        body["data"] = json.loads(r.data)
        digest = record_hash(body, prev)
        conn.execute(
            text(
                "INSERT INTO audit_records (seq, at, actor, action, subject, data, prev_hash, hash)"
                " VALUES (:seq, :at, :actor, :action, :subject, :data, :prev, :hash)"
            ),
            {**body, "data": r.data, "prev": prev.hex(), "hash": digest.hex()},
        )
        prev = digest
    conn.execute(text("DELETE FROM audit_checkpoints WHERE upto_seq >= :s"), {"s": first})
    _set_head(conn)
    return first


# ---- the three attacks of the finding ------------------------------------------------------------


def test_an_untouched_copy_verifies_and_starts(site: Site, tmp_path: Path) -> None:
    """The control: the copies themselves are sound, so the refusals below are the tampering's."""
    config = _clone(site, tmp_path)
    ok = _qkms_verify(config)
    assert ok.returncode == 0 and "audit trail intact" in ok.stdout, ok.stdout + ok.stderr
    anchored = re.search(r"(\d+) anchors checked", ok.stdout)
    # Several checkpoints, all anchored, for the tamperings to work on.
    assert anchored is not None and int(anchored.group(1)) >= 3, ok.stdout
    proc = KmeProcess(config, KmsSettings.load(config).kme.port)
    try:
        proc.start(timeout=60)
        time.sleep(1.0)  # past the start check and the first checkpoint poll
        assert proc.proc is not None and proc.proc.poll() is None, proc.log_tail()
    finally:
        proc.stop()


def test_deleting_every_checkpoint_is_detected(site: Site, tmp_path: Path) -> None:
    config = _clone(site, tmp_path)
    _tamper(config, lambda conn: conn.execute(text("DELETE FROM audit_checkpoints")))
    res = _qkms_verify(config)
    assert res.returncode == 1 and "audit trail FAILED" in res.stdout
    assert "checkpoint #1 (seq 1.." in res.stdout and "is missing (deleted)" in res.stdout
    assert "checkpoint #1" in _start_refused(config)


def test_truncating_records_and_later_checkpoints_is_detected(site: Site, tmp_path: Path) -> None:
    config = _clone(site, tmp_path)

    def truncate(conn: Connection) -> None:
        cut = conn.execute(  # the second checkpoint's seq (a query the pre-0009 schema answers too)
            text("SELECT upto_seq FROM audit_checkpoints ORDER BY upto_seq LIMIT 1 OFFSET 1")
        ).scalar_one()
        conn.execute(text("DELETE FROM audit_records WHERE seq > :s"), {"s": cut})
        conn.execute(text("DELETE FROM audit_checkpoints WHERE upto_seq > :s"), {"s": cut})
        _set_head(conn)

    _tamper(config, truncate)
    res = _qkms_verify(config)
    assert res.returncode == 1 and "audit truncated: the last record is seq" in res.stdout, res.stdout
    assert "checkpoint #3" in res.stdout and "is missing (deleted)" in res.stdout
    assert "audit truncated" in _start_refused(config)


def test_deleting_denials_renumbering_rechaining_is_refused_at_restart(site: Site, tmp_path: Path) -> None:
    config = _clone(site, tmp_path)
    _tamper(config, lambda conn: _rechain(conn, keep=lambda action: action != "access.denied"))
    count = text(
        "SELECT (SELECT COUNT(*) FROM audit_records WHERE action = 'access.denied'),"
        " (SELECT COUNT(*) FROM audit_checkpoints)"
    )
    engine = create_engine(KmsSettings.load(config).database.url)
    with engine.connect() as conn:
        denials, checkpoints = conn.execute(count).one()
    assert denials == 0
    log = _start_refused(config)  # before anything else looks at it: the finding's restart
    assert "missing (deleted)" in log
    # Refused means it signed nothing: no checkpoint was added, and the rewrite fails verification.
    with engine.connect() as conn:
        assert tuple(conn.execute(count).one()) == (0, checkpoints)
    engine.dispose()
    res = _qkms_verify(config)
    assert res.returncode == 1 and "is missing (deleted)" in res.stdout, res.stdout


# ---- the family: one tampering of each kind, every one detected ----------------------------------


def _cps(conn: Connection) -> list[tuple[int, int, int]]:
    return [
        (int(r[0]), int(r[1]), int(r[2]))
        for r in conn.execute(
            text(
                "SELECT number, from_seq, upto_seq FROM audit_checkpoints WHERE number IS NOT NULL ORDER BY number"
            )
        )
    ]


def _sql(*statements: str) -> Callable[[Connection], None]:
    def run(conn: Connection) -> None:
        for statement in statements:
            conn.execute(text(statement))

    return run


def _swap_records(conn: Connection) -> None:
    conn.execute(text("UPDATE audit_records SET seq = -1 WHERE seq = 3"))
    conn.execute(text("UPDATE audit_records SET seq = 3 WHERE seq = 4"))
    conn.execute(text("UPDATE audit_records SET seq = 4 WHERE seq = -1"))


def _truncate_records(conn: Connection) -> None:
    upto = _cps(conn)[-1][2]
    conn.execute(text("DELETE FROM audit_records WHERE seq > :s"), {"s": upto - 2})
    _set_head(conn)


def _forge_tail_record(conn: Connection) -> None:
    head = conn.execute(text("SELECT seq, hash FROM audit_head")).one()
    conn.execute(
        text(
            "INSERT INTO audit_records (seq, at, actor, action, subject, data, prev_hash, hash)"
            " VALUES (:s, '2026-11-24T00:00:00+00:00', 'operator', 'keys.forged', 'x', '{}', :p, :h)"
        ),
        {"s": head.seq + 1, "p": head.hash, "h": "ab" * 48},
    )


def _edit_checkpoint(conn: Connection) -> None:
    other = conn.execute(text("SELECT hash FROM audit_records WHERE seq = 1")).scalar_one()
    conn.execute(text("UPDATE audit_checkpoints SET head_hash = :h WHERE number = 2"), {"h": other})


def _reorder_checkpoints(conn: Connection) -> None:
    conn.execute(text("UPDATE audit_checkpoints SET number = -1 WHERE number = 1"))
    conn.execute(text("UPDATE audit_checkpoints SET number = 1 WHERE number = 2"))
    conn.execute(text("UPDATE audit_checkpoints SET number = 2 WHERE number = -1"))


def _forge_checkpoint(conn: Connection) -> None:
    number, _, upto = _cps(conn)[-1]
    row = conn.execute(text("SELECT * FROM audit_checkpoints WHERE number = :n"), {"n": number}).one()
    values = {**row._mapping, "number": number + 1, "from_seq": upto + 1, "upto_seq": upto + 1}
    values.pop("id")
    columns = ", ".join(values)
    conn.execute(
        text(f"INSERT INTO audit_checkpoints ({columns}) VALUES ({', '.join(':' + c for c in values)})"),
        values,
    )
    conn.execute(text("UPDATE audit_head SET seq = seq"))  # nothing else changes


def _replace_signing_key(conn: Connection) -> None:
    pair = get_signature_provider().generate(SignatureAlgorithm.ML_DSA_65)
    conn.execute(text("UPDATE kme_keys SET public_key = :k WHERE purpose = 'sign'"), {"k": pair.public_key})


def _anchors(config: Path) -> Path:
    return anchor_file(KmsSettings.load(config)).path


def _anchor_lines(config: Path, change: Callable[[list[bytes]], list[bytes]]) -> None:
    path = _anchors(config)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(change(lines)))


def _edit_anchor(lines: list[bytes]) -> list[bytes]:

    obj = json.loads(lines[1])
    obj["hash"] = "cd" * 48
    return [lines[0], (json.dumps(obj) + "\n").encode(), *lines[2:]]


def _forge_anchor(lines: list[bytes]) -> list[bytes]:

    last = json.loads(lines[-1])
    forged = {**last, "number": last["number"] + 1, "from_seq": last["upto_seq"] + 1}
    forged["upto_seq"] = forged["from_seq"]
    return [*lines, (json.dumps(forged) + "\n").encode()]


# name: (database change or None, anchor-file change or None, words verify must print, start refuses?)
# "start refuses" None: the start check leaves it to `qkms audit verify` (an edit that keeps the hash
# columns is never signed over — see kms/service/audit_startup.py).
FAMILY: dict[
    str, tuple[Callable[[Connection], None] | None, Callable[[Path], None] | None, str, bool | None]
] = {
    "record-edit": (
        _sql("UPDATE audit_records SET actor = 'sae:X' WHERE seq = 3"),
        None,
        "seq 3 was edited",
        None,
    ),
    "record-delete": (_sql("DELETE FROM audit_records WHERE seq = 3"), None, "seq 3 deleted", True),
    "record-reorder": (_swap_records, None, "record seq 3", None),
    "record-truncate": (_truncate_records, None, "audit truncated", True),
    "record-rechain": (
        lambda c: _rechain(c, keep=lambda a: a != "keys.reserved") and None,
        None,
        "missing",
        True,
    ),
    "record-forge": (_forge_tail_record, None, "was edited", True),
    "checkpoint-delete-all": (_sql("DELETE FROM audit_checkpoints"), None, "is missing (deleted)", True),
    "checkpoint-delete-first": (
        _sql("DELETE FROM audit_checkpoints WHERE number = 1"),
        None,
        "#1 missing (deleted)",
        True,
    ),
    "checkpoint-delete-last": (
        _sql("DELETE FROM audit_checkpoints WHERE number = (SELECT MAX(number) FROM audit_checkpoints)"),
        None,
        "is missing (deleted)",
        True,
    ),
    "checkpoint-edit": (_edit_checkpoint, None, "differs from its anchor", True),
    "checkpoint-reorder": (_reorder_checkpoints, None, "invalid signature", True),
    "checkpoint-forge": (_forge_checkpoint, None, "invalid signature", True),
    "signing-key-replace": (_replace_signing_key, None, "is not the anchored key", True),
    "anchors-delete": (None, lambda cfg: _anchors(cfg).unlink(), "missing or empty", True),
    "anchors-edit": (None, lambda cfg: _anchor_lines(cfg, _edit_anchor), "differs from its anchor", True),
    "anchors-reorder": (
        None,
        lambda cfg: _anchor_lines(cfg, lambda ls: [ls[1], ls[0], *ls[2:]]),
        "cannot be read",
        True,
    ),
    "anchors-forge": (None, lambda cfg: _anchor_lines(cfg, _forge_anchor), "is missing (deleted)", True),
}


@pytest.mark.parametrize("kind", list(FAMILY))
def test_every_tampering_is_detected(site: Site, tmp_path: Path, kind: str) -> None:
    db_change, file_change, words, start_refuses = FAMILY[kind]
    config = _clone(site, tmp_path)
    if db_change is not None:
        _tamper(config, db_change)
    if file_change is not None:
        file_change(config)
    settings = KmsSettings.load(config)
    rt = build_runtime(settings, sync_registry=False)
    try:
        report = AuditService.for_settings(rt.db, rt.identity, settings).verify()
        assert not report.ok and any(words in p for p in report.problems), report.problems
        try:
            check_audit_at_start(
                rt.db, rt.identity, settings.kme.id, anchor_file(settings), tail_window(settings)
            )
        except AuditIntegrityError as exc:
            assert start_refuses is not False, exc.problems
        else:
            assert start_refuses is None, f"{kind}: the KME would have started"
    finally:
        rt.close()


def test_offline_verify_of_a_truncated_export_fails_only_with_the_anchors(site: Site, tmp_path: Path) -> None:
    """An export cut back to an earlier checkpoint is self-consistent; the anchor file exposes it."""
    config = _clone(site, tmp_path)
    out = tmp_path / "audit.json"
    pub = tmp_path / "pub.json"
    for args in (("audit", "export", "--out", str(out)), ("keys", "export-public", "--out", str(pub))):
        res = subprocess.run(
            [sys.executable, "-m", "kms", *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    keep = data["checkpoints"][1]["upto_seq"]
    data["checkpoints"] = data["checkpoints"][:2]
    data["records"] = [r for r in data["records"] if r["seq"] <= keep]
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(data))
    offline = [sys.executable, "-m", "kms", "audit", "verify", "--file", str(cut), "--public-key", str(pub)]
    plain = subprocess.run(
        offline, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"}
    )
    assert plain.returncode == 0 and "no anchor file checked" in plain.stdout, plain.stdout
    anchors = str(_anchors(config))
    anchored = subprocess.run(
        [*offline, "--anchors", anchors],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert (
        anchored.returncode == 1
        and "checkpoint #3" in anchored.stdout
        and "audit truncated" in anchored.stdout
    )
