"""The ETSI 014 upstream adapter end to end against a real ``qkms sim device serve`` process.

The KME at site A is master at device A; the KME at site B follows at device B with the key_IDs
that A's block carries in its ``sync`` metadata.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kms.lab.launcher import free_port
from qkd_adapters.etsi014_upstream import Etsi014Follower, Etsi014Master, block_id_for
from qkd_adapters.keyblock import FollowerKeySource, KeyBlock, KeySource, KeySourceError, LinkAlarm
from tests.adapters.device_harness import SimDevice, sim_device


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimDevice]:
    with sim_device(tmp_path_factory.mktemp("simdevice")) as running:
        yield running


def master(device: SimDevice, **kw: Any) -> Etsi014Master:
    opts: dict[str, Any] = {"keys_per_pull": 8, "key_size": 256, "poll_interval_s": 0.0, **kw}
    return Etsi014Master("link-ab", device.url("A"), "kme-b", **device.credentials("kme-a"), **opts)


def follower(device: SimDevice, site: str = "B", client: str = "kme-b", **kw: Any) -> Etsi014Follower:
    peer = "kme-a" if client == "kme-b" else "kme-b"
    return Etsi014Follower("link-ab", device.url(site), peer, **device.credentials(client), **kw)


def pull_block(source: Etsi014Master) -> KeyBlock:
    for _ in range(50):
        events = source.pull(max_events=4)
        if events:
            [event] = events
            assert isinstance(event, KeyBlock), event
            return event
        time.sleep(0.1)
    raise AssertionError("no block from the device")


def test_master_block_is_fetched_identically_by_the_follower(device: SimDevice) -> None:
    m, f = master(device), follower(device)
    assert isinstance(m, KeySource) and isinstance(f, FollowerKeySource) and isinstance(f, KeySource)
    try:
        block = pull_block(m)
        sync = dict(block.sync)
        assert set(sync) == {"key_IDs", "key_size"} and sync["key_size"] == 256
        assert len(sync["key_IDs"]) == 8 and len(set(sync["key_IDs"])) == 8
        assert block.block_id == block_id_for(sync["key_IDs"])
        assert block.bit_length == 8 * 256 and len(block.material) == 256
        p = block.provenance
        assert p.adapter == "etsi014-upstream" and p.is_qkd is True
        assert p.simulated is True  # the device's status_extension says so; provenance must not hide it
        assert p.details["source_KME_ID"] == "SIMDEV-A" and p.details["target_KME_ID"] == "SIMDEV-B"
        assert p.details["device_status_extension"]["preset"] == "gys"

        copy = f.fetch_announced(block.block_id, block.bit_length, sync)
        assert isinstance(copy, KeyBlock)
        assert copy.material == block.material  # Bob's end of the simulated link, after Cascade and PA
        assert (copy.block_id, copy.bit_length, dict(copy.sync)) == (block.block_id, block.bit_length, sync)
        assert copy.provenance.details["role"] == "follower"
        assert copy.provenance.simulated is True  # device B says so too (its status_extension)
        assert copy.provenance.details["device_status_extension"]["simulated"] is True

        # Each key_ID is delivered once: a second fetch finds nothing at the device.
        with pytest.raises(KeySourceError, match="400"):
            f.fetch_announced(block.block_id, block.bit_length, sync)
        assert f.pull() == []
    finally:
        m.close()
        f.close()


def test_blocks_differ_and_pulls_are_rate_limited(device: SimDevice) -> None:
    m = master(device, poll_interval_s=30.0)
    try:
        first = pull_block(m)
        started = time.monotonic()
        assert m.pull() == []  # within the poll interval: no device round trip at all
        assert time.monotonic() - started < 0.5
    finally:
        m.close()
    second = pull_block(master(device))
    assert second.block_id != first.block_id and second.material != first.material


def test_announcement_that_disagrees_is_an_alarm(device: SimDevice) -> None:
    m, f = master(device), follower(device)
    try:
        block = pull_block(m)
        ids = list(block.sync["key_IDs"])
        bad_length = f.fetch_announced(block.block_id, block.bit_length - 8, block.sync)
        reordered = f.fetch_announced(
            block.block_id, block.bit_length, {"key_IDs": ids[::-1], "key_size": 256}
        )
        no_ids = f.fetch_announced(block.block_id, block.bit_length, {"key_size": 256})
        for alarm in (bad_length, reordered, no_ids):
            assert isinstance(alarm, LinkAlarm) and alarm.details["code"] == "etsi014-sync-mismatch"
            assert alarm.block_id == block.block_id
        # The mismatches never reached the device: the genuine announcement still gets the keys.
        copy = f.fetch_announced(block.block_id, block.bit_length, block.sync)
        assert isinstance(copy, KeyBlock) and copy.material == block.material
    finally:
        m.close()
        f.close()


def test_wrong_end_gets_401(device: SimDevice) -> None:
    m = master(device)
    try:
        block = pull_block(m)
    finally:
        m.close()
    # Site A's KME asking device A for the slave's copy: it was the master, not the slave.
    wrong_site = follower(device, site="A", client="kme-a")
    # Site B's credentials at device A: not that device's SAE at all.
    wrong_device = follower(device, site="A", client="kme-b")
    try:
        for f in (wrong_site, wrong_device):
            with pytest.raises(KeySourceError, match="401"):
                f.fetch_announced(block.block_id, block.bit_length, block.sync)
    finally:
        wrong_site.close()
        wrong_device.close()
    # A master using the other site's credentials is refused once with an alarm, then backs off quietly.
    intruder = Etsi014Master(
        "link-ab", device.url("A"), "kme-b", **device.credentials("kme-b"), poll_interval_s=0
    )
    try:
        [alarm] = intruder.pull()
        assert isinstance(alarm, LinkAlarm) and alarm.details["code"] == "etsi014-device-refused"
        assert alarm.details["status"] == 401
        intruder._next_call = 0.0  # skip the back-off: a repeated refusal raises no second alarm
        assert intruder.pull() == []
    finally:
        intruder.close()
    # The right follower still gets the block: the refused attempts consumed nothing.
    right = follower(device)
    try:
        copy = right.fetch_announced(block.block_id, block.bit_length, block.sync)
        assert isinstance(copy, KeyBlock) and copy.material == block.material
    finally:
        right.close()


def test_device_speaks_etsi_014_with_error_bodies(device: SimDevice) -> None:
    with device.client("A", "kme-a") as a, device.client("B", "kme-b") as b:
        status = a.get("/api/v1/keys/kme-b/status").json()
        assert status["source_KME_ID"] == "SIMDEV-A" and status["master_SAE_ID"] == "kme-a"
        assert status["max_SAE_ID_count"] == 0 and status["status_extension"]["simulated"] is True
        # GET forms of Get key and Get key with key IDs.
        [key] = a.get("/api/v1/keys/kme-b/enc_keys", params={"number": 1, "size": 512}).json()["keys"]
        [same] = b.get("/api/v1/keys/kme-a/dec_keys", params={"key_ID": key["key_ID"]}).json()["keys"]
        assert same["key_ID"] == key["key_ID"] and len(base64.b64decode(key["key"])) == 64
        assert same["key"] == key["key"]
        # Device B's SAE may be master too, toward device A.
        [key_b] = b.post("/api/v1/keys/kme-a/enc_keys", json={"number": 1}).json()["keys"]
        got = a.post("/api/v1/keys/kme-b/dec_keys", json={"key_IDs": [{"key_ID": key_b["key_ID"]}]})
        assert got.status_code == 200 and got.json()["keys"][0]["key"] == key_b["key"]

        cases = [
            (a.post("/api/v1/keys/kme-b/enc_keys", json={"size": 100}), 400, "size shall be a multiple of 8"),
            (a.post("/api/v1/keys/kme-b/enc_keys", json={"number": 10_000}), 400, "number must be"),
            (a.post("/api/v1/keys/kme-b/enc_keys", json={"number": "3"}), 400, "ETSI GS QKD 014 format"),
            (a.get("/api/v1/keys/kme-a/status"), 400, "not the SAE of the device at the other end"),
            (a.get("/api/v1/nothing"), 400, "no such endpoint"),
            (a.delete("/api/v1/keys/kme-b/enc_keys"), 400, "method not allowed"),
            (
                a.post("/api/v1/keys/kme-b/enc_keys", json={"extension_mandatory": [{"x_y": 1}]}),
                400,
                "extension_mandatory",
            ),
            (b.post("/api/v1/keys/kme-a/dec_keys", json={"key_IDs": [{"key_ID": "nope"}]}), 400, "not found"),
            # More than the bounded buffer can ever hold: the device answers 503, it does not hang.
            (
                a.post("/api/v1/keys/kme-b/enc_keys", json={"number": 128, "size": 4096}),
                503,
                "not enough key",
            ),
        ]
        for resp, code, text in cases:
            assert resp.status_code == code, (resp.status_code, resp.text)
            assert text in resp.json()["message"]
    with device.client("A", "kme-b") as wrong:
        resp = wrong.get("/api/v1/keys/kme-b/status")
        assert resp.status_code == 401 and "message" in resp.json()


def test_pool_empty_503_gives_no_block(device: SimDevice) -> None:
    # 128 keys of 4096 bits are more than the device's buffer holds: Get key answers 503, pull yields [].
    m = master(device, keys_per_pull=128, key_size=4096)
    try:
        assert m.pull() == []
    finally:
        m.close()


def test_device_down(tmp_path: Path, device: SimDevice) -> None:
    dead = f"https://127.0.0.1:{free_port()}"
    m = Etsi014Master(
        "link-ab", dead, "kme-b", **device.credentials("kme-a"), poll_interval_s=0.0, timeout_s=1.0
    )
    f = Etsi014Follower("link-ab", dead, "kme-a", **device.credentials("kme-b"), timeout_s=1.0)
    try:
        assert m.pull() == []
        assert m.pull() == []  # backing off, still no exception
        ids = ["6f1c0e55-7d5b-4a4e-9b3a-1d2c3e4f5a6b"]
        with pytest.raises(KeySourceError, match="unreachable"):
            f.fetch_announced(block_id_for(ids), 256, {"key_IDs": ids, "key_size": 256})
    finally:
        m.close()
        f.close()
