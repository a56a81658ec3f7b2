"""``qkms top`` (issue 15 part 4) on the store of a real KME fed by the simulated QKD link: ``--once``
shows every link's state, QBER and pool exactly as ``qkms status`` and the newest stored block say,
the keys by state, and the operator's suspension; the live view refreshes until interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.domain.lifecycle import KeyState
from kms.storage import operator_queries
from kms.storage.database import Database
from tests.kme_harness import RunningKme, running_kme

M, S = "SAE-M", "SAE-S"
ENV = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}


def _qkms(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "kms", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _rows(output: str) -> list[list[str]]:
    """The cells of every table row Rich drew."""
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in output.splitlines()
        if line.count("│") >= 3
    ]


@pytest.fixture(scope="module")
def stopped_kme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningKme]:
    """A KME that ran on the simulated link, delivered keys, and stopped (its store stays still)."""
    with running_kme(
        tmp_path_factory.mktemp("top") / "kme",
        None,
        saes=(M, S),
        link_source="simulated",
        link_options={"pacing": "fast", "seed": 11},
        fill_keys=8,
    ) as kme:
        for _ in range(3):
            assert kme.client(M).get(f"/api/v1/keys/{S}/enc_keys", params={"number": 2}).status_code == 200
    yield kme


def _compare(config: str, link_id: str) -> tuple[list[str], str]:
    """``qkms top --once`` and ``qkms status`` on the same still store; returns top's link row."""
    top, status = (
        _qkms("top", "--config", config, "--once", "--interval", "0"),
        _qkms("status", "--config", config),
    )
    # top: link, peer, state, QBER, rate, stored bits, keys, mirror, unconfirmed, until empty
    # status: link, peer, adapter, state, active blocks, keys, stored bits, mirror, unconfirmed
    top_link = next(r for r in _rows(top) if r[0] == link_id and len(r) == 10)
    status_link = next(r for r in _rows(status) if r[0] == link_id and len(r) == 9)
    assert (top_link[1], top_link[2]) == (status_link[1], status_link[3])
    assert (top_link[5], top_link[6], top_link[7], top_link[8]) == (
        status_link[6],
        status_link[5],
        status_link[7],
        status_link[8],
    )
    states = {s.value for s in KeyState}
    by_state_top = {r[0]: r[1] for r in _rows(top) if len(r) == 2 and r[0] in states}
    by_state_status = {r[0]: r[1] for r in _rows(status) if len(r) == 2 and r[0] in states}
    assert by_state_top == by_state_status and by_state_top
    return top_link, top


def test_once_agrees_with_qkms_status_and_the_store(stopped_kme: RunningKme) -> None:
    config = str(stopped_kme.workdir / "qkms.toml")
    link_id = stopped_kme.settings.links[0].id
    row, top = _compare(config, link_id)
    assert row[2] == "active" and int(row[5]) > 0 and int(row[6]) > 0
    db = Database(stopped_kme.settings.database.url)
    try:
        with db.read() as conn:
            qber = operator_queries.newest_block_qber(conn, link_id)
    finally:
        db.dispose()
    assert qber is not None and 0.02 < qber < 0.05
    assert row[3] == f"{100 * qber:.2f} %" and row[4] == "-"  # one snapshot: no rate
    assert "audit: head seq" in top and any(len(r) == 4 and r[2] == "none" for r in _rows(top))

    _qkms("link", "suspend", link_id, "--config", config, "--reason", "fibre maintenance")
    row, top = _compare(config, link_id)
    assert row[2] == "suspended" and row[5] == "0"
    event = next(r for r in _rows(top) if len(r) == 4 and r[2] == "link.suspended")
    assert event[1] == link_id and "fibre maintenance" in event[3]
    _qkms("link", "resume", link_id, "--config", config, "--reason", "repaired")


def test_the_live_view_refreshes_until_interrupted(stopped_kme: RunningKme) -> None:
    config = str(stopped_kme.workdir / "qkms.toml")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kms", "top", "--config", config, "--interval", "0.3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    time.sleep(4.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "links and pool" in out and "Traceback" not in err


def test_bad_input_is_one_line(tmp_path: Path, stopped_kme: RunningKme) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kms",
            "top",
            "--config",
            str(stopped_kme.workdir / "qkms.toml"),
            "--interval",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=False,
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--interval" in done.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "kms", "top", "--config", str(tmp_path / "none.toml"), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=False,
    )
    assert missing.returncode == 2 and "config file not found" in missing.stderr
