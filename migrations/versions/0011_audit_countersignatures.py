"""Peer countersignatures of audit checkpoints.

Adjacent peer KMEs keep a copy of this KME's checkpoint chain outside its host and answer each new
checkpoint with a signed receipt (``kms.audit.peer_copies``). The receipts are stored here so that
``qkms audit verify`` can say how far each peer has countersigned; the copies themselves live at the
peers. Downgrading drops the receipts (the copies at the peers are unaffected).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 07:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_countersignatures",
        sa.Column("peer_kme_id", sa.String(length=64), nullable=False),
        sa.Column("number", sa.BigInteger(), nullable=False),
        sa.Column("checkpoint_hash", sa.String(length=96), nullable=False),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("algorithm", sa.String(length=32), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("peer_kme_id", "number", name=op.f("pk_audit_countersignatures")),
    )


def downgrade() -> None:
    op.drop_table("audit_countersignatures")
