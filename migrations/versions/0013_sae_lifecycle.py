"""SAE lifecycle: states, pinned certificates and a registry version (issue 16, DECISIONS.md D-29).

``saes`` gains ``state`` (active, suspended, revoked), ``managed_by`` (config or cli), the reason
and time of the last change. ``sae_certificates`` keeps every certificate ``qkms sae`` pinned: the
current one, the previous one during a rotation's grace period, retired ones. ``registry_version``
is one row incremented by every lifecycle change, so each serving process notices a change by
reading one number. Existing SAEs become ``active`` (or ``suspended`` where ``enabled`` was false)
and stay managed by the configuration. Downgrading drops the certificates and the version and the
new columns; a revoked SAE then stays disabled (``enabled`` false).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 16:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("saes") as batch:
        batch.add_column(sa.Column("state", sa.String(length=16), nullable=False, server_default="active"))
        batch.add_column(
            sa.Column("managed_by", sa.String(length=8), nullable=False, server_default="config")
        )
        batch.add_column(sa.Column("state_reason", sa.String(length=512), nullable=True))
        batch.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(sa.text("UPDATE saes SET state = 'suspended' WHERE NOT enabled"))
    op.create_table(
        "sae_certificates",
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("sae_id", sa.String(length=128), nullable=False),
        sa.Column("subject", sa.String(length=512), nullable=False),
        sa.Column("issuer", sa.String(length=512), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["sae_id"], ["saes.id"], name=op.f("fk_sae_certificates_sae_id_saes")),
        sa.PrimaryKeyConstraint("fingerprint", name=op.f("pk_sae_certificates")),
    )
    op.create_index(op.f("ix_sae_certificates_sae_id"), "sae_certificates", ["sae_id"])
    op.create_table(
        "registry_version",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_registry_version")),
    )
    op.execute(sa.text("INSERT INTO registry_version (id, version) VALUES (1, 1)"))


def downgrade() -> None:
    op.drop_table("registry_version")
    op.drop_index(op.f("ix_sae_certificates_sae_id"), table_name="sae_certificates")
    op.drop_table("sae_certificates")
    with op.batch_alter_table("saes") as batch:
        batch.drop_column("updated_at")
        batch.drop_column("state_reason")
        batch.drop_column("managed_by")
        batch.drop_column("state")
