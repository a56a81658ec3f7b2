"""PQC identity keys, KEM exchanges, audit chain, SAE roles

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 07:14:19.197780
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("upto_seq", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(length=96), nullable=False),
        sa.Column("kme_id", sa.String(length=64), nullable=False),
        sa.Column("key_version", sa.Integer(), nullable=False),
        sa.Column("algorithm", sa.String(length=32), nullable=False),
        sa.Column("at", sa.String(length=40), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_checkpoints")),
    )
    with op.batch_alter_table("audit_checkpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_checkpoints_upto_seq"), ["upto_seq"], unique=False)

    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=96), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    # The chain starts from an all-zero genesis hash (kms.domain.audit_chain.GENESIS).
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": "00" * 48}])
    op.create_table(
        "audit_records",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("at", sa.String(length=40), nullable=False),
        sa.Column("actor", sa.String(length=160), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=96), nullable=False),
        sa.Column("hash", sa.String(length=96), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_records")),
    )
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_records_action"), ["action"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_records_subject"), ["subject"], unique=False)

    op.create_table(
        "kem_exchanges",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("algorithm", sa.String(length=32), nullable=False),
        sa.Column("target_kme_id", sa.String(length=64), nullable=False),
        sa.Column("kem_key_version", sa.Integer(), nullable=False),
        sa.Column("public_key_sha384", sa.String(length=96), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kem_exchanges")),
    )
    op.create_table(
        "kme_keys",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("purpose", sa.String(length=8), nullable=False),
        sa.Column("algorithm", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("sealed_seed", sa.LargeBinary(), nullable=True),
        sa.Column("kek_id", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kme_keys")),
        sa.UniqueConstraint("purpose", "version", name="uq_kme_keys_purpose_version"),
    )
    with op.batch_alter_table("keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("suite", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("kem_exchange_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True)
        )
        batch_op.alter_column("block_id", existing_type=sa.INTEGER(), nullable=True)
        batch_op.alter_column("bit_offset", existing_type=sa.INTEGER(), nullable=True)
        batch_op.create_foreign_key(
            batch_op.f("fk_keys_kem_exchange_id_kem_exchanges"), "kem_exchanges", ["kem_exchange_id"], ["id"]
        )

    with op.batch_alter_table("saes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("role", sa.String(length=16), server_default="sae", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("saes", schema=None) as batch_op:
        batch_op.drop_column("role")

    with op.batch_alter_table("keys", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_keys_kem_exchange_id_kem_exchanges"), type_="foreignkey")
        batch_op.alter_column("bit_offset", existing_type=sa.INTEGER(), nullable=False)
        batch_op.alter_column("block_id", existing_type=sa.INTEGER(), nullable=False)
        batch_op.drop_column("kem_exchange_id")
        batch_op.drop_column("suite")

    op.drop_table("kme_keys")
    op.drop_table("kem_exchanges")
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_records_subject"))
        batch_op.drop_index(batch_op.f("ix_audit_records_action"))

    op.drop_table("audit_records")
    op.drop_table("audit_head")
    with op.batch_alter_table("audit_checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_checkpoints_upto_seq"))

    op.drop_table("audit_checkpoints")
