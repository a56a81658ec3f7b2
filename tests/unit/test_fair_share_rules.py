"""The fair-share rules and the refusal audit's aggregation, without a server (DECISIONS.md D-30)."""

from __future__ import annotations

from kms.domain.delivery import KeyOrder
from kms.domain.policy import Mode, PairPolicy
from kms.domain.quotas import FairShareRules, QuotaLimits
from kms.domain.saes import SaeInfo
from kms.service.fair_share import FairShares, QuotaExceeded
from kms.storage.database import Database


def test_a_request_pays_every_bucket_or_none() -> None:
    rules = FairShareRules(QuotaLimits(sae_keys_per_second=10, pair_requests_per_second=2, burst_seconds=1))
    assert rules.admit("M", "S", 4, 1024, (0, 0), now=0.0) is None
    assert rules.admit("M", "S", 4, 1024, (0, 0), now=0.0) is None
    # The pair's 2 requests are spent: refused, and the SAE's keys are not charged for it.
    refused = rules.admit("M", "S", 1, 256, (0, 0), now=0.0)
    assert refused is not None and refused.rule == "pair requests/s"
    assert refused.message == "pair M -> S is over its rate of 2 requests/s per process (quota): retry later"
    # Another slave of the same master: its own pair bucket, the master's 2 keys left.
    assert rules.admit("M", "T", 2, 512, (0, 0), now=0.0) is None
    assert rules.admit("M", "T", 1, 256, (0, 0), now=0.0).rule == "SAE keys/s"  # type: ignore[union-attr]
    # Half a second refills 5 keys and 1 pair request.
    assert rules.admit("M", "S", 5, 1280, (0, 0), now=0.5) is None


def test_a_request_larger_than_the_burst_is_refused_as_too_large() -> None:
    rules = FairShareRules(QuotaLimits(pair_bits_per_second=1000, burst_seconds=2))
    refused = rules.admit("M", "S", 8, 4096, (0, 0), now=0.0)
    assert refused is not None
    assert (
        refused.message
        == "pair M -> S may take at most 2000 bits at once (1000 bits/s per process; quota): ask for fewer"
    )


def test_caps_on_what_a_master_holds_unfetched() -> None:
    rules = FairShareRules(QuotaLimits(max_reserved_keys_per_master=100, max_reserved_bits_per_master=10_000))
    assert rules.admit("M", "S", 10, 2560, (90, 2000), now=0.0) is None
    assert rules.admit("M", "S", 11, 256, (90, 2000), now=0.0).rule == "reserved keys"  # type: ignore[union-attr]
    assert rules.admit("M", "S", 1, 8192, (0, 2000), now=0.0).rule == "pool share"  # type: ignore[union-attr]


def test_buckets_stay_bounded() -> None:
    rules = FairShareRules(QuotaLimits(pair_requests_per_second=1), max_buckets=10)
    for i in range(50):
        assert rules.admit("M", f"S{i}", 1, 256, (0, 0), now=float(i)) is None
    assert len(rules._buckets) <= 10


def test_refusals_are_audited_once_per_pair_rule_and_window() -> None:
    clock = [0.0]
    shares = FairShares(
        Database("sqlite://"),
        FairShareRules(QuotaLimits(pair_requests_per_second=1, burst_seconds=1)),
        reserved_refresh=0.25,
        audit_window=60.0,
        clock=lambda: clock[0],
    )
    order = KeyOrder(
        SaeInfo("M", "K", "f1"),
        SaeInfo("S", "K", "f2"),
        ["S"],
        1,
        256,
        PairPolicy(Mode.QKD, False, "ML-KEM-768"),
    )
    shares.admit(order)
    recorded = []
    for _ in range(5):
        try:
            shares.admit(order)
        except QuotaExceeded as exc:
            recorded.append(len(exc.records))
    assert recorded == [1, 0, 0, 0, 0]
    clock[0] = 61.0
    shares.admit(order)  # refilled
    try:
        shares.admit(order)
    except QuotaExceeded as exc:
        assert [r.repeats for r in exc.records] == [4]  # the four not recorded in the last window
    else:
        raise AssertionError("the second request in the same second must be refused")
