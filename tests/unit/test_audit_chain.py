"""The audit chain verifier names each kind of tampering of records and of the checkpoint chain."""

from __future__ import annotations

import dataclasses

import pytest

from kms.audit.chain import TailWindow, verify_chain
from kms.crypto.pqc.base import SignatureAlgorithm
from kms.crypto.pqc.registry import get_signature_provider
from kms.domain.audit_chain import (
    CHAINED_CONTEXT,
    GENESIS,
    AuditRecord,
    Checkpoint,
    LegacyCheckpoint,
    record_hash,
)

ALG = SignatureAlgorithm.ML_DSA_65
SIGNER = get_signature_provider()
KEYS = SIGNER.generate(ALG)


def _chain(n: int, start_prev: bytes = GENESIS, first: int = 1, tag: str = "k") -> list[AuditRecord]:
    out, prev = [], start_prev
    for seq in range(first, first + n):
        body = {
            "seq": seq,
            "at": f"2026-11-23T00:{seq // 60:02d}:{seq % 60:02d}+00:00",
            "actor": "sae:A",
            "action": "keys.reserved",
            "subject": "A->B",
            "data": {"key_IDs": [f"{tag}{seq}"]},
        }
        digest = record_hash(body, prev)
        out.append(
            AuditRecord(
                seq, body["at"], "sae:A", "keys.reserved", "A->B", body["data"], prev.hex(), digest.hex()
            )
        )
        prev = digest
    return out


def _sign(cp: Checkpoint | LegacyCheckpoint) -> Checkpoint | LegacyCheckpoint:
    sig = SIGNER.sign(ALG, KEYS.private_seed, cp.message(), cp.context)
    return dataclasses.replace(cp, signature=sig.hex())


def _checkpoints(records: list[AuditRecord], ends: list[int]) -> list[Checkpoint]:
    """Chained checkpoints ending at each seq in ``ends``."""
    out: list[Checkpoint] = []
    by_seq = {r.seq: r for r in records}
    for end in ends:
        last = out[-1] if out else None
        cp = Checkpoint(
            len(out) + 1,
            last.hash() if last else GENESIS.hex(),
            last.upto_seq + 1 if last else 1,
            end,
            by_seq[end].hash,
            "KME-A",
            1,
            ALG.value,
            "2026-11-23T00:01:00+00:00",
            "",
        )
        signed = _sign(cp)
        assert isinstance(signed, Checkpoint)
        out.append(signed)
    return out


def _check(version: int, message: bytes, signature: bytes, context: bytes) -> bool:
    return version == 1 and SIGNER.verify(ALG, KEYS.public_key, message, signature, context)


def test_intact_chain_verifies() -> None:
    records = _chain(8)
    report = verify_chain(records, _checkpoints(records, [3, 6]), _check)
    assert report.ok, report.problems
    assert report.checkpoints_valid == 2 and report.checkpoints_chained == 2
    assert report.last_signed_seq == 6 and report.unsigned_tail == 2


def test_edited_record() -> None:
    records = _chain(5)
    records[2] = dataclasses.replace(records[2], data={"key_IDs": ["forged"]})
    assert verify_chain(records, _checkpoints(_chain(5), [5]), _check).problems == [
        "record seq 3 was edited: its content does not match its hash"
    ]


def test_deleted_record() -> None:
    records = _chain(5)
    del records[2]
    assert verify_chain(records, [], _check).problems == ["record(s) seq 3 deleted before seq 4"]


def test_inserted_record() -> None:
    records = _chain(5)
    records.insert(2, dataclasses.replace(records[1]))
    problems = verify_chain(records, [], _check).problems
    assert "record seq 2 appears twice (inserted record)" in problems


def test_reordered_records() -> None:
    records = _chain(5)
    records[1], records[2] = records[2], records[1]
    problems = verify_chain(records, [], _check).problems
    assert any("out of order" in p for p in problems)


def test_consistent_rewrite_is_caught_by_the_signed_checkpoint() -> None:
    original = _chain(6)
    cps = _checkpoints(original, [5])
    # The attacker rewrites records 4..6 with new content and recomputes a consistent chain;
    # only the checkpoint signature, which needs the KME's private key, gives it away.
    rewritten = original[:3] + _chain(3, start_prev=bytes.fromhex(original[2].hash), first=4, tag="forged")
    report = verify_chain(rewritten, cps, _check)
    assert report.problems == ["log rewritten: record seq 5 no longer matches the signed checkpoint #1"]


def test_forged_checkpoint_signature() -> None:
    records = _chain(3)
    cp = dataclasses.replace(_checkpoints(records, [3])[0], head_hash=records[1].hash)
    problems = verify_chain(records, [cp], _check).problems
    assert problems[0] == "checkpoint #1 has an invalid signature (forged or altered)"


