"""Redelivery window: consumed keys may keep their sealed material until ``expires_at``.

A key consumed with ``pool.redelivery_seconds`` > 0 keeps its sealed material until the end of its
window, which is stored in ``expires_at`` (free once a key is consumed: the reservation TTL no longer
applies), so that the same slave whose answer was lost can fetch it again. The expiry sweep zeroises
the material once the window ends. This revision adds the partial index that the sweep and
``qkms db check`` read: only consumed keys still holding material are in it, so it stays as small
as the keys consumed in the last window. Downgrading zeroises every consumed key's material (the
older code has no sweep for it and promises none is held) and drops the index.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 19:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HELD = sa.text("state = 'consumed' AND material IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_keys_redelivery", "keys", ["expires_at"], postgresql_where=HELD, sqlite_where=HELD)


def downgrade() -> None:
    op.execute("UPDATE keys SET material = NULL WHERE state = 'consumed' AND material IS NOT NULL")
    op.drop_index("ix_keys_redelivery", table_name="keys")
