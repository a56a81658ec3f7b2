"""What each master holds reserved and unfetched, for the fair-share caps (``kms.service.fair_share``)."""

from __future__ import annotations

from sqlalchemy import Connection

from kms.storage.rawsql import Raw


def reserved_by_master(conn: Connection) -> dict[str, tuple[int, int]]:
    """(keys, bits) reserved and not yet fetched, per master SAE. The literal predicate is the
    partial index ix_keys_reserved_expiry's, so only live reservations are read."""
    rows = Raw(conn).all(
        "SELECT master_sae_id, SUM(key_count), SUM(key_count * size_bits) FROM keys"
        " WHERE state = 'reserved' GROUP BY master_sae_id"
    )
    return {str(r[0]): (int(r[1]), int(r[2])) for r in rows}