def test_truncated_log_before_checkpoint() -> None:
    records = _chain(6)
    report = verify_chain(records[:4], _checkpoints(records, [6]), _check)
    assert report.problems == [
        "checkpoint #1 names record seq 6, which is missing (deleted or truncated)",
    ]


def test_legacy_checkpoints_still_verify() -> None:
    records = _chain(4)
    legacy = _sign(
        LegacyCheckpoint(2, records[1].hash, "KME-A", 1, ALG.value, "2026-11-23T00:01:00+00:00", "")
    )
    report = verify_chain(records, [legacy, *_checkpoints(records, [4])], _check)
    assert report.ok and report.checkpoints_valid == 2 and report.checkpoints_chained == 1


# ---- the checkpoint chain: each tampering of the checkpoints alone is named ------------------------

RECORDS = _chain(12)
CPS = _checkpoints(RECORDS, [3, 6, 9, 12])


def _tamper_checkpoints(kind: str) -> list[Checkpoint]:
    cps = list(CPS)
    if kind == "delete-middle":
        del cps[1]
    elif kind == "delete-first":
        del cps[0]
    elif kind == "swap-numbers":
        a, b = cps[1], cps[2]
        cps[1], cps[2] = dataclasses.replace(a, number=3), dataclasses.replace(b, number=2)
    elif kind == "duplicate":
        cps.insert(2, cps[1])
    elif kind == "move-range":  # re-signed impossible: the range is inside the signed message
        cps[2] = dataclasses.replace(cps[2], from_seq=8)
    elif kind == "unsigned-forgery":
        forged = Checkpoint(
            5, CPS[3].hash(), 13, 12, RECORDS[11].hash, "KME-A", 1, ALG.value, "x", "00" * 3309
        )
        cps.append(forged)
    elif kind == "other-key":
        other = SIGNER.generate(ALG)
        cp = cps[1]
        sig = SIGNER.sign(ALG, other.private_seed, cp.message(), cp.context)
        cps[1] = dataclasses.replace(cp, signature=sig.hex())
    elif kind == "legacy-context":  # a signature made for the other checkpoint format does not count
        cp = cps[1]
        sig = SIGNER.sign(ALG, KEYS.private_seed, cp.message(), b"qkms-audit-checkpoint-v1")
        cps[1] = dataclasses.replace(cp, signature=sig.hex())
    else:
        raise AssertionError(kind)
    return cps


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("delete-middle", "checkpoint(s) #2 missing (deleted) before checkpoint #3"),
        ("delete-first", "checkpoint(s) #1 missing (deleted) before checkpoint #2"),
        ("swap-numbers", "has an invalid signature"),
        ("duplicate", "checkpoint #2 appears twice"),
        ("move-range", "checkpoint #3 has an invalid signature"),
        ("unsigned-forgery", "checkpoint #5 has an invalid signature"),
        ("other-key", "checkpoint #2 has an invalid signature"),
        ("legacy-context", "checkpoint #2 has an invalid signature"),
    ],
)
def test_each_checkpoint_tampering_is_named(kind: str, expected: str) -> None:
    assert verify_chain(RECORDS, CPS, _check).ok
    problems = verify_chain(RECORDS, _tamper_checkpoints(kind), _check).problems
    assert any(expected in p for p in problems), problems


def test_chained_context_differs_from_legacy() -> None:
    assert CHAINED_CONTEXT != b"qkms-audit-checkpoint-v1"


# ---- the tail window: records after the last checkpoint ------------------------------------------


def test_records_without_any_checkpoint_fail_beyond_the_window() -> None:
    records = _chain(12)
    assert verify_chain(records, [], _check, TailWindow(records=20, seconds=60)).ok
    by_count = verify_chain(records, [], _check, TailWindow(records=11, seconds=60)).problems
    assert by_count == [
        "12 records (seq 1..12) follow the last signed checkpoint, more than the window of 11:"
        " checkpoints are missing (deleted) or were never written"
    ]
    by_time = verify_chain(records, [], _check, TailWindow(records=20, seconds=10)).problems
    assert len(by_time) == 1 and "span 11 s, more than the window of 10 s" in by_time[0]


def test_deleting_the_newest_checkpoints_shows_as_a_long_tail() -> None:
    records = _chain(41)
    cps = _checkpoints(records, [10, 20, 30, 40])
    window = TailWindow(records=15, seconds=15)
    assert verify_chain(records, cps, _check, window).ok
    report = verify_chain(records, cps[:2], _check, window)  # #3 and #4 deleted
    assert report.unsigned_tail == 21 and not report.ok
    assert "21 records (seq 21..41) follow the last signed checkpoint" in report.problems[0]
