"""Key IDs are RFC 9562 version-7 UUIDs: valid UUIDs, time-ordered, unique."""

from __future__ import annotations

import time
import uuid

from kms.domain.key_ids import canonical_key_id, new_key_id, new_key_ids


def test_key_ids_are_version_7_rfc_variant_uuids_in_canonical_form() -> None:
    for _ in range(200):
        text = new_key_id()
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122


def test_key_ids_carry_the_creation_millisecond_and_sort_by_it() -> None:
    before = time.time_ns() // 1_000_000
    first = new_key_id()
    time.sleep(0.003)
    second = new_key_id()
    after = time.time_ns() // 1_000_000
    stamp = uuid.UUID(first).int >> 80
    assert before <= stamp <= after
    assert first < second  # text order is time order: new keys append to the primary-key index


def test_key_ids_are_unique_and_their_random_part_varies() -> None:
    ids = [new_key_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    random_parts = {uuid.UUID(i).int & ((1 << 62) - 1) for i in ids}
    assert len(random_parts) == len(ids)


def test_a_batch_of_key_ids_are_distinct_version_7_uuids_of_one_millisecond() -> None:
    before = time.time_ns() // 1_000_000
    ids = new_key_ids(128)
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 128
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after
    # 74 random bits per ID: across many IDs every one of them takes both values.
    many = [uuid.UUID(i).int for i in new_key_ids(2000)]
    rand_a = (1 << 12) - 1
    rand_b = (1 << 62) - 1
    for bit in range(12):
        assert {(((v >> 64) & rand_a) >> bit) & 1 for v in many} == {0, 1}
    for bit in range(62):
        assert {((v & rand_b) >> bit) & 1 for v in many} == {0, 1}


def test_canonical_key_id_accepts_any_uuid_spelling_and_rejects_the_rest() -> None:
    text = new_key_id()
    assert canonical_key_id(text) == text
    assert canonical_key_id(text.upper()) == text
    assert canonical_key_id("{" + text + "}") == text
    assert canonical_key_id(text.replace("-", "")) == text
    for bad in ("", "not-a-uuid", text[:-1], 42, None, ["x"]):
        assert canonical_key_id(bad) is None
