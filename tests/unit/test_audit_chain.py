"""The audit chain verifier names each kind of tampering; checkpoints catch a consistent rewrite."""

from __future__ import annotations

import dataclasses

from kms.audit.chain import (
    CHECKPOINT_CONTEXT,
    GENESIS,
    AuditRecord,
    Checkpoint,
    record_hash,
    verify_chain,
)
from kms.crypto.pqc.base import SignatureAlgorithm
from kms.crypto.pqc.registry import get_signature_provider

ALG = SignatureAlgorithm.ML_DSA_65
SIGNER = get_signature_provider()
KEYS = SIGNER.generate(ALG)


def _chain(n: int, start_prev: bytes = GENESIS, first: int = 1, tag: str = "k") -> list[AuditRecord]:
    out, prev = [], start_prev
    for seq in range(first, first + n):
        body = {
            "seq": seq,
            "at": f"2026-11-23T00:00:{seq:02d}+00:00",
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


def _checkpoint(rec: AuditRecord) -> Checkpoint:
    cp = Checkpoint(rec.seq, rec.hash, "KME-A", 1, ALG.value, "2026-11-23T00:01:00+00:00", "")
    sig = SIGNER.sign(ALG, KEYS.private_seed, cp.message(), CHECKPOINT_CONTEXT)
    return dataclasses.replace(cp, signature=sig.hex())


def _check(version: int, message: bytes, signature: bytes) -> bool:
    return version == 1 and SIGNER.verify(ALG, KEYS.public_key, message, signature, CHECKPOINT_CONTEXT)


def test_intact_chain_verifies() -> None:
    records = _chain(8)
    report = verify_chain(records, [_checkpoint(records[5])], _check)
    assert (
        report.ok
        and report.checkpoints_valid == 1
        and report.last_signed_seq == 6
        and report.unsigned_tail == 2
    )


def test_edited_record() -> None:
    records = _chain(5)
    records[2] = dataclasses.replace(records[2], data={"key_IDs": ["forged"]})
    assert verify_chain(records, [], _check).problems == [
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
    cp = _checkpoint(original[4])
    # The attacker rewrites records 4..6 with new content and recomputes a consistent chain;
    # only the checkpoint signature, which needs the KME's private key, gives it away.
    rewritten = original[:3] + _chain(3, start_prev=bytes.fromhex(original[2].hash), first=4, tag="forged")
    report = verify_chain(rewritten, [cp], _check)
    assert report.problems == ["log rewritten: record seq 5 no longer matches the signed checkpoint"]


def test_forged_checkpoint_signature() -> None:
    records = _chain(3)
    cp = dataclasses.replace(_checkpoint(records[2]), head_hash=records[1].hash)
    assert verify_chain(records, [cp], _check).problems == ["checkpoint at seq 3 has an invalid signature"]


def test_truncated_log_before_checkpoint() -> None:
    records = _chain(6)
    cp = _checkpoint(records[5])
    report = verify_chain(records[:4], [cp], _check)
    assert report.problems == ["checkpoint at seq 6 names a record that is missing (deleted)"]
