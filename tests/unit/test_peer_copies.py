"""A peer's copy of another KME's checkpoint chain (``kms.audit.peer_copies``): it takes what
continues the chain, repeats nothing, waits across gaps, and refuses every contradiction."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kms.audit.anchors import AnchorFile, AnchorFileError, read_anchors
from kms.audit.peer_copies import CopyConflict, accept_checkpoints, copy_file, last_held
from kms.crypto.pqc.base import SignatureAlgorithm, SignatureKeyPair
from kms.crypto.pqc.registry import get_signature_provider
from kms.domain.audit_chain import GENESIS, Checkpoint

ALG = SignatureAlgorithm.ML_DSA_65
ORIGIN = "KME-A"


@pytest.fixture(scope="module")
def key() -> SignatureKeyPair:
    return get_signature_provider().generate(ALG)


def sign(cp: Checkpoint, key: SignatureKeyPair) -> Checkpoint:
    signature = get_signature_provider().sign(ALG, key.private_seed, cp.message(), cp.context)
    return dataclasses.replace(cp, signature=signature.hex())


def chain(key: SignatureKeyPair, n: int, tag: str = "a", start: Checkpoint | None = None) -> list[Checkpoint]:
    """``n`` signed checkpoints of 10 records each, continuing ``start`` if given."""
    out: list[Checkpoint] = []
    prev = start
    for _ in range(n):
        number = prev.number + 1 if prev else 1
        cp = Checkpoint(
            number,
            prev.hash() if prev else GENESIS.hex(),
            prev.upto_seq + 1 if prev else 1,
            (prev.upto_seq if prev else 0) + 10,
            f"{tag}{number:095d}",
            ORIGIN,
            1,
            ALG.value,
            f"2026-12-05T07:{number:02d}:00+00:00",
            "",
        )
        prev = sign(cp, key)
        out.append(prev)
    return out


def verifier(key: SignatureKeyPair):  # type: ignore[no-untyped-def]
    def verified(cp: Checkpoint) -> bytes | None:
        ok = get_signature_provider().verify(
            ALG, key.public_key, cp.message(), bytes.fromhex(cp.signature), cp.context
        )
        return key.public_key if ok else None

    return verified


def copy(tmp_path: Path) -> AnchorFile:
    return copy_file(tmp_path, Path("audit-anchors"), ORIGIN)


def test_copy_grows_with_the_chain_and_overlaps_are_idempotent(tmp_path: Path, key: SignatureKeyPair) -> None:
    cps = chain(key, 5)
    book = copy(tmp_path)
    assert book.path == tmp_path / "audit-anchors" / "peer-copies" / "KME-A.anchors.jsonl"
    held = accept_checkpoints(book, ORIGIN, cps[:2], verifier(key))
    assert held is not None and held.number == 2
    held = accept_checkpoints(book, ORIGIN, cps[:4], verifier(key))  # 1-2 again, then 3-4
    assert held is not None and (held.number, held.hash, held.upto_seq) == (4, cps[3].hash(), 40)
    assert [a.number for a in book.read()] == [1, 2, 3, 4]  # nothing twice
    held = accept_checkpoints(book, ORIGIN, [cps[4]], verifier(key))
    assert held is not None and held.number == 5 and last_held(book) == held


def test_a_gap_waits_for_the_missing_checkpoints(tmp_path: Path, key: SignatureKeyPair) -> None:
    cps = chain(key, 6)
    book = copy(tmp_path)
    accept_checkpoints(book, ORIGIN, cps[:2], verifier(key))
    held = accept_checkpoints(book, ORIGIN, cps[4:], verifier(key))  # 5, 6: #3 and #4 missing
    assert held is not None and held.number == 2
    held = accept_checkpoints(book, ORIGIN, cps[2:], verifier(key))
    assert held is not None and held.number == 6


def test_a_copy_may_start_mid_chain_and_reads_as_a_copy_only(tmp_path: Path, key: SignatureKeyPair) -> None:
    cps = chain(key, 5)
    book = copy(tmp_path)
    held = accept_checkpoints(book, ORIGIN, [cps[2]], verifier(key))  # the peering started at #3
    assert held is not None and held.number == 3
    accept_checkpoints(book, ORIGIN, cps[3:], verifier(key))
    assert [a.number for a in read_anchors(book.path, from_first=False)] == [3, 4, 5]
    with pytest.raises(AnchorFileError):  # as a KME's own anchor file it would be missing #1-2
        AnchorFile(book.path).read()


def test_a_rewritten_checkpoint_under_a_held_number_is_refused(tmp_path: Path, key: SignatureKeyPair) -> None:
    cps = chain(key, 4)
    book = copy(tmp_path)
    accept_checkpoints(book, ORIGIN, cps, verifier(key))
    # Validly signed (the attacker holds the origin's key), but not the history the copy holds.
    forged = chain(key, 2, tag="b", start=cps[1])
    with pytest.raises(CopyConflict, match="#3 of KME-A differs from the copy held here"):
        accept_checkpoints(book, ORIGIN, forged, verifier(key))
    assert [a.hash for a in book.read()] == [c.hash() for c in cps]  # the copy is unchanged


def test_a_fork_from_the_last_held_checkpoint_is_refused(tmp_path: Path, key: SignatureKeyPair) -> None:
    cps = chain(key, 4)
    book = copy(tmp_path)
    accept_checkpoints(book, ORIGIN, cps[:3], verifier(key))
    fork = chain(key, 1, tag="c", start=cps[1])[0]  # another #3 after the same #2
    with pytest.raises(CopyConflict, match="differs"):
        accept_checkpoints(book, ORIGIN, [fork], verifier(key))
    wrong_prev = sign(dataclasses.replace(cps[3], prev_hash=cps[1].hash()), key)
    with pytest.raises(CopyConflict, match="does not continue checkpoint #3"):
        accept_checkpoints(book, ORIGIN, [wrong_prev], verifier(key))
    wrong_range = sign(dataclasses.replace(cps[3], from_seq=cps[3].from_seq + 1), key)
    with pytest.raises(CopyConflict, match="does not continue"):
        accept_checkpoints(book, ORIGIN, [wrong_range], verifier(key))
    assert last_held(book) is not None and last_held(book).number == 3  # type: ignore[union-attr]


def test_bad_signatures_and_other_origins_are_refused(tmp_path: Path, key: SignatureKeyPair) -> None:
    cps = chain(key, 2)
    book = copy(tmp_path)
    other = get_signature_provider().generate(ALG)
    with pytest.raises(CopyConflict, match="signature does not verify"):
        accept_checkpoints(book, ORIGIN, [sign(cps[0], other)], verifier(key))
    with pytest.raises(CopyConflict, match="signature does not verify"):
        accept_checkpoints(book, ORIGIN, [dataclasses.replace(cps[0], upto_seq=11)], verifier(key))
    with pytest.raises(CopyConflict, match="names KME KME-A, not its sender KME-B"):
        accept_checkpoints(book, "KME-B", cps, verifier(key))
    assert last_held(book) is None
