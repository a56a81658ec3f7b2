"""Index active blocks by id alone, so the reservation query walks them in order and stops at the
first that fits, instead of sorting every active block (with its sealed material) per request.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 08:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = sa.text("state = 'active'")


def upgrade() -> None:
    op.drop_index("ix_key_blocks_active", table_name="key_blocks")
    op.create_index(
        "ix_key_blocks_active_id", "key_blocks", ["id"], postgresql_where=ACTIVE, sqlite_where=ACTIVE
    )


def downgrade() -> None:
    op.drop_index("ix_key_blocks_active_id", table_name="key_blocks")
    op.create_index(
        "ix_key_blocks_active", "key_blocks", ["link_id", "id"], postgresql_where=ACTIVE, sqlite_where=ACTIVE
    )
