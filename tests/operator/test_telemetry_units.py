"""The bounded vocabularies and the time limit behind the operator's figures."""

from __future__ import annotations

import threading
import time

import pytest

from kms.service.operator_metrics import OTHER, bounded_pairs
from kms.service.single_flight import CallTimedOut, SingleFlight
from kms.storage.operator_queries import PairKeys
from kms.telemetry.asgi import endpoint_of
from kms.telemetry.metrics import MAX_ALARM_KINDS, Instruments


def test_endpoint_label_comes_from_a_fixed_vocabulary() -> None:
    assert endpoint_of("/api/v1/keys/SAE-S/enc_keys") == "enc_keys"
    assert endpoint_of("/api/v1/keys/SAE-S/dec_keys") == "dec_keys"
    assert endpoint_of("/api/v1/keys/SAE-S/status") == "status"
    assert endpoint_of("/api/v1/audit/records") == "audit"
    assert endpoint_of("/peer/v1/messages") == "peer"
    for odd in ("/api/v1/keys/0193e1c2-7f3a-7000-8000-000000000001", "/metrics", "/../../etc/passwd", ""):
        assert endpoint_of(odd) == "other"


def test_alarm_kinds_are_bounded() -> None:
    counted = Instruments(registry=None)
    assert counted.alarm_kind("qber-over-threshold") == "qber-over-threshold"
    assert counted.alarm_kind("Key material 0xdeadbeef leaked!") == "other"
    kinds = {counted.alarm_kind(f"kind-{i}") for i in range(3 * MAX_ALARM_KINDS)}
    assert len(kinds) == MAX_ALARM_KINDS  # the first ones kept, "other" for the rest
    assert "other" in kinds and "qber-over-threshold" not in kinds
    assert counted.alarm_kind("qber-over-threshold") == "qber-over-threshold"  # known kinds stay


def test_pairs_past_the_limit_are_summed_under_other() -> None:
    rows = [
        PairKeys("A", "B", "qkd", "consumed", 50),
        PairKeys("A", "B", "qkd", "reserved", 5),
        PairKeys("C", "D", "qkd", "consumed", 20),
        PairKeys("E", "F", "hybrid", "consumed", 3),
        PairKeys("G", "H", "hybrid", "consumed", 4),
    ]
    pairs = bounded_pairs(rows, limit=2)
    named = {(p.master_sae_id, p.slave_sae_id) for p in pairs}
    assert named == {("A", "B"), ("C", "D"), (OTHER, OTHER)}
    other = [p for p in pairs if p.master_sae_id == OTHER]
    assert [(p.policy, p.state, p.keys) for p in other] == [("hybrid", "consumed", 7)]
    assert sum(p.keys for p in pairs) == sum(r.keys for r in rows)


def test_single_flight_bounds_the_wait_and_never_piles_up() -> None:
    release = threading.Event()
    calls = []

    def stuck() -> str:
        calls.append(1)
        release.wait(10)
        return "answer"

    flight: SingleFlight[str] = SingleFlight("test-stuck", stuck)
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(CallTimedOut):
            flight.run(0.2)
        assert time.monotonic() - started < 1.0
    assert len(calls) == 1  # one thread held by the stuck call, not one per caller
    release.set()
    assert flight.run(2.0) == "answer"


def test_peer_message_kinds_and_outcomes_are_bounded() -> None:
    from kms.operator.peer_metrics import kind_of, outcome_of
    from kms.peer.client import PeerRefused, PeerUnavailable, PeerUncertain

    assert kind_of("keys.record.batch") == "ledger" and kind_of("keys.cancel") == "ledger"
    assert kind_of("relay.forward") == "relay" and kind_of("session.key") == "session"
    assert kind_of("made-up.by-a-peer") == "other"
    assert outcome_of(None) == "ok"
    assert outcome_of(PeerRefused("KME-B", "no")) == "refused"
    assert outcome_of(PeerUnavailable("KME-B", "down")) == "unavailable"
    assert outcome_of(PeerUncertain("KME-B", "timeout")) == "uncertain"
    assert outcome_of(RuntimeError("x")) == "error"
