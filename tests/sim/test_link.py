"""SimulatedLink: a KeySource whose two ends yield identical, fully described key blocks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from qkd_adapters.keyblock import KeyBlock, KeySource, LinkAlarm
from qkd_adapters.sim.link import AttackSpec, SimulatedLink
from qkd_adapters.sim.params import LinkParameters, load_preset
from qkd_adapters.sim.postproc.channel import HmacAuthenticator


@pytest.fixture(scope="module")
def params() -> LinkParameters:
    return load_preset("gys", clock_rate_hz=1e9, detector_efficiency=0.5, misalignment=0.01)


def test_link_yields_identical_blocks_at_both_ends(params: LinkParameters) -> None:
    link = SimulatedLink(
        "sim-ab", params, distance_km=10.0, pulses_per_block=10_000_000, seed=42,
        authenticator=HmacAuthenticator(b"link-test-key-0000000000"),
    )  # fmt: skip
    try:
        assert isinstance(link, KeySource) and isinstance(link.end("bob"), KeySource)
        alice = link.pull(2, timeout=60)
        while len(alice) < 2:
            alice = [*alice, *link.pull(2 - len(alice), timeout=60)]
        bob = link.end("bob").pull(2, timeout=60)
        while len(bob) < 2:
            bob = [*bob, *link.end("bob").pull(2 - len(bob), timeout=60)]
    finally:
        link.close()
    for a, b in zip(alice, bob, strict=True):
        assert isinstance(a, KeyBlock) and isinstance(b, KeyBlock)
        assert a.block_id == b.block_id and a.material == b.material and a.bit_length == b.bit_length
        p = a.provenance
        assert p.is_qkd and p.simulated and p.protocol == "decoy-bb84" and p.adapter == "simulated-link"
        assert p.distance_km == 10.0 and p.qber is not None and 0 < p.qber < 0.05
        assert p.leaked_bits and p.epsilon_sec == 1e-10 and p.epsilon_cor == 1e-15
        assert p.pa_ratio is not None and 0 < p.pa_ratio < 1 and p.alarms == ()
        d = p.details
        assert d["final_bits"] == a.bit_length and d["decoy_bounds"]["s_z1_lower"] > 0
        assert d["reconciliation"]["efficiency"] < 1.2
        bits = np.unpackbits(np.frombuffer(a.material, dtype=np.uint8))
        assert not bits[a.bit_length :].any()
        p.to_json()
    assert alice[0].block_id != alice[1].block_id


def test_intercept_resend_link_raises_alarms(params: LinkParameters) -> None:
    link = SimulatedLink(
        "sim-eve", params, distance_km=10.0, pulses_per_block=5_000_000, seed=1, attack="intercept-resend:1"
    )
    try:
        events = link.pull(1, timeout=60)
    finally:
        link.close()
    assert events and isinstance(events[0], LinkAlarm)
    assert events[0].reason == "qber-over-threshold" and events[0].details["attack"] == "intercept-resend:1"


def test_pns_link_raises_alarms() -> None:
    link = SimulatedLink(
        "sim-pns", "gys", distance_km=25.0, clock_rate_hz=1e9, seconds_per_block=1.0, seed=2, attack="pns"
    )
    try:
        events = link.pull(1, timeout=60)
    finally:
        link.close()
    assert events and isinstance(events[0], LinkAlarm) and events[0].reason == "no-positive-key-length"


def test_realtime_pacing_follows_the_clock(params: LinkParameters) -> None:
    link = SimulatedLink(
        "sim-rt",
        params,
        distance_km=10.0,
        pulses_per_block=100_000_000,
        clock_rate_hz=1e9,
        pacing="realtime",
        seed=3,
    )
    try:
        t0 = time.monotonic()
        events = link.pull(1, timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        link.close()
    assert events and elapsed >= 0.095


def test_describe_and_attack_parsing(params: LinkParameters) -> None:
    link = SimulatedLink("sim-d", params, seconds_per_block=0.002, protocol="bbm92", autostart=False)
    info = link.describe()
    assert info["protocol"] == "bbm92" and info["is_qkd"] and info["pulses_per_block"] == 2_000_000
    assert AttackSpec.parse("intercept-resend:0.25").fraction == 0.25
    with pytest.raises(ValueError):
        AttackSpec.parse("laser-damage")
    with pytest.raises(ValueError):
        SimulatedLink("x", params, protocol="bbm92", attack="pns", autostart=False)
    a, b = link.produce_block()
    assert (a.block_id == b.block_id) and (isinstance(a, KeyBlock) == isinstance(b, KeyBlock))
    link.close()
