"""PostgreSQL parameters of the hot path: lists sent as one joined text when that round-trips."""

from __future__ import annotations

from kms.domain.key_ids import new_key_ids
from kms.storage.rawsql import joined_array


def test_joined_arrays_only_for_values_that_round_trip() -> None:
    ids = new_key_ids(3)
    assert joined_array(ids) == (",".join(ids), "")
    assert joined_array([3, 1, 2]) == ("3,1,2", "::bigint[]")
    for unsafe in ([], ["a,b"], [""], [1, "x"], [True, False], [None]):
        assert joined_array(unsafe) is None
