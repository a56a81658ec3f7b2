"""KEK versions: which key-encryption keys exist, where each is referenced from, which one seals.

Every sealed record already names its KEK version (``kek_id`` on ``key_blocks``, ``keys`` and
``kme_keys``, since 0001). This table is the keyring those names point into (docs/DECISIONS.md D-27):
the *reference* of each version (a file path, an environment variable's name or a PKCS#11 wrapped-KEK
file — never the key), a public check value that tells a wrong key from the right one, and its state
(``active``: seals new records; ``draining``: being re-sealed away by ``qkms kek rotate``;
``retired``: nothing sealed under it any more, its key destroyed). Empty until the KME first starts,
which records the configured KEK as the first version. Downgrading drops the keyring (the records keep
their ``kek_id``; the configured KEK must then be the one they are all sealed under).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 16:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "kek_versions",
        sa.Column("kek_id", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("reference", sa.JSON(), nullable=False),
        sa.Column("check_value", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("kek_id", name=op.f("pk_kek_versions")),
    )


def downgrade() -> None:
    op.drop_table("kek_versions")
