"""Partial indexes for the hot queries: active pool blocks, and reserved keys by expiry and block.

Exhausted blocks and closed keys accumulate without bound; indexes restricted to the live rows keep
the reservation query and the expiry sweep independent of history.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 08:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_key_blocks_active",
        "key_blocks",
        ["link_id", "id"],
        postgresql_where=sa.text("state = 'active'"),
        sqlite_where=sa.text("state = 'active'"),
    )
    op.drop_index("ix_keys_state_expires", table_name="keys")
    op.create_index(
        "ix_keys_reserved_expiry",
        "keys",
        ["expires_at"],
        postgresql_where=sa.text("state = 'reserved'"),
        sqlite_where=sa.text("state = 'reserved'"),
    )
    op.drop_index("ix_keys_block_id", table_name="keys")
    op.create_index(
        "ix_keys_live_block",
        "keys",
        ["block_id"],
        postgresql_where=sa.text("state IN ('reserved', 'suspended')"),
        sqlite_where=sa.text("state IN ('reserved', 'suspended')"),
    )


def downgrade() -> None:
    op.drop_index("ix_keys_live_block", table_name="keys")
    op.create_index("ix_keys_block_id", "keys", ["block_id"])
    op.drop_index("ix_keys_reserved_expiry", table_name="keys")
    op.create_index("ix_keys_state_expires", "keys", ["state", "expires_at"])
    op.drop_index("ix_key_blocks_active", table_name="key_blocks")
