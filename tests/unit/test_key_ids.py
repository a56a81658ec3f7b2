"""Key IDs are RFC 9562 version-7 UUIDs: valid UUIDs, time-ordered, unique."""

from __future__ import annotations

import time
import uuid

from kms.domain.key_ids import new_key_id


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
