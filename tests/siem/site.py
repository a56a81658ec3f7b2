"""A real KME (``qkms serve``) whose audit streams to a JSON-lines file and to a real rsyslogd over TLS
(certificate issued from the KME's site CA), and checks on what arrived."""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w

from kms.config import KmsSettings
from kms.crypto import pki
from kms.domain.audit_chain import GENESIS, record_hash
from kms.lab.launcher import KmeProcess, free_port
from kms.provision.workdir import init_workdir, sae_credential_paths
from kms.service.audit_shipping import ShippingLag, shipping_lag
from kms.storage.database import Database
from kms.storage.siem_positions import PositionStore, ShippedPosition
from tests.siem.rsyslog import Rsyslog, rsyslog_available

SAES = ("SAE-M", "SAE-S")
BODY = ("seq", "at", "actor", "action", "subject", "data")


def require_rsyslog() -> None:
    ok, why = rsyslog_available()
    if not ok:
        if os.environ.get("QKMS_REQUIRE_RSYSLOG") == "1":
            pytest.fail(f"rsyslog is required (QKMS_REQUIRE_RSYSLOG=1) but unavailable: {why}")
        pytest.skip(why)


@dataclass
class SiemSite:
    workdir: Path
    config_path: Path
    settings: KmsSettings
    process: KmeProcess
    receiver: Rsyslog

    @property
    def siem_file(self) -> Path:
        assert self.settings.siem.file is not None
        return self.settings.siem.file

    def sae(self, sae_id: str = SAES[0]) -> httpx.Client:
        cert, key = sae_credential_paths(self.workdir, sae_id)
        return self.process.client(self.workdir / "pki" / "ca.pem", cert, key)

    def lag(self) -> dict[str, ShippingLag]:
        db = Database(self.settings.database.url)
        try:
            return {lag.sink: lag for lag in shipping_lag(db, self.settings)}
        finally:
            db.engine.dispose()

    def head(self) -> int:
        return next(iter(self.lag().values())).head_seq

    def position(self, sink: str) -> ShippedPosition | None:
        return PositionStore(self.settings.siem.state_dir, self.settings.kme.id).load(sink)

    def file_lines(self) -> list[dict[str, Any]]:
        """Every line of the SIEM file and of the files it was rotated to (``.1``, ``.2``...)."""
        paths = [
            *sorted(self.siem_file.parent.glob(self.siem_file.name + ".*"), reverse=True),
            self.siem_file,
        ]
        lines: list[dict[str, Any]] = []
        for path in paths:
            if path.exists():
                lines += [json.loads(x) for x in path.read_text(encoding="ascii").splitlines() if x]
        return lines


@contextmanager
def siem_site(workdir: Path, database_url: str | None, workers: int = 1) -> Iterator[SiemSite]:
    result = init_workdir(
        workdir,
        "KME-SIEM",
        list(SAES),
        port=free_port(),
        database_url=database_url,
        link_source="random",
        pool_overrides={"max_pool_bits": 1024 * 1024},
    )
    pki_dir = workdir / "pki"
    site_ca = pki.load_credential(pki_dir / "ca.pem", pki_dir / "ca.key")
    server = pki.issue_server_cert(
        site_ca, "siem-receiver", hostnames=["localhost"], ip_addresses=["127.0.0.1"]
    )
    recv_dir = workdir.parent / f"{workdir.name}-rsyslog"
    pki.write_credential(server, recv_dir / "server.pem", recv_dir / "server.key")
    receiver = Rsyslog(
        recv_dir, free_port(), tls=(pki_dir / "ca.pem", recv_dir / "server.pem", recv_dir / "server.key")
    )
    config = tomllib.loads(result.config_path.read_text())
    config.setdefault("database", {})["require_durable_commits"] = False  # throwaway test cluster
    config["siem"] = {
        "file": "siem/audit.jsonl",
        "poll_seconds": 0.05,
        "batch_records": 50,
        "backoff_initial_seconds": 0.2,
        "backoff_max_seconds": 1.0,
        "syslog": {"host": "127.0.0.1", "port": receiver.port, "transport": "tls", "confirm_seconds": 0.3},
    }
    result.config_path.write_text(tomli_w.dumps(config))
    settings = KmsSettings.load(result.config_path)
    receiver.start()
    proc = KmeProcess(result.config_path, settings.kme.port, workers=workers)
    site = SiemSite(workdir, result.config_path, settings, proc, receiver)
    try:
        proc.start()
        with site.sae() as client:
            proc.wait_for_keys(client, SAES[1], minimum=64)
        yield site
    finally:
        proc.stop()
        receiver.stop()


def wait_for(
    check: Callable[[], bool], what: str, timeout: float = 60.0, log: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{log()}")
        time.sleep(0.1)


def complete_upto(lines: list[dict[str, Any]], head: int) -> bool:
    return set(range(1, head + 1)) <= {int(line["seq"]) for line in lines}


def check_stream(lines: list[dict[str, Any]], kme_id: str) -> tuple[int, int]:
    """What a SIEM would check: every seq from 1 on, contiguous; a repeated seq is the same record
    (a resend); each record's hash recomputed from its body and its predecessor's hash. Returns
    (unique records, duplicates)."""
    by_seq: dict[int, dict[str, Any]] = {}
    duplicates = 0
    for line in lines:
        assert line["format"] == "qkms-audit/1" and line["kme"] == kme_id
        seq = int(line["seq"])
        if seq in by_seq:
            assert by_seq[seq] == line, f"seq {seq} arrived twice with different content"
            duplicates += 1
        by_seq[seq] = line
    assert sorted(by_seq) == list(range(1, len(by_seq) + 1)), "the stream has a gap"
    prev = GENESIS.hex()
    for seq in sorted(by_seq):
        line = by_seq[seq]
        assert line["prev_hash"] == prev, f"seq {seq} does not follow its predecessor"
        assert record_hash({k: line[k] for k in BODY}, bytes.fromhex(prev)).hex() == line["hash"]
        prev = line["hash"]
    return len(by_seq), duplicates
