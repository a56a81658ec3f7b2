"""Multi-site: pool pieces cut by the peer KME, keys recorded from a peer's ledger, peer message replay guard.

- ``key_blocks.owner_kme_id``: NULL when this KME cuts keys from the piece; the peer's KME ID when
  the piece is a mirror that only the peer cuts (each shared block is split between the two ends).
- ``key_blocks.taken``: for mirrored pieces, the bit ranges already recorded from the peer's ledger.
- ``keys.source_kme_id``: the master's KME when it is not this one; ``keys.route``: the KMEs and
  links a relayed key crossed.
- ``peer_messages``: (sender, nonce) and (sender, session, seq) of every accepted peer message.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("key_blocks") as batch:
        batch.add_column(sa.Column("owner_kme_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("taken", sa.Text(), nullable=True))
    with op.batch_alter_table("keys") as batch:
        batch.add_column(sa.Column("source_kme_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("route", sa.JSON(), nullable=True))
    op.create_table(
        "peer_messages",
        sa.Column("sender", sa.String(64), nullable=False),
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("session", sa.String(64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("msg_type", sa.String(32), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sender", "nonce", name="pk_peer_messages"),
        sa.UniqueConstraint("sender", "session", "seq", name="uq_peer_messages_sequence"),
    )
    op.create_index("ix_peer_messages_received_at", "peer_messages", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_peer_messages_received_at", table_name="peer_messages")
    op.drop_table("peer_messages")
    with op.batch_alter_table("keys") as batch:
        batch.drop_column("route")
        batch.drop_column("source_kme_id")
    with op.batch_alter_table("key_blocks") as batch:
        batch.drop_column("taken")
        batch.drop_column("owner_kme_id")
