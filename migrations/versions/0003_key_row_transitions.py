"""Record hot-path key transitions on the key row; recipients table for additional slaves only.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 08:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("served_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("multicast", sa.Boolean(), server_default="0", nullable=False))
    # The named slave's delivery moves onto the key row; recipient rows remain for additional slaves.
    op.execute(
        "UPDATE keys SET served_at = (SELECT r.served_at FROM key_recipients r"
        " WHERE r.key_id = keys.key_id AND r.sae_id = keys.slave_sae_id)"
    )
    op.execute(
        "DELETE FROM key_recipients WHERE sae_id = (SELECT k.slave_sae_id FROM keys k"
        " WHERE k.key_id = key_recipients.key_id)"
    )
    op.execute(
        "UPDATE keys SET multicast = EXISTS (SELECT 1 FROM key_recipients r WHERE r.key_id = keys.key_id)"
    )


def downgrade() -> None:
    op.execute(
        "INSERT INTO key_recipients (key_id, sae_id, served_at) SELECT key_id, slave_sae_id, served_at FROM keys"
    )
    with op.batch_alter_table("keys", schema=None) as batch_op:
        batch_op.drop_column("multicast")
        batch_op.drop_column("served_at")
