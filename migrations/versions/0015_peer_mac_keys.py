"""MAC keys between adjacent KMEs (DECISIONS.md D-35).

A KME process that talks to a neighbour establishes a MAC key with it once (an ML-DSA-signed
``session.key`` message carrying an ML-KEM ciphertext to the neighbour's KEM key) and then
authenticates hop-by-hop messages with HMAC-SHA256 instead of an ML-DSA signature each. The
receiving KME keeps each sender's keys here, sealed under its KEK, so every process of it (``--workers
N``, scale-out on one PostgreSQL) can check them; a KEK rotation re-seals them like every sealed record (one-column key, ``sender/key
id``). Downgrading drops the keys: senders re-establish.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 17:15:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "peer_mac_keys",
        sa.Column("id", sa.String(length=100), nullable=False),
        sa.Column("sealed_key", sa.LargeBinary(), nullable=False),
        sa.Column("kek_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_peer_mac_keys")),
    )


def downgrade() -> None:
    op.drop_table("peer_mac_keys")
