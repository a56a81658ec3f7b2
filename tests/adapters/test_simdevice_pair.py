"""The simulated device pair's key buffer in process: cutting, entitlement, TTL, bounds."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from qkd_adapters.sim.link import SimulatedLink
from qkd_adapters.simdevice.pair import NOT_FOUND, DevicePair, DeviceRequestError, PairLimits


@pytest.fixture
def pair() -> Iterator[DevicePair]:
    link = SimulatedLink("pair-test", "gys", distance_km=5, pulses_per_block=200_000_000, seed=3, max_queue=2)
    p = DevicePair(link, {"A": "kme-a", "B": "kme-b"}, PairLimits(max_stored_bits=65536, key_ttl_s=0.5))
    p.start()
    deadline = time.monotonic() + 60
    while p.status("A", "kme-a", "kme-b")["stored_key_count"] < 64 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield p
    finally:
        p.close()


def refused(status: int, fn: object, *args: object) -> str:
    with pytest.raises(DeviceRequestError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.status == status
    return info.value.message


def test_keys_go_to_the_master_now_and_to_the_slave_once(pair: DevicePair) -> None:
    before = pair.status("A", "kme-a", "kme-b")["stored_key_count"]
    keys = pair.get_keys("A", "kme-a", "kme-b", 3, 256)
    assert len(keys) == 3 and all(len(m) == 32 for _, m in keys)
    assert pair.status("B", "kme-b", "kme-a")["stored_key_count"] == before - 3  # one buffer, both directions
    ids = [k for k, _ in keys]
    assert refused(401, pair.get_keys_with_ids, "A", "kme-a", "kme-b", ids[:1]).startswith(
        "the requesting SAE"
    )
    assert "other end" in refused(400, pair.get_keys_with_ids, "B", "kme-b", "kme-b", ids[:1])
    assert pair.get_keys_with_ids("B", "kme-b", "kme-a", ids) == keys
    assert refused(400, pair.get_keys_with_ids, "B", "kme-b", "kme-a", ids[:1]) == NOT_FOUND


def test_unfetched_keys_expire(pair: DevicePair) -> None:
    [(key_id, _)] = pair.get_keys("B", "kme-b", "kme-a", 1, 128)
    assert pair.describe()["keys_waiting_for_slave"] == 1
    time.sleep(0.6)
    assert refused(400, pair.get_keys_with_ids, "A", "kme-a", "kme-b", [key_id]) == NOT_FOUND
    assert pair.describe()["keys_waiting_for_slave"] == 0


def test_requests_outside_the_limits(pair: DevicePair) -> None:
    assert "multiple of 8" in refused(400, pair.get_keys, "A", "kme-a", "kme-b", 1, 250)
    assert "between" in refused(400, pair.get_keys, "A", "kme-a", "kme-b", 1, 8)
    assert "number" in refused(400, pair.get_keys, "A", "kme-a", "kme-b", 129, None)
    assert "other end" in refused(400, pair.get_keys, "A", "kme-a", "kme-x", 1, None)
    assert "not enough" in refused(503, pair.get_keys, "A", "kme-a", "kme-b", 128, 4096)
    assert "repeat" in refused(400, pair.get_keys_with_ids, "B", "kme-b", "kme-a", ["x", "x"])


def test_an_eavesdropped_link_gives_alarms_and_no_keys() -> None:
    link = SimulatedLink(
        "pair-eve", "gys", distance_km=5, pulses_per_block=200_000_000, seed=4, max_queue=2,
        attack="intercept-resend:1.0",
    )  # fmt: skip
    p = DevicePair(link, {"A": "kme-a", "B": "kme-b"})
    p.start()
    try:
        deadline = time.monotonic() + 60
        while p.alarms < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        status = p.status("A", "kme-a", "kme-b")
        assert status["stored_key_count"] == 0 and status["status_extension"]["alarms"] >= 2
        assert status["status_extension"]["attack"] == "intercept-resend:1"
        assert status["status_extension"]["last_alarm"]
        assert "not enough" in refused(503, p.get_keys, "A", "kme-a", "kme-b", 1, None)
    finally:
        p.close()
