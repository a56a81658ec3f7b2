"""Fair-share refusals counted (issue 16 part 4, DECISIONS.md D-37): ``qkms_quota_refusals_total`` by
the limit that refused, summed over the processes of ``qkms serve --workers 2`` (each process counts
its own; the listener's scrape adds them up), equal to the 503 quota answers the SAE got and to the
``request`` lines logged for them. The label maps every rule the domain can produce."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from kms.domain.quotas import FairShareRules, QuotaLimits
from kms.service.fair_share import LIMIT_LABELS
from kms.telemetry.metrics import QUOTA_LIMITS
from tests.operator.harness import SAES, OperatorKme, operator_kme
from tests.operator.test_operator_listener import samples

M, S = SAES
QUOTAS = {"sae_requests_per_second": 2.0, "burst_seconds": 1.0, "max_reserved_keys_per_master": 6}


@pytest.fixture(scope="module")
def kme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorKme]:
    workdir: Path = tmp_path_factory.mktemp("quota-refusals")
    with operator_kme(workdir, workers=2, sections={"quotas": QUOTAS}) as running:
        yield running


def limit_of(message: str) -> str:
    if "keys its slaves have not fetched" in message:
        return "max_reserved_keys_per_master"
    assert "requests/s per process (quota)" in message, message
    return "sae_requests_per_second"


def test_refusals_are_counted_by_limit_across_worker_processes(kme: OperatorKme) -> None:
    answers: Counter[str] = Counter()
    with kme.sae(M) as master:
        master.headers["Connection"] = "close"  # new connections land on either worker
        for number in (7, *([1] * 14)):
            resp = master.post(f"/api/v1/keys/{S}/enc_keys", json={"number": number})
            assert resp.status_code in (200, 503), resp.text
            answers[limit_of(resp.json()["message"]) if resp.status_code == 503 else "served"] += 1
    assert answers["max_reserved_keys_per_master"] == 1 and answers["sae_requests_per_second"] >= 6, answers
    expected = {limit: float(answers[limit]) for limit in QUOTA_LIMITS}
    deadline = time.monotonic() + 5  # the worker not scraped folds its counts in every FLUSH_SECONDS
    while True:
        with kme.operator(kme.token) as client:
            text = client.get("/metrics").text
        counted = {
            dict(labels)["limit"]: v
            for (name, labels), v in samples(text).items()
            if name == "qkms_quota_refusals_total"
        }
        if counted == expected or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(counted) == set(QUOTA_LIMITS)  # every limit has its series from the start
    assert counted == expected, (counted, answers)
    # Each refusal has its request line (whichever process served it), naming the SAE and the limit.
    assert kme.process.log_path is not None
    deadline = time.monotonic() + 10  # a line is written once its answer has gone out
    while True:
        lines = [json.loads(x) for x in kme.process.log_path.read_text().splitlines() if x.strip()]
        refused = [x for x in lines if x.get("event") == "request" and x["status"] == 503]
        if len(refused) >= sum(answers[limit] for limit in QUOTA_LIMITS) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(refused) == sum(answers[limit] for limit in QUOTA_LIMITS)
    assert all(x["sae_id"] == M and "(quota)" in x["error"] for x in refused)


def test_every_rule_has_a_limit_label() -> None:
    """Each limit configured alone, a request over it: its rule maps to one of the fixed labels."""
    fields = QuotaLimits.__dataclass_fields__
    seen = set()
    for name in fields:
        if name == "burst_seconds":
            continue
        values = {f: 0 for f in fields} | {"burst_seconds": 1.0, name: 1}
        rules = FairShareRules(QuotaLimits(**values))  # type: ignore[arg-type]
        # Over a cap or a bucket at once; one request a second passes once, then is refused.
        refusal = rules.admit("M", "S", 4, 4096, (2, 8192), now=0.0) or rules.admit(
            "M", "S", 4, 4096, (2, 8192), 0.0
        )
        assert refusal is not None, name
        assert LIMIT_LABELS[refusal.rule] in QUOTA_LIMITS
        seen.add(LIMIT_LABELS[refusal.rule])
    assert seen == set(QUOTA_LIMITS)
