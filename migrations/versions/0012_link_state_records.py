"""Link-state records of the trusted-node network (DECISIONS.md D-26).

Each KME originates a signed record of its own links (state, key stock, neighbour reachability)
with a sequence number; neighbours flood it on. The newest record per originating KME is kept here,
so that every process of a KME (``--workers N``, scale-out on one PostgreSQL) routes on the same
graph whichever process received the record. Downgrading drops the records (they are rebuilt from
the network within a heartbeat).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05 17:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "link_state_records",
        sa.Column("origin_kme_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("issued_at", sa.Float(), nullable=False),
        sa.Column("record", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("origin_kme_id", name=op.f("pk_link_state_records")),
    )


def downgrade() -> None:
    op.drop_table("link_state_records")
