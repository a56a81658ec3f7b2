"""Audit to SIEM end to end (issue 15 part 6): a real ``qkms serve`` streams its audit to a real
rsyslogd over TLS and to a JSON-lines file. The receiver is killed mid-stream and started again, the
file is rotated, the KME is restarted: every record arrives, contiguous and verifiable, duplicates
only as exact resends, and nothing of the delivered keys' material is in the stream."""

from __future__ import annotations

import base64
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import database_url
from tests.siem.site import SAES, SiemSite, check_stream, complete_upto, require_rsyslog, siem_site, wait_for


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> SiemSite:
    require_rsyslog()
    with siem_site(tmp_path / "kme", database_url(request.param, request)) as running:
        yield running  # type: ignore[misc]


class Producer:
    """Key requests in a loop (each one an audit record), keeping the keys it was given."""

    def __init__(self, site: SiemSite) -> None:
        self.site = site
        self.keys: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.site.sae() as client:
            while not self.stop.is_set():
                self.request(client)
                time.sleep(0.02)

    def request(self, client: object) -> None:
        resp = client.get(f"/api/v1/keys/{SAES[1]}/enc_keys", params={"number": 1})  # type: ignore[attr-defined]
        assert resp.status_code == 200, resp.text
        self.keys += [k["key"] for k in resp.json()["keys"]]

    def __enter__(self) -> Producer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


def _all_arrived(site: SiemSite, timeout: float = 60.0) -> int:
    head = site.head()
    wait_for(
        lambda: complete_upto(site.receiver.lines(), head) and complete_upto(site.file_lines(), head),
        f"records 1..{head} at the receiver and in the file",
        timeout,
        site.process.log_tail,
    )
    return head


def test_every_record_arrives_through_a_receiver_outage_a_rotation_and_a_restart(site: SiemSite) -> None:
    kme_id = site.settings.kme.id
    with Producer(site) as producer:
        time.sleep(1.0)
        site.receiver.kill()  # SIGKILL mid-stream: whatever it had not stored is lost on its side
        site.siem_file.rename(site.siem_file.with_name(site.siem_file.name + ".1"))  # logrotate's move
        time.sleep(1.5)
        lag = site.lag()
        assert lag["syslog"].records_behind > 0 and lag["syslog"].seconds_behind > 0
        assert lag["syslog"].shipped_seq < lag["syslog"].head_seq
        site.receiver.start()
        time.sleep(1.0)
    head = _all_arrived(site)
    records, resent = check_stream(site.receiver.lines(), kme_id)
    assert records >= head and records > 100
    print(f"syslog: {records} records, {resent} resent after the outage")
    file_records, file_dups = check_stream(site.file_lines(), kme_id)
    assert file_records >= head and file_dups == 0  # a file write is known to be done: no resends
    assert site.siem_file.exists() and site.siem_file.with_name(site.siem_file.name + ".1").exists()
    wait_for(lambda: site.lag()["syslog"].records_behind == 0, "the syslog position to reach the head")
    log = site.process.log_tail(400)
    assert "siem_sink_down" in log and "siem_sink_up" in log

    # Nothing of the delivered keys' material is in either stream.
    assert len(producer.keys) > 50
    streams = site.receiver.output.read_text() + "".join(
        p.read_text() for p in site.siem_file.parent.glob(site.siem_file.name + "*")
    )
    for key in producer.keys:
        assert key not in streams and base64.b64decode(key).hex() not in streams

    # A restarted KME resumes where it stopped: the next line is the one after the shipped position.
    site.process.stop()
    shipped = {sink: site.position(sink) for sink in ("file", "syslog")}
    before_syslog, before_file = len(site.receiver.lines()), len(site.file_lines())
    site.process.start()
    with site.sae() as client:
        for _ in range(5):
            Producer(site).request(client)
    _all_arrived(site)
    for sink, new in (
        ("syslog", site.receiver.lines()[before_syslog:]),
        ("file", site.file_lines()[before_file:]),
    ):
        position = shipped[sink]
        assert position is not None and position.seq > 100
        assert new and min(int(line["seq"]) for line in new) == position.seq + 1, sink
    check_stream(site.receiver.lines(), kme_id)
    check_stream(site.file_lines(), kme_id)


def test_one_process_of_several_ships(tmp_path: Path) -> None:
    """``--workers 2``: both processes serve and audit, exactly one ships (no line twice)."""
    require_rsyslog()
    with siem_site(tmp_path / "kme", None, workers=2) as site:
        with site.sae() as client:
            for _ in range(40):
                Producer(site).request(client)
        _all_arrived(site)
        assert check_stream(site.receiver.lines(), site.settings.kme.id)[1] == 0
        assert check_stream(site.file_lines(), site.settings.kme.id)[1] == 0
        assert site.process.log_tail(2000).count("siem_shipper_started") == 1
