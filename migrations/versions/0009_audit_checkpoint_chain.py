"""Audit checkpoints form a chain: number, previous checkpoint's hash, record range.

Existing checkpoints stay as they are (legacy, unchained: NULL in the new columns) and are still
verified. The chain starts at the first checkpoint written after the upgrade, which covers the whole
log from seq 1 (``from_seq`` 1, ``prev_hash`` the all-zero genesis), so every record — old ones
included — is under it. Downgrading deletes the chained checkpoints (the old code cannot verify
them; their anchors stay in the anchor file) and drops the columns.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMNs (nullable) and a unique index: no table rebuild on either database.
    op.add_column("audit_checkpoints", sa.Column("number", sa.BigInteger(), nullable=True))
    op.add_column("audit_checkpoints", sa.Column("prev_hash", sa.String(length=96), nullable=True))
    op.add_column("audit_checkpoints", sa.Column("from_seq", sa.BigInteger(), nullable=True))
    op.create_index("ix_audit_checkpoints_number", "audit_checkpoints", ["number"], unique=True)


def downgrade() -> None:
    op.execute("DELETE FROM audit_checkpoints WHERE number IS NOT NULL")
    op.drop_index("ix_audit_checkpoints_number", table_name="audit_checkpoints")
    for column in ("from_seq", "prev_hash", "number"):
        op.execute(f"ALTER TABLE audit_checkpoints DROP COLUMN {column}")
